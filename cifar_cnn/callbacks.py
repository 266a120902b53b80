"""Lightning callbacks of this project."""

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class EpochSummary(Callback):
    """Logs one plain line per epoch: its number, metrics and duration.

    Readable in log files and batch jobs, where progress bars are off. Epochs count from 0,
    as in Lightning's progress bar and the checkpoint names (epoch_009.ckpt is the 10th).
    """

    def __init__(self, keys: tuple[str, ...] = ("train/loss_epoch", "val/loss", "val/acc")) -> None:
        self.keys = keys
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        figures = "  ".join(f"{key} {metrics[key]:.4f}" for key in self.keys if key in metrics)
        seconds = time.perf_counter() - self._epoch_start
        epoch = trainer.current_epoch
        log.info(
            f"epoch {epoch:03d} ({epoch + 1}/{trainer.max_epochs})  {figures}  ({seconds:.1f} s)"
        )
