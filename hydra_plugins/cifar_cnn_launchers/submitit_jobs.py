"""Hydra's submitit launchers (hydra/launcher=local and =slurm), with jobs whose process is
killed outright recorded as failed jobs instead of ending the sweep.

A job that fails in Python is recorded by the job itself (cifar_cnn/jobs.py) and returns NaN;
one stopped by a signal records "stopped" and exits without a result, and its record stands.
A job killed by SIGKILL (the kernel's out-of-memory killer, SLURM's memory limit) runs no
more code: submitit finds no result and `Job.results()` raises, and Hydra's launcher, which
reads the jobs' results one after another, ends the sweep there, without the other jobs'
results or the sweep's summary. These launchers read each job's result on its own: such a
job gets `"status": "failed"` in its metrics.json and NaN as its result, and the sweep goes
on to its end (SweepSummary then exits with status 1, naming it).

The local launcher can also run a sweep's jobs a few at a time (`max_concurrent_jobs`), each
with its share of the CPU threads: submitit's local executor starts every job at once.
"""

import logging
import math
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    BaseSubmititLauncher,
    LocalLauncher,
    SlurmLauncher,
)
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cifar_cnn.errors import UserError, exit_on_user_error
from cifar_cnn.files import read_record, record_failure

log = logging.getLogger(__name__)

# Seconds submitit waits for a finished job's result file to appear (its default: 15, for a
# cluster's network file system); a local job writes it on this machine's disk.
LOCAL_RESULT_WAIT_S = 2
# Seconds between looks for a finished job while the next one waits for its place.
FREE_PLACE_POLL_S = 0.5
# The local launcher's settings beyond submitit's: they configure the launch, not the executor.
LAUNCH_KEYS = {"max_concurrent_jobs", "threads_per_job"}


class JobsThatDieFail(BaseSubmititLauncher):
    """BaseSubmititLauncher.launch, but for its last step: each job's result read on its own."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit  # lazily, as Hydra's launcher: plugin discovery stays fast

        assert self.config is not None and len(job_overrides) > 0
        with exit_on_user_error():
            self._check_launch_settings()
        init_keys = {"max_num_timeout"}
        init_params = {"folder": self.params["submitit_folder"]} | {
            f"{self._EXECUTOR}_{key}": value
            for key, value in self.params.items()
            if key in init_keys
        }
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base_params = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in base_params else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in init_keys | LAUNCH_KEYS | {"submitit_folder", "setup"}
            },
            **self._setup(len(job_overrides)),
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        job_params = []
        for number, overrides in zip(numbers, job_overrides, strict=True):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", number,
                               f"job_id_for_{number}", Singleton.get_state()))  # fmt: skip
        jobs = self._submit(executor, job_params)
        return [
            self._result(job, list(overrides), number)
            for job, overrides, number in zip(jobs, job_overrides, numbers, strict=True)
        ]

    def _submit(self, executor: Any, job_params: list[tuple[Any, ...]]) -> list[Any]:
        """Every job at once, as Hydra's launcher submits them."""
        return executor.map_array(self, *zip(*job_params, strict=True))

    def _check_launch_settings(self) -> None:
        """The local launcher's own settings are refused here: SLURM has its own cap on the
        jobs at once (array_parallelism) and its own cores per job (cpus_per_task)."""
        for key in sorted(LAUNCH_KEYS):
            if self.params.get(key) is not None:
                raise UserError(f"hydra.launcher.{key} is for hydra/launcher=local or "
                                "shared_gpu; on SLURM, hydra.launcher.array_parallelism caps "
                                "the jobs at once and cpus_per_task sets their cores")  # fmt: skip

    def _setup(self, jobs: int) -> dict[str, list[str]]:
        """The executor's `setup` (shell lines run before each job), as configured."""
        setup = list(self.params.get("setup") or [])
        return {f"{self._EXECUTOR}_setup": setup} if setup else {}

    def _result(self, job: Any, overrides: list[str], number: int) -> JobReturn:
        """The job's own result; for a job whose process ended without one, a failed job's."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        if self._EXECUTOR == "local":
            job._results_timeout_s = LOCAL_RESULT_WAIT_S
        try:
            return job.results()[0]
        except FailedJobError:  # the job raised: its own error, as Hydra's launcher gives it
            raise
        except UncompletedJobError:
            pass
        folder = self._job_folder(overrides, number)
        if _stopped_since(folder / "metrics.json", Path(job.paths.submitted_pickle)):
            log.error("job %d was stopped by a signal: see its metrics.json", number)
            return self._nan_result(overrides, folder)
        reason = (
            f"the job's process ended without a result (submitit: state {job.state}), killed "
            "by a signal such as SIGKILL, which the kernel's out-of-memory killer sends; its "
            f"output: {job.paths.stderr}"
        )
        log.error("job %d failed: %s", number, reason)
        if (folder / ".hydra").is_dir():  # else it died before Hydra made its folder
            record_failure(folder, "failed", f"KilledJob: {reason}")
        return self._nan_result(overrides, folder)

    def _nan_result(self, overrides: list[str], folder: Path) -> JobReturn:
        """What a job that did not complete returns to the sweeper, as train_in_sweep does."""
        return JobReturn(
            overrides=overrides,
            working_dir=str(folder),
            task_name=str(self.config.hydra.job.name),
            status=JobStatus.COMPLETED,  # a failed job's result, as train_in_sweep returns it
            _return_value=math.nan,
        )

    def _job_folder(self, overrides: list[str], number: int) -> Path:
        """Where Hydra ran job `number`: hydra.sweep.dir / hydra.sweep.subdir."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(config.hydra.job):
                config.hydra.job.num = number
            return sweep_dir / str(config.hydra.sweep.subdir)
        except OmegaConfBaseException:  # a subdir that needs Hydra's runtime to resolve
            return sweep_dir / str(number)


