"""An Optuna sweeper for Hydra whose searches resume: rerunning a search continues its study.

Hydra only loads sweepers from the `hydra_plugins` package, hence this module's place. Its
config is conf/hydra/sweeper/optuna.yaml (samplers and pruners: the groups beside it); the
search space, `hydra.sweeper.params`, is in Hydra's override grammar (search_space.py).
- `n_trials` is the study's total: trials already finished count, so a search that died
  after 12 of 20 runs 8 more when started again with the same command.
- A trial whose process died (Ctrl-C, SIGTERM, SIGKILL, a crash) is marked failed with the
  user attribute `interrupted` and does not count; the search asks for a new trial instead.
  One whose job had completed (the process died before telling the study) is told its result.
- Parallel workers stop at exactly `n_trials`: of two that take the last trial at once, the
  one whose trial has the higher number gives it back (failed, user attribute `surplus`).
- A trial that fails or returns NaN is recorded as failed and the search goes on, up to
  `max_failure_rate` of failed trials among all the study's finished trials.
- With a pruner (`hydra/sweeper/pruner=median`), each trial's job reports its metric per
  epoch to its trial (cifar_cnn/pruning.py) and stops when the pruner says so: PRUNED.
- Samplers only: the grid sampler, which needs the whole space up front, is not supported
  (a plain multirun is the grid search).
- Job folders are numbered by trial number, so a rerun never overwrites an earlier job and
  `<sweep folder>/<N>` is trial N of the study.
"""

import logging
import math
import os
import socket
import warnings
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    _convert_old_distribution_to_new_distribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.exceptions import StorageInternalError
from optuna.trial import FrozenTrial, TrialState

from cifar_cnn.errors import UserError, exit_on_user_error
from cifar_cnn.files import (
    FINISHED,
    process_alive,
    read_record,
    record_failure,
    remove_orphaned_partials,
    written_then_renamed,
)
from cifar_cnn.pruning import PRUNED_AT_EPOCH
from cifar_cnn.sweep_summary import SEARCH_RECORD, write_summary
from cifar_cnn.validation import check_lr_takes_effect, check_optimized_metric
from hydra_plugins.cifar_cnn_search.search_space import search_space

log = logging.getLogger(__name__)

WORKER = "worker"  # user attribute: "<host>:<boot id>:<pid>" of the process running the trial
INTERRUPTED = "interrupted"  # user attribute of a trial whose process died
SURPLUS = "surplus"  # user attribute of a trial given back: another worker took the last one
# A running trial without its worker's record is one that a worker has just asked for; after
# this long, it is one whose worker died before recording itself.
UNCLAIMED_GRACE = timedelta(minutes=1)
SEARCH = "search"  # study user attribute: the search space and fixed overrides


