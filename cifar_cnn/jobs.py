"""A training run as one job of a Hydra sweep: failures recorded and survived, a job
started again in its folder goes on, and DDP processes that join the job, not the sweep."""

import gc
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict, read_write

from cifar_cnn.errors import StoppedBySignal, UserError
from cifar_cnn.files import finished_record, record_failure
from cifar_cnn.resume import continued_config
from cifar_cnn.training import train

log = logging.getLogger(__name__)


def train_in_sweep(cfg: DictConfig, script: str) -> float:
    """One job of a sweep: `optimized_metric`, or NaN when the job fails. A failure (bad data,
    a NaN loss, out of memory, a bug) is logged and recorded in the job's metrics.json, and the
    other jobs go on; Ctrl-C or SIGTERM ends the whole sweep. `script` is the entry point's
    file, which the job's further DDP processes run."""
    try:
        if cfg.get("ckpt_path"):
            raise UserError("resume one run at a time: ckpt_path does not go with -m")
        recorded = finished_record(Path(cfg.paths.output_dir))
        if recorded is not None:  # requeued, or its sweep run again, after it completed
            log.info("This job's run completed before: its metrics stand")
            return _metric(recorded, cfg.optimized_metric)
        own_checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if own_checkpoint.is_file():
            # A job started again in its own folder: a cluster job requeued after preemption
            # or time-out (hydra/launcher=slurm). It goes on from its last checkpoint.
            log.info("This job's folder holds %s: continuing from it", own_checkpoint)
            with open_dict(cfg):
                cfg.ckpt_path = str(own_checkpoint)
            cfg = continued_config(cfg)  # the job's recorded config, its overrides on top
        if str(cfg.trainer.get("strategy", "")).startswith("ddp"):
            _ddp_processes_join_this_job(cfg, script)
        return _metric(train(cfg), cfg.optimized_metric)
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


def _metric(metrics: dict[str, Any], name: str) -> float:
    """A run's metric for a sweeper; NaN when the run has none (no validation ran, say)."""
    value = metrics[name]  # one of RUN_METRICS: validate() checked optimized_metric
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
    if rank_zero_only.rank == 0:
        record_failure(Path(cfg.paths.output_dir), status, f"{type(error).__name__}: {error}")
