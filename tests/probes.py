"""Callbacks that tests add to real runs from the command line (`+callbacks.<name>._target_=`)."""

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar_cnn.checkpoints import AtomicCheckpointIO


class ShardProbe(L.Callback):
    """Writes `shard_rank<R>.json` in the run folder: for each training step, a fingerprint
    of each image its process trained on (the sum of its 8-bit pixel values)."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images, _ = batch  # floats in [0, 1]
        fingerprints = (images * 255).round().to(torch.int64).sum(dim=(1, 2, 3))
        self.steps.append(sorted(fingerprints.tolist()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / f"shard_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))


class InterruptAtStep(L.Callback):
    """Sends this process SIGINT (Ctrl-C) once training reaches `step`, at the batch `batch` of
    the epoch if given (the batches of an accumulation window share a step). Not in a run's
    continuation, whose config (the run's own) holds this callback too."""

    def __init__(self, step: int, batch: int | None = None) -> None:
        self.step = step
        self.batch = batch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if trainer.ckpt_path is not None:
            return
        if trainer.global_step == self.step and self.batch in (None, batch_idx):
            self.step = None  # once
            signal.raise_signal(signal.SIGINT)


class KillAtStep(L.Callback):
    """Kills this process with SIGKILL (as the kernel's OOM killer does) once training reaches
    `step`; not in the run's continuation."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if trainer.ckpt_path is None and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordTraining(L.Callback):
    """Appends each step's number and batch labels, and each epoch's training metrics, to the
    file `to`."""

    def __init__(self, to: str) -> None:
        self.to = Path(to)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._write(f"{trainer.global_step} {batch[1].tolist()}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self._write(f"{metrics['train/loss_epoch'].item()} {metrics['train/acc_epoch'].item()}")

    def _write(self, line: str) -> None:
        with self.to.open("a") as record:
            record.write(line + "\n")


class RecordValidations(L.Callback):
    """Appends the step of each validation (not the sanity check) to the file `to`."""

    def __init__(self, to: str) -> None:
        self.to = Path(to)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            with self.to.open("a") as record:
                record.write(f"{trainer.global_step}\n")


class ZeroWeightsFrom(L.Callback):
    """Zeroes the net's weights as epoch `epoch` starts: its dead ReLUs learn nothing after,
    and it predicts one class, so that an earlier epoch stays the best."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for parameter in pl_module.net.parameters():
                    parameter.zero_()


class SaveStepWeights(L.Callback):
    """Saves to the file `to`, as training ends, the module's weights after each step."""

    def __init__(self, to: str) -> None:
        self.to = Path(to)
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.steps, self.to)


class SlowBatches(L.Callback):
    """Makes each training batch take `seconds` longer: a tiny data set's epoch lasts long
    enough to be interrupted in its middle."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


class _SlowTorchWrites(TorchCheckpointIO):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        super().save_checkpoint(*args, **kwargs)
        time.sleep(self.seconds)  # the checkpoint written, not yet renamed into place


class SlowCheckpointIO(AtomicCheckpointIO, _SlowTorchWrites):
    """AtomicCheckpointIO, its own code unchanged, with `seconds` between writing a checkpoint's
    temporary file and renaming it into place: a process can be killed mid-write."""
