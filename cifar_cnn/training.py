"""One training run from a composed config: build, fit, test the best checkpoint, record.

`model.optimizer.lr` and every other hyperparameter reach their objects here, through
`build`: `instantiate(cfg.model)` makes the ImageClassifier, which makes its optimizer from
that mapping in `configure_optimizers` (module.py).
"""

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from cifar_cnn.provenance import provenance
from cifar_cnn.pruning import PRUNED_AT_EPOCH, TrialPruning
from cifar_cnn.resume import Resume, RunConfig, composed_choices
from cifar_cnn.runtime import keep_freed_memory, skip_nvml_probe
from cifar_cnn.stopping import GracefulStop, stops_on_sigterm
from cifar_cnn.validation import RUN_METRICS, validate

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The data, model and trainer that the config describes.

    A callback or logger set to null (`callbacks.model_checkpoint=null`) is left out, and
    the learning-rate monitor too when there is no logger.
    """
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    # GracefulStop after the others (Lightning runs the checkpoint callbacks after all): a
    # stop's last.ckpt holds the batch's state after their work on it (Lookahead's pull).
    callbacks.sort(key=lambda callback: isinstance(callback, GracefulStop))
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    if not loggers:  # the learning rate has nowhere to go (Lightning would stop the run)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains, tests the best checkpoint, writes `metrics.json` in the run folder, returns it."""
    started = time.perf_counter()
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    validate(cfg)
    resume = Resume(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if resume and resume.keep_precision(cfg):
        validate(cfg)  # again, in that precision (gradient clipping under mixed precision)
    keep_freed_memory()
    skip_nvml_probe()
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    trainer.callbacks.append(
        RunConfig(cfg, resume.recorded()[1] if resume else composed_choices(cfg))
    )
    if resume:  # checked before the run's files are touched: a refusal loses nothing
        resume.check(datamodule, model, trainer)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP: one process writes the run's files
        log.info("Run folder %s", output_dir)
        (output_dir / "metrics.json").unlink(missing_ok=True)  # no stale result of earlier runs
        info = json.dumps(provenance(cfg.seed, trainer.strategy.root_device), indent=2) + "\n"
        (output_dir / "run_info.json").write_text(info)

    # Log lines print above progress bars instead of through them. Checkpoints are loaded
    # weights-only: no code in them runs (ours hold plain values only).
    with logging_redirect_tqdm(), stops_on_sigterm(), warnings.catch_warnings():
        if resume:  # the run's own checkpoints are in its folder, as they should be
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
            # Our training batches go on from Lightning's restored count (EpochPermutation).
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that")
        fit_started = time.perf_counter()
        checkpoint = resume.checkpoint if resume else None
        trainer.fit(model, datamodule, ckpt_path=checkpoint, weights_only=True)
        fit_time_s = round(time.perf_counter() - fit_started, 1)
        stopped_early = _stopped_early(trainer)  # before the test restores callbacks' states
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        # The module's record, not callback_metrics: a run resumed from an epoch's last batch
        # ends without a validation (Lightning counts that epoch as done). The state, not
        # update_count: a resumed run restores the one, not the other. None (JSON null) when
        # no validation ran (limit_val_batches=0, say).
        best_so_far = float(model.val_acc_best.max_value)
        val_acc_best = best_so_far if math.isfinite(best_so_far) else None
        # The best checkpoint when there is one; fast_dev_run saves none: test the last weights.
        [test_metrics] = trainer.test(
            model, datamodule, ckpt_path="best" if best else None, weights_only=True
        )

    pruned_at = next(
        (c.pruned_at_epoch for c in trainer.callbacks if isinstance(c, TrialPruning)), None
    )
    pruned = {} if pruned_at is None else {PRUNED_AT_EPOCH: pruned_at}
    metrics = {
        "status": "pruned" if pruned else "completed",
        **pruned,
        **stopped_early,
        "val/acc_best": val_acc_best,
        **{key: float(value) for key, value in test_metrics.items()},
        "epochs": trainer.current_epoch,
        # trainer.fit: set-up on the device (whitening, compiling), training and validation.
        "fit_time_s": fit_time_s,
        "best_checkpoint": best,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    for logger in trainer.loggers:
        # TensorBoard's HPARAMS tab: the run's settings beside its final metrics.
        logger.log_hyperparams(_hyperparameters(cfg), metrics=_hparams_metrics(metrics))
        logger.finalize("success")
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("Test accuracy %.4f (checkpoint %s)", metrics["test/acc"], best or "last weights")
    _end_process_group()
    return metrics


def _stopped_early(trainer: L.Trainer) -> dict[str, int]:
    """`stopped_early_at_epoch`: the last epoch trained when an EarlyStopping callback ended
    the run before trainer.max_epochs; nothing otherwise."""
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch:
            return {"stopped_early_at_epoch": callback.stopped_epoch}
    return {}


def _end_process_group() -> None:
    """Ends a DDP run's process group while the interpreter is whole. Lightning does so for
    NCCL only; a gloo group (DDP on CPUs) left to the interpreter's exit can abort a completed
    run with "terminate called without an active exception" (its worker threads still hold
    tensors; pytorch/pytorch#190489)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the config that define a run's result, as plain values."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return {key: config[key] for key in ("data", "model", "trainer", "seed")}


def _hparams_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Final metrics under `hp/` names: one point each, apart from the training curves."""
    return {
        "hp/" + name.replace("/", "_"): metrics[name]
        for name in RUN_METRICS
        if metrics[name] is not None
    }
