"""A training run from a composed config: fit, test the best checkpoint, record the figures."""

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

# The figures every run reports; the HPARAMS tab of TensorBoard shows them beside the config.
REPORTED_METRICS = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains, tests the best checkpoint, writes `metrics.json` in the run folder, returns it."""
    started = time.perf_counter()
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers: list[Logger] = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for logger in trainer.loggers:
        # Declaring the reported metrics makes TensorBoard's HPARAMS tab show their values.
        logger.log_hyperparams(_hyperparameters(cfg), metrics=dict.fromkeys(REPORTED_METRICS, 0.0))

    # Log lines print above progress bars instead of through them. Checkpoints are loaded
    # weights-only: no code in them runs (ours hold plain values only).
    with logging_redirect_tqdm():
        trainer.fit(model, datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        # The best checkpoint when there is one; fast_dev_run saves none: test the last weights.
        [test_metrics] = trainer.test(
            model, datamodule, ckpt_path="best" if best else None, weights_only=True
        )

    metrics = {
        **{key: fit_metrics[key] for key in REPORTED_METRICS if key in fit_metrics},
        **{key: float(value) for key, value in test_metrics.items()},
        "epochs": trainer.current_epoch,
        "best_checkpoint": best,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("Test accuracy %.4f (checkpoint %s)", metrics["test/acc"], best or "last weights")
    return metrics


def _hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the config that define a run's result, as plain values."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return {key: config[key] for key in ("data", "model", "trainer", "seed")}
