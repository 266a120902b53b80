"""Stopping a run so that it continues exactly: Ctrl-C and SIGTERM save last.ckpt and name
the command that goes on (`python train.py ckpt_path=<run>`, resume.py)."""

import os
import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from cifar_cnn import steps
from cifar_cnn.errors import StoppedBySignal
from cifar_cnn.resume import resumed_run


class GracefulStop(Callback):
    """On SIGINT (Ctrl-C) or SIGTERM: finish the batch, save last.ckpt, stop with status 1.

    The stop waits for a batch after which a resume is exact: one that steps the optimizer
    (checkpoints keep no gradients) and that no mid-epoch validation follows. In an epoch's
    last batch or its validation it stops at the epoch's end, with its validation and
    checkpoints (Lightning would count an epoch saved at its last batch as done, and skip
    that validation on resume). It runs after the other callbacks (`training.build`), so the
    batch's state is theirs too. A second Ctrl-C stops at once, without saving.
    """

    def __init__(self) -> None:
        self._received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._stopped_at_epoch_end: str | None = None  # where, for on_train_end's message

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in on_fit_start: Lightning installs its own SIGTERM handler in between.
        self._received = self._stopped_at_epoch_end = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._note)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self._received is None or batch_idx + 1 == trainer.num_training_batches:
            return  # an epoch's last batch: on_train_epoch_end stops
        exact = steps.steps_the_optimizer(trainer, batch_idx)
        if not exact or steps.validates_after(trainer, batch_idx):
            return  # a later batch stops
        path = _save_last(trainer)
        raise self._stopped(f"at step {trainer.global_step} (epoch {trainer.current_epoch})", path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._received is None or not steps.may_stop_after_epoch(trainer):
            return  # short of min_epochs or min_steps Lightning would go on: the next batch stops
        if not steps.training_ends_after_epoch(trainer):
            epoch, step = trainer.current_epoch, trainer.global_step
            self._stopped_at_epoch_end = f"at the end of epoch {epoch} (step {step})"
        # Training ends as by early stopping: the checkpoint callbacks, called after this one,
        # still save the epoch; then on_train_end saves last.ckpt and raises.
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self._stopped_at_epoch_end is not None:  # saved after the checkpoint callbacks'
            raise self._stopped(self._stopped_at_epoch_end, _save_last(trainer))
        if self._received is not None:  # came during the last epoch's end: training is done
            raise StoppedBySignal(
                f"stopped by {self._received} at the end of training; its checkpoints are "
                "complete, the test was not run"
            )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _stopped(self, where: str, checkpoint: Path) -> StoppedBySignal:
        return StoppedBySignal(
            f"stopped by {self._received} {where}; saved {checkpoint}. "
            f"Continue with: {continue_command(checkpoint)}"
        )

    def _note(self, signum: int, frame: Any) -> None:
        if self._received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self._received = signal.Signals(signum).name

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _save_last(trainer: L.Trainer) -> Path:
    """Saves all of the run's state (weights, optimizer, loops) as last.ckpt."""
    checkpoint = trainer.checkpoint_callback
    folder = Path(checkpoint.dirpath) if checkpoint else Path(trainer.default_root_dir)
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path, weights_only=False)
    return path


def continue_command(checkpoint: Path) -> str:
    """The command that continues this run: `python train.py ckpt_path=<run>`, which takes
    the run's own settings back (resume.py); for a job of a sweep, the sweep's command again,
    into its folder (which goes on with it)."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is not None and hydra.mode == RunMode.MULTIRUN:
        sweep = Path(hydra.sweep.dir)
        if not (sweep / "multirun.yaml").is_file():  # Optuna's sweeper writes none
            return f"the search's command again (its study in {sweep} goes on)"
        recorded = OmegaConf.load(sweep / "multirun.yaml").hydra.overrides
        launch = [
            o for o in recorded.hydra if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))
        ]
        command = ["python", "train.py", "-m", *recorded.task, *launch, f"hydra.sweep.dir={sweep}"]
        return shlex.join(command)
    run = resumed_run(checkpoint) or checkpoint
    inside = Path(os.path.relpath(run))  # short where the run is below the current folder
    shown = run if inside.parts[:1] == ("..",) else inside
    return shlex.join(["python", "train.py", f"ckpt_path={shown}"])


@contextmanager
def stops_on_sigterm() -> Iterator[None]:
    """Lightning ends a SIGTERM outside training (sanity check, test) with exit status 0;
    make it a stop with a message and status 1. During training GracefulStop handles it."""
    try:
        yield
    except SIGTERMException as error:
        raise StoppedBySignal("stopped by SIGTERM outside training; nothing was saved") from error