class ResumableOptunaSweeper(Sweeper):
    """`hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml)."""

    def __init__(
        self,
        sampler: optuna.samplers.BaseSampler,
        direction: str,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        self.sampler = sampler
        self.pruner = pruner
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params or {}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = config.hydra.sweep.dir

    def sweep(self, arguments: list[str]) -> None:
        with exit_on_user_error():
            self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> None:
        params = [f"{name}={value}" for name, value in self.params.items()]
        distributions, fixed = search_space(params + list(arguments))
        for name in fixed:  # a command line's `key=value` holds a searched key fixed
            distributions.pop(name, None)
        # Refused here, not in each trial: every one of them would fail.
        check_lr_takes_effect(self.config, distributions.keys() | fixed.keys())
        check_optimized_metric(self.config)
        _check_direction(self.config.optimized_metric, self.direction)

        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)  # SQLite's file lives there
        study = _open_study(self.study_name, self.storage, self.sampler, self.pruner,
                            self.direction)  # fmt: skip
        search = {
            "space": {name: distribution_to_json(d) for name, d in sorted(distributions.items())},
            "fixed": {name: str(value) for name, value in sorted(fixed.items())},
        }
        _check_same_search(study, search)
        # Beside the trials: what the search varies (the summary's columns) and holds fixed.
        with written_then_renamed(Path(self.sweep_dir) / SEARCH_RECORD) as partial:
            partial.write_text(yaml.safe_dump(search))  # workers that start at once share it
        # SQLite serves the workers of one machine: its running trials elsewhere are dead.
        _mark_interrupted(
            study, not str(self.storage).startswith("sqlite:"), Path(self.sweep_dir),
            self.config.optimized_metric,
        )  # fmt: skip
        done = len(_counted(study))
        if study.trials:
            # A seeded sampler would otherwise repeat the suggestions of the first run.
            self.sampler.reseed_rng()
            log.info("Continuing study %s: %d of %d trials done", study.study_name, done,
                     self.n_trials)  # fmt: skip
        pruner = type(self.pruner).__name__ if self.pruner else "none"
        log.info("Study %s in %s, sampler %s, pruner %s", study.study_name, self.storage,
                 type(self.sampler).__name__, pruner)  # fmt: skip

        try:
            while (to_go := self.n_trials - len(_counted(study))) > 0:
                trials = [study.ask() for _ in range(min(self.n_jobs, to_go))]
                for trial in trials:
                    trial.set_user_attr(WORKER, _this_worker())
                trials = _within_budget(study, trials, self.n_trials)
                if not trials:
                    continue
                overrides = [self._trial_overrides(t, distributions, fixed) for t in trials]
                for trial, result in zip(trials, self._launch(trials, overrides), strict=True):
                    _tell(study, trial, result)
                self._check_failure_rate(study)
        except BaseException:  # stopped (failure rate, Ctrl-C): what it found is still written
            self._save_results(study)
            if any(Path(self.sweep_dir).glob("*/.hydra/overrides.yaml")):
                write_summary(Path(self.sweep_dir))
            raise
        self._save_results(study)

    def _trial_overrides(
        self, trial: optuna.Trial, distributions: dict[str, BaseDistribution], fixed: dict
    ) -> list[str]:
        """The job's overrides: the trial's suggestions, the fixed ones, and with a pruner the
        callback that reports to this trial (in the job's config, so that its DDP processes
        have it too)."""
        suggested = {name: trial._suggest(name, d) for name, d in distributions.items()}
        overrides = [f"{name}={value}" for name, value in (suggested | fixed).items()]
        if self.pruner is not None:
            overrides += [
                "+callbacks.trial_pruning._target_=cifar_cnn.pruning.TrialPruning",
                f"+callbacks.trial_pruning.trial={trial.number}",
                "+callbacks.trial_pruning.monitor=${optimized_metric}",
            ]
        return overrides

    def _launch(
        self, trials: list[optuna.Trial], overrides: Sequence[Sequence[str]]
    ) -> list[JobReturn]:
        """Runs the trials as jobs numbered by trial number (one batch when consecutive)."""
        numbers = [trial.number for trial in trials]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return list(self.launcher.launch(overrides, initial_job_idx=numbers[0]))
        return [
            result
            for number, trial_overrides in zip(numbers, overrides, strict=True)
            for result in self.launcher.launch([trial_overrides], initial_job_idx=number)
        ]

    def _check_failure_rate(self, study: optuna.Study) -> None:
        finished = _counted(study)
        failed = [t for t in finished if t.state == TrialState.FAIL]
        if len(failed) / len(finished) > self.max_failure_rate:  # more than that share
            raise UserError(
                f"{len(failed)} of {len(finished)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: see the failed "
                f"jobs' metrics.json in {self.sweep_dir}"
            )

    def _save_results(self, study: optuna.Study) -> None:
        completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not completed:
            log.warning("No trial of study %s completed", study.study_name)
            return
        best = study.best_trial
        log.info("Best trial %d: %s = %s, %s", best.number, "value", best.value, best.params)
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "best_trial": best.number,
            "best_params": best.params,
            "best_value": best.value,
        }
        with written_then_renamed(Path(self.sweep_dir) / "optimization_results.yaml") as partial:
            OmegaConf.save(OmegaConf.create(results), partial)


def _check_direction(metric: str, direction: str) -> None:
    """A loss is minimised, an accuracy maximised: the search's direction must agree."""
    wanted = "minimize" if metric.endswith("loss") else "maximize"
    if str(direction).lower() != wanted:
        raise UserError(
            f"optimized_metric={metric} is to be {wanted}d, but hydra.sweeper.direction="
            f"{direction}: set hydra.sweeper.direction={wanted}"
        )


def _open_study(
    name: str | None,
    storage: str | None,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner | None,
    direction: str,
) -> optuna.Study:
    """The search's study, created on its first run. A database that an older Optuna set up
    (the searches of optuna 2) is refused with the command that upgrades it, not upgraded
    behind the user's back: once upgraded, the older Optuna cannot open it."""
    try:
        return optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, pruner=pruner,
            direction=direction, load_if_exists=True,
        )  # fmt: skip
    except (RuntimeError, StorageInternalError) as error:
        if "optuna storage upgrade" not in str(error):
            raise
        raise UserError(
            f"the study database {storage} was set up by an older Optuna: upgrade it (back it "
            f"up first; older Optuna cannot read it after) with: optuna storage upgrade "
            f"--storage {storage}"
        ) from error


def _check_same_search(study: optuna.Study, search: dict[str, dict[str, str]]) -> None:
    """Records the search's space and fixed overrides in the study; a rerun must bring the
    same ones, or its trials would not be comparable with the study's earlier ones."""
    recorded = study.user_attrs.get(SEARCH)
    if recorded is None:
        study.set_user_attr(SEARCH, search)
        return
    differences = [
        f"{part} {name}: {recorded[part].get(name)} before, {search[part].get(name)} now"
        for part in ("space", "fixed")
        for name in sorted(recorded[part].keys() | search[part].keys())
        if _meaning(part, recorded[part].get(name)) != _meaning(part, search[part].get(name))
    ]
    if differences:
        raise UserError(
            f"study {study.study_name} was started with other settings; rerun its own command "
            "or give the search a new hydra.sweeper.study_name. Differences: "
            + "; ".join(differences)
        )


