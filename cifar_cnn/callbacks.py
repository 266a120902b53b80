"""Callbacks that watch every run (one log line per epoch, a stop on a diverging loss), and
the exponential moving average of the weights that a recipe may add.

The callbacks that stopping and resuming need live in resume.py, the fast recipe's in
fast_recipe.py.
"""

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from cifar_cnn.errors import TrainingStopped

log = logging.getLogger(__name__)


class EpochSummary(Callback):
    """Logs one plain line per epoch: its number, metrics and duration.

    Readable in log files and batch jobs, where progress bars are off. Epochs count from 0,
    as in Lightning's progress bar and the checkpoint names (epoch_009.ckpt is the 10th).
    """

    def __init__(self, keys: tuple[str, ...] = ("train/loss_epoch", "val/loss", "val/acc")) -> None:
        self.keys = keys
        self._epoch_start = 0.0
        self._validated = False  # this epoch: else val/ metrics are an earlier epoch's

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()  # a run resumed mid-epoch starts no epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:  # DDP: one line per epoch, from the first process
            return
        metrics = trainer.callback_metrics
        keys = [k for k in self.keys if k in metrics and (self._validated or "val/" not in k)]
        values = "  ".join(f"{key} {metrics[key]:.4f}" for key in keys)
        seconds = time.perf_counter() - self._epoch_start
        epoch = trainer.current_epoch
        log.info(
            f"epoch {epoch:03d} ({epoch + 1}/{trainer.max_epochs})  {values}  ({seconds:.1f} s)"
        )


class FiniteLoss(Callback):
    """Stops the run, naming the step and learning rate, once the training loss is NaN or inf.

    The losses are read from the device every `trainer.log_every_n_steps` steps, before each
    validation and before each checkpoint, not every step: a read per step makes a GPU
    wait for its queue to drain, step after step. No checkpoint is written after a non-finite
    loss.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, int, int, float]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        step = (outputs["loss"].detach(), trainer.global_step, trainer.current_epoch, lr)
        self._pending.append(step)
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self._check()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending.clear()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check()

    def _check(self) -> None:
        """One read for all the steps since the last check."""
        if not self._pending:
            return
        losses = torch.stack([loss for loss, *_ in self._pending])
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            self._pending.clear()
            return
        first = int((~finite).nonzero()[0])
        _, step, epoch, lr = self._pending[first]
        self._pending.clear()
        raise TrainingStopped(
            f"the training loss became {losses[first].item()} at step {step} (epoch {epoch}) "
            f"with learning rate {lr:g}: training cannot recover from that; try a smaller "
            "model.optimizer.lr"
        )


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights (`decay` per optimizer step):
    validation, checkpoints and so the test of the best checkpoint, eval.py and `predict=` see
    the average; training goes on with the current weights, which checkpoints keep beside it
    for resumes.

    One change to Lightning's callback: it puts a checkpoint's current weights back into the
    module whenever its average exists, so `trainer.test(ckpt_path="best")` after fit would
    test the best epoch's current weights. Here they come back only when fit resumes.
    """

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