class LocalJobsThatDieFail(JobsThatDieFail, LocalLauncher):
    """hydra/launcher=local and =shared_gpu."""

    def _submit(self, executor: Any, job_params: list[tuple[Any, ...]]) -> list[Any]:
        """With max_concurrent_jobs, each job submitted once fewer than that many run: its
        process, and so its time limit, starts when it has a place."""
        max_concurrent_jobs = self.params.get("max_concurrent_jobs")
        if max_concurrent_jobs is None:
            return super()._submit(executor, job_params)
        log.info(f"At most {max_concurrent_jobs} jobs at once")
        jobs: list[Any] = []
        for params in job_params:
            while sum(not job.done() for job in jobs) >= max_concurrent_jobs:
                time.sleep(FREE_PLACE_POLL_S)
            jobs.append(executor.submit(self, *params))
        return jobs

    def _check_launch_settings(self) -> None:
        """max_concurrent_jobs and threads_per_job: numbers from 1 up, or null."""
        for key in sorted(LAUNCH_KEYS):
            if (value := self.params.get(key)) is not None and value < 1:
                raise UserError(f"hydra.launcher.{key} is {value}: give a number from 1 "
                                "up, or null")  # fmt: skip

    def _setup(self, jobs: int) -> dict[str, list[str]]:
        """The configured setup lines, then the jobs' CPU threads where threads_per_job or
        max_concurrent_jobs asks (OMP_NUM_THREADS must be in a job's environment before it
        imports torch): without threads_per_job, the cores shared out among the jobs that run
        at once (`jobs` of them at most), rounded down. Then the sweep's CUDA_VISIBLE_DEVICES,
        where it is set: submitit numbers a job's GPUs 0..n-1 there, which names the machine's
        first n GPUs instead of the ones the sweep was started with."""
        setup = super()._setup(jobs).get("local_setup", [])
        threads = self.params.get("threads_per_job")
        max_concurrent_jobs = self.params.get("max_concurrent_jobs")
        if threads is None and max_concurrent_jobs is not None:
            threads = max(1, len(os.sched_getaffinity(0)) // min(max_concurrent_jobs, jobs))
        if threads is not None:
            setup.append(f"export OMP_NUM_THREADS={threads}")
        if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
            setup.append(f"export CUDA_VISIBLE_DEVICES={shlex.quote(visible)}")
        if not setup:
            return {}
        # With setup lines submitit starts its job controller as `sh -c "<setup> && python
        # ..."` and takes the shell's process id for the job's. Where /bin/sh is bash, recent
        # versions run the last command in the shell's place unless a trap is left to run:
        # the controller would take the launcher's process id, and every job would fail.
        return {"local_setup": ["trap : EXIT", *setup]}


def _stopped_since(record: Path, submitted: Path) -> bool:
    """Whether `record` (a job's metrics.json) says the job was stopped by a signal, written
    since `submitted` (submitit's record of this submission): a record of an earlier attempt
    of the job does not count."""
    written = read_record(record)
    try:
        return (
            written is not None
            and written.get("status") == "stopped"
            and record.stat().st_mtime >= submitted.stat().st_mtime
        )
    except OSError:
        return False


class SlurmJobsThatDieFail(JobsThatDieFail, SlurmLauncher):
    """hydra/launcher=slurm."""


@dataclass
class LocalJobsConf(LocalQueueConf):
    """Hydra's submitit_local config, with this launcher and its two settings of the launch
    (conf/hydra/launcher/local.yaml says what they do)."""

    _target_: str = "hydra_plugins.cifar_cnn_launchers.submitit_jobs.LocalJobsThatDieFail"
    max_concurrent_jobs: int | None = None
    threads_per_job: int | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name="cifar_cnn_local", node=LocalJobsConf, provider="cifar_cnn"
)