def _meaning(part: str, value: str | None) -> Any:
    """A recorded distribution as the distribution it is: a study of optuna 2 recorded the
    same space under the old names (LogUniformDistribution for a log FloatDistribution)."""
    if part != "space" or value is None:
        return value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old names are deprecated
        return _convert_old_distribution_to_new_distribution(json_to_distribution(value))


def _tell(study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
    """Completes the trial with the job's value; prunes it when its job was pruned; fails it
    on an exception, NaN or no value."""
    try:
        value = float(result.return_value)  # raises the job's own exception, if any
        if math.isnan(value):
            raise ValueError("the job returned NaN (see its metrics.json)")
    except Exception as error:
        study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, error)
        return
    reported = study._storage.get_trial(trial._trial_id).user_attrs
    if PRUNED_AT_EPOCH in reported:  # the job's TrialPruning stopped it
        study.tell(trial, state=TrialState.PRUNED)
        log.info("Trial %d pruned after epoch %d", trial.number, reported[PRUNED_AT_EPOCH])
        return
    study.tell(trial, value)


def _counted(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count toward n_trials: finished ones (not interrupted nor given back), and
    running ones."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        or (
            t.state == TrialState.FAIL
            and not t.user_attrs.get(INTERRUPTED)
            and not t.user_attrs.get(SURPLUS)
        )
    ]


def _within_budget(
    study: optuna.Study, asked: list[optuna.Trial], n_trials: int
) -> list[optuna.Trial]:
    """The asked trials that fit in `n_trials`; the others are given back. Workers that ask at
    once each see the others' trials once asked: ranked by trial number, the first n_trials
    counted trials run, so every worker gives back the same ones."""
    ranked = sorted(t.number for t in _counted(study))
    kept = set(ranked[:n_trials])
    for trial in asked:
        if trial.number not in kept:
            trial.set_user_attr(SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            log.info("Trial %d given back: another worker took the search's last trial",
                     trial.number)  # fmt: skip
    return [trial for trial in asked if trial.number in kept]


def _mark_interrupted(study: optuna.Study, shared: bool, sweep_dir: Path, metric: str) -> None:
    """Ends the running trials whose process is gone: on this machine, ended or from before
    a reboot (pids are reused); on other machines, every one unless the storage is `shared`
    by parallel workers (a database server), whose trials are left alone. A search continued
    on another machine (another node of a cluster) frees the trial that died on the first.

    A trial whose job had completed (its folder's metrics.json says so) is told its result:
    the process died between the two. The others fail, marked `interrupted`; their folder's
    metrics.json says so where the job left none, and their half-written files are deleted."""
    host, boot, this_pid = _this_worker().split(":")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_host, trial_boot, pid = trial.user_attrs.get(WORKER, "::").split(":")
        if WORKER not in trial.user_attrs and _just_asked(trial):
            continue  # a worker's, which records itself in a moment
        if trial_host == host and pid.isdigit():
            gone = trial_boot != boot or pid == this_pid or not process_alive(int(pid))
        else:
            gone = not shared
        if gone:
            _end_orphaned(study, trial, sweep_dir / str(trial.number), metric,
                          f"process {pid or '?'} on {trial_host or '?'} ended")  # fmt: skip


def _just_asked(trial: FrozenTrial) -> bool:
    started = trial.datetime_start
    return started is not None and datetime.now() - started < UNCLAIMED_GRACE


def _end_orphaned(
    study: optuna.Study, trial: FrozenTrial, folder: Path, metric: str, why: str
) -> None:
    """Tells the study how the trial of a dead process ended (see _mark_interrupted)."""
    running = optuna.Trial(study, trial._trial_id)
    record = read_record(folder / "metrics.json") or {}
    value = record.get(metric)
    if record.get("status") in FINISHED and isinstance(value, int | float) and math.isfinite(value):
        if record["status"] == "pruned":
            study.tell(running, state=TrialState.PRUNED)
        else:
            study.tell(running, value)
        log.warning("Trial %d %s before its result was told (%s): told now", trial.number,
                    record["status"], why)  # fmt: skip
        return
    running.set_user_attr(INTERRUPTED, True)
    study.tell(running, state=TrialState.FAIL)
    log.warning("Trial %d was interrupted (%s): not counted", trial.number, why)
    if (folder / ".hydra").is_dir():
        if "status" not in record:  # a job stopped by a signal says so itself
            record_failure(folder, "interrupted", f"Interrupted: the search's {why}")
        remove_orphaned_partials(folder / "checkpoints")


def _this_worker() -> str:
    """ "<host>:<boot id>:<pid>": the boot id tells a pid of this boot from a reused one."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    boot = boot_id.read_text().strip() if boot_id.is_file() else ""
    return f"{socket.gethostname()}:{boot}:{os.getpid()}"
