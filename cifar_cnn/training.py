"""A training run from a composed config: fit, test the best checkpoint, record the figures."""

import gc
import inspect
import json
import logging
import math
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from tqdm.contrib.logging import logging_redirect_tqdm

from cifar_cnn.callbacks import GracefulStop, StoppedBySignal
from cifar_cnn.checkpoints import read_checkpoint, recorded_precision, resume_checkpoint
from cifar_cnn.config import RUN_FIGURES, validate
from cifar_cnn.errors import UserError
from cifar_cnn.files import read_record
from cifar_cnn.gpu_probe import skip_nvml_probe
from cifar_cnn.memory import keep_freed_memory
from cifar_cnn.module import run_length_settings
from cifar_cnn.provenance import provenance

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The data, model and trainer that the config describes.

    A callback or logger set to null (`callbacks.model_checkpoint=null`) is left out.
    """
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    # GracefulStop after the others (Lightning runs the checkpoint callbacks after all): a
    # stop's last.ckpt holds the batch's state after their work on it (Lookahead's pull).
    callbacks.sort(key=lambda callback: isinstance(callback, GracefulStop))
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains, tests the best checkpoint, writes `metrics.json` in the run folder, returns it."""
    started = time.perf_counter()
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    validate(cfg)
    resume_from = resume_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    saved = read_checkpoint(resume_from) if resume_from else {}
    if resume_from and _keep_saved_precision(cfg, saved):
        validate(cfg)  # again, in that precision (gradient clipping under mixed precision)
    keep_freed_memory()
    skip_nvml_probe()
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    if resume_from:  # checked before the run's files are touched: a refusal loses nothing
        _check_same_settings(saved, resume_from, datamodule, model)
        _check_same_schedule(saved, resume_from, trainer)
        _check_unfinished(saved, resume_from, trainer)
        _check_same_validation_images(saved, resume_from, datamodule)  # loads the data
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP: one process writes the run's files
        (output_dir / "metrics.json").unlink(missing_ok=True)  # no stale result of earlier runs
        info = json.dumps(provenance(cfg.seed, trainer.strategy.root_device), indent=2) + "\n"
        (output_dir / "run_info.json").write_text(info)

    # Log lines print above progress bars instead of through them. Checkpoints are loaded
    # weights-only: no code in them runs (ours hold plain values only).
    with logging_redirect_tqdm(), _sigterm_stops(), warnings.catch_warnings():
        if resume_from:  # the run's own checkpoints are in its folder, as they should be
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
            # Our training batches go on from Lightning's restored count (EpochPermutation).
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that")
        fit_started = time.perf_counter()
        trainer.fit(model, datamodule, ckpt_path=resume_from, weights_only=True)
        fit_time_s = round(time.perf_counter() - fit_started, 1)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        # The module's record, not callback_metrics: a run resumed from a checkpoint of an
        # epoch's last batch (GracefulStop saved those before it let such an epoch end) ends
        # without a validation (Lightning counts that epoch as done).
        # None (JSON null, not -Infinity) when no validation ran (limit_val_batches=0, say).
        # The state, not update_count: a resumed run restores the one, not the other.
        best_so_far = float(model.val_acc_best.max_value)
        val_acc_best = best_so_far if math.isfinite(best_so_far) else None
        # The best checkpoint when there is one; fast_dev_run saves none: test the last weights.
        [test_metrics] = trainer.test(
            model, datamodule, ckpt_path="best" if best else None, weights_only=True
        )

    metrics = {
        "status": "completed",
        "val/acc_best": val_acc_best,
        **{key: float(value) for key, value in test_metrics.items()},
        "epochs": trainer.current_epoch,
        # trainer.fit: set-up on the device (whitening, compiling), training and validation.
        "fit_time_s": fit_time_s,
        "best_checkpoint": best,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    for logger in trainer.loggers:
        # TensorBoard's HPARAMS tab: the run's settings beside its final figures.
        logger.log_hyperparams(_hyperparameters(cfg), metrics=_hparams_metrics(metrics))
        logger.finalize("success")
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("Test accuracy %.4f (checkpoint %s)", metrics["test/acc"], best or "last weights")
    _end_process_group()
    return metrics


def _end_process_group() -> None:
    """Ends a DDP run's process group while the interpreter is whole. Lightning does so for
    NCCL only; a gloo group (DDP on CPUs) left to the interpreter's exit can abort the process
    with "terminate called without an active exception" after a completed run (its worker
    threads still hold tensors; pytorch issues #190489, #179291). Seen once in CI here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train_in_sweep(cfg: DictConfig, script: str) -> float:
    """One job of a sweep: `optimized_metric`, or NaN when the job fails. A failure (bad data,
    a NaN loss, out of memory, a bug) is logged and recorded in the job's metrics.json, and the
    other jobs go on; Ctrl-C or SIGTERM ends the whole sweep. `script` is the entry point's
    file, which the job's further DDP processes run."""
    try:
        if cfg.get("ckpt_path"):
            raise UserError("resume one run at a time: ckpt_path does not go with -m")
        recorded = _completed_record(cfg)
        if recorded is not None:  # requeued, or its sweep run again, after it completed
            log.info("This job's run completed before: its figures stand")
            return _figure(recorded, cfg.optimized_metric)
        own_checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if own_checkpoint.is_file():
            # A job started again in its own folder: a cluster job requeued after preemption
            # or time-out (hydra/launcher=slurm). It goes on from its last checkpoint.
            log.info("This job's folder holds %s: continuing from it", own_checkpoint)
            with open_dict(cfg):
                cfg.ckpt_path = str(own_checkpoint)
        if str(cfg.trainer.get("strategy", "")).startswith("ddp"):
            _ddp_processes_join_this_job(cfg, script)
        return _figure(train(cfg), cfg.optimized_metric)
    except StoppedBySignal as error:
        _record_failure(cfg, "stopped", error)
        log.error("%s", error)
        sys.exit(1)
    except Exception as error:
        _record_failure(cfg, "failed", error)
        log.error("this job failed: %s", error, exc_info=not isinstance(error, UserError))
        gc.collect()  # let the failed job's tensors go before the next job starts
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return float("nan")


def _figure(metrics: dict[str, Any], name: str) -> float:
    """A run's figure for a sweeper; NaN when the run has none (no validation ran, say)."""
    value = metrics[name]  # one of RUN_FIGURES: validate() checked optimized_metric
    return float("nan") if value is None else value


def _ddp_processes_join_this_job(cfg: DictConfig, script: str) -> None:
    """Lightning starts each further DDP process as `python <sys.argv> hydra.run.dir=<hydra.run
    .dir>`: in a sweep that would start the whole sweep again, elsewhere. Make it a plain run
    of this job, with its overrides (and the checkpoint it continues from), in its folder.
    Where `__main__` is a module run with `-m`, Lightning starts that module instead: the
    submitit launchers run each job in `python -m submitit.core._submit`, not this script."""
    hydra = HydraConfig.get()
    resumed = [f"ckpt_path={cfg.ckpt_path}"] if cfg.get("ckpt_path") else []
    sys.argv = [script, *hydra.overrides.task, *resumed]
    sys.modules["__main__"].__spec__ = None
    with read_write(hydra):
        hydra.run.dir = hydra.runtime.output_dir


def _record_failure(cfg: DictConfig, status: str, error: Exception) -> None:
    """The job's metrics.json says it failed or stopped; a completed run's record is kept."""
    if rank_zero_only.rank != 0 or _completed_record(cfg) is not None:
        return
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "error": f"{type(error).__name__}: {error}"}
    (output_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")


def _completed_record(cfg: DictConfig) -> dict[str, Any] | None:
    """The metrics.json of the run in cfg's folder, if that run completed."""
    record = read_record(Path(cfg.paths.output_dir) / "metrics.json")
    return record if record is not None and record.get("status") == "completed" else None


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """Lightning ends a SIGTERM outside training (sanity check, test) with exit status 0;
    make it a stop with a message and status 1. During training GracefulStop handles it."""
    try:
        yield
    except SIGTERMException as error:
        raise StoppedBySignal("stopped by SIGTERM outside training; nothing was saved") from error


def _hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the config that define a run's result, as plain values."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return {key: config[key] for key in ("data", "model", "trainer", "seed")}


def _hparams_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Final figures under `hp/` names: one point each, apart from the training curves."""
    return {
        "hp/" + name.replace("/", "_"): metrics[name]
        for name in RUN_FIGURES
        if metrics[name] is not None
    }


# Settings that change where data lives or how fast a run goes, not what it learns.
# (channels_last is not one: the optimizer's saved state keeps the layout it was made in,
# and torch's fused Adam then mixes up elements of the two layouts.)
DATA_PLACES = ("data_dir", "cache_dir", "download", "eval_batch_size", "on_device")
MODEL_SPEED = ("compile",)


def _check_unfinished(saved: dict[str, Any], checkpoint: Path, trainer: L.Trainer) -> None:
    """Lightning returns at once from a checkpoint at the trainer's limit: say so instead."""
    progress = saved.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    epochs = progress.get("current", {}).get("processed", 0)
    reached = []
    if trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
        reached.append(f"trainer.max_epochs={trainer.max_epochs}")
    if trainer.max_steps != -1 and saved.get("global_step", 0) >= trainer.max_steps:
        reached.append(f"trainer.max_steps={trainer.max_steps}")
    if reached:
        run = checkpoint.parent.parent
        go_on = "raise it to train on, or"
        if saved.get("schedule_laid_out_by"):  # _check_same_schedule would refuse that
            go_on = "its learning-rate schedule has ended (start a new run to train longer);"
        raise UserError(
            f"{run} has already reached {' and '.join(reached)}: {go_on} evaluate the run "
            f"with: python eval.py ckpt_path={run}"
        )


def _keep_saved_precision(cfg: DictConfig, saved: dict[str, Any]) -> bool:
    """A resumed run goes on in the precision it trained in, which checkpoints record, unless
    the command or an experiment sets one: the default depends on the machine (bf16 autocast on
    CPUs with bf16 instructions), and a run moved to another machine would change it midway.
    True when that changed the config's precision."""
    default = cfg.trainer.precision
    own = recorded_precision(saved)
    if not OmegaConf.is_interpolation(cfg.trainer, "precision") or own == default:
        return False
    with read_write(cfg), open_dict(cfg):
        cfg.trainer.precision = own
    log.info("Resuming in the run's own precision, %s (this machine's default: %s)", own, default)
    return True


def _check_same_settings(
    saved: dict[str, Any],
    checkpoint: Path,
    datamodule: L.LightningDataModule,
    model: L.LightningModule,
) -> None:
    """A run resumes with the settings it was trained with (`saved`, read from `checkpoint`),
    or not at all."""
    now = {"model": dict(model.hparams), "data": dict(datamodule.hparams)}
    then = {
        "model": saved["hyper_parameters"],
        "data": saved.get("datamodule_hyper_parameters", {}),
    }
    for part, component in (("model", model), ("data", datamodule)):  # keys added later
        then[part] = _defaults(type(component)) | then[part]
    for settings in (now, then):
        settings["data"] = {k: v for k, v in settings["data"].items() if k not in DATA_PLACES}
        settings["model"] = {k: v for k, v in settings["model"].items() if k not in MODEL_SPEED}
    differences = {
        key: pair for key, pair in sorted(_paired(then, now).items()) if pair[0] != pair[1]
    }
    if differences:
        overrides = checkpoint.parent.parent / ".hydra" / "overrides.yaml"
        raise UserError(
            f"cannot resume from {checkpoint}: it was trained with other settings "
            f"({_listed(differences)}). "
            f"{_how_to_resume(differences)} (the run's overrides: {overrides})"
        )


def _check_same_validation_images(
    saved: dict[str, Any], checkpoint: Path, datamodule: L.LightningDataModule
) -> None:
    """A run resumes on the images it was validated on. Other data (another copy, a layout
    that lists the images in another order, a folder whose files changed) draws another split,
    which would train on images the run validated on and selected its best epoch by."""
    then = saved.get(type(datamodule).__qualname__, {}).get("validation_digest")
    if then is None:  # checkpoints of versions before the record
        return
    datamodule.prepare_data()
    datamodule.setup("fit")  # done once: the fit's own setup finds the data loaded
    if datamodule.validation_digest != then:
        trained_on = saved.get("datamodule_hyper_parameters", {}).get("data_dir")
        raise UserError(
            f"cannot resume from {checkpoint}: the data in {datamodule.data_dir} gives other "
            f"validation images than the run's (it was trained on {trained_on}, with those "
            "files as they were then; or the images decode otherwise here, with another Pillow), "
            "so it would train on images it validated on. Resume with the run's data "
            "(data.data_dir), or start a new run"
        )


def _check_same_schedule(saved: dict[str, Any], checkpoint: Path, trainer: L.Trainer) -> None:
    """A learning-rate schedule laid out over the run's steps (`total_steps`) keeps its length:
    a resume with another would jump to another point of the schedule (or, for OneCycleLR,
    fail when it runs past its end)."""
    laid_out_by = saved.get("schedule_laid_out_by") or {}
    now = run_length_settings(trainer)
    differences = {
        key: (value, now[key]) for key, value in laid_out_by.items() if now[key] != value
    }
    if differences:
        again = [
            f"++trainer.{key}={then}"
            if key != "processes"  # not a trainer key
            else f"{then} processes (trainer.devices x trainer.num_nodes)"
            for key, (then, _) in differences.items()
        ]
        raise UserError(
            f"cannot resume from {checkpoint}: its model.scheduler was laid out over the run's "
            f"length, and these trainer settings change it ({_listed(differences)}). A "
            "schedule's length is fixed when the run starts: resume with "
            f"{' '.join(again)}, or start a new run"
        )


def _listed(differences: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key} is {a!r} there, {b!r} now" for key, (a, b) in differences.items())


def _defaults(component: type) -> dict[str, Any]:
    parameters = inspect.signature(component.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _how_to_resume(differences: dict[str, tuple[Any, Any]]) -> str:
    """Hydra overrides that give the checkpoint's settings again: `++key=value`, or `~key` where
    the checkpoint has none (the key came later: its default applies). Plain values only."""
    overrides = []
    for key, (then, now) in differences.items():
        items = then if isinstance(then, list) else [then]
        if now is None or not all(_plain(item) for item in items):
            return "Give the run's own overrides again"
        rendered = f"~{key}" if then is None else f"++{key}={json.dumps(then)}"
        overrides.append(shlex.quote(rendered))
    return "Resume with: " + " ".join(overrides)


def _plain(value: Any) -> bool:
    """A value that JSON writes as Hydra reads it back."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return value.isascii() and not set(value) & set("\\'\"$")
    return value is None or isinstance(value, bool | int)


def _paired(then: dict[str, Any], now: dict[str, Any], prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (then, now)} over both nested dicts."""
    pairs = {}
    for key in then.keys() | now.keys():
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            pairs |= _paired(a, b, f"{prefix}{key}.")
        else:
            pairs[f"{prefix}{key}"] = (a, b)
    return pairs
