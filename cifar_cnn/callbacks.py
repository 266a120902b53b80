"""Lightning callbacks of this project."""

import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from cifar_cnn.data import to_float_images
from cifar_cnn.errors import UserError
from cifar_cnn.module import steps_the_optimizer

log = logging.getLogger(__name__)


class EpochSummary(Callback):
    """Logs one plain line per epoch: its number, metrics and duration.

    Readable in log files and batch jobs, where progress bars are off. Epochs count from 0,
    as in Lightning's progress bar and the checkpoint names (epoch_009.ckpt is the 10th).
    """

    def __init__(self, keys: tuple[str, ...] = ("train/loss_epoch", "val/loss", "val/acc")) -> None:
        self.keys = keys
        self._epoch_start = 0.0
        self._validated = False  # this epoch: else val/ figures are an earlier epoch's

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
        figures = "  ".join(f"{key} {metrics[key]:.4f}" for key in keys)
        seconds = time.perf_counter() - self._epoch_start
        epoch = trainer.current_epoch
        log.info(
            f"epoch {epoch:03d} ({epoch + 1}/{trainer.max_epochs})  {figures}  ({seconds:.1f} s)"
        )


class TrainingStopped(UserError):
    """Training stopped early on purpose; the message says why and what was kept."""


class StoppedBySignal(TrainingStopped):
    """Ctrl-C or SIGTERM: the user or the scheduler wants the whole process to end."""


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


class GracefulStop(Callback):
    """On SIGINT (Ctrl-C) or SIGTERM: finish the batch, save last.ckpt, stop with status 1.

    A signal in an epoch's last batch or its validation stops at the epoch's end instead, with
    its validation and checkpoints: Lightning would count an epoch saved at its last batch as
    done and skip that validation on resume, and an end-of-epoch checkpoint resumes exactly.
    For the same reasons the stop waits for the end of a gradient accumulation window
    (checkpoints keep no gradients) and, where a mid-epoch validation follows the batch
    (`val_check_interval`), for the next batch (at worst, the epoch's end). It runs after the
    other callbacks (`training.build`), so that the batch's state is theirs too.
    A second Ctrl-C stops at once, without saving.
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
        if not steps_the_optimizer(trainer, batch_idx) or _validates_after(trainer, batch_idx):
            return  # a later batch stops
        path = _save_last(trainer)
        raise self._stopped(f"at step {trainer.global_step} (epoch {trainer.current_epoch})", path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._received is None or not _may_stop_after_this_epoch(trainer):
            return  # short of min_epochs or min_steps Lightning would go on: the next batch stops
        if not _training_ends_after_this_epoch(trainer):
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
            f"Continue with: {_continue_command(checkpoint)}"
        )

    def _note(self, signum: int, frame: Any) -> None:
        if self._received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self._received = signal.Signals(signum).name

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class RandomState(Callback):
    """Saves torch's global random state in checkpoints and restores it on resume.

    Dropout and augmentation draw from it: with it restored, a resumed run continues exactly as
    if it had never stopped.
    """

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["random_state"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("random_state")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class MovedRunFolder(Callback):
    """Resuming a run in its folder after the folder was moved or copied (to another disk or
    machine): rewrites its checkpoint callbacks' records (best and last files, best-k scores)
    from the old folder to the new one before they are loaded. Lightning drops those records
    when the folder differs: the best epoch so far would be forgotten, the next one tested
    instead, and the old best file left behind."""

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        resumed_from = Path(os.path.realpath(trainer.ckpt_path)).parent
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if not state or state.get("dirpath") in (None, callback.dirpath):
                continue
            if callback.dirpath and Path(callback.dirpath) == resumed_from:  # the run's own
                states[callback.state_key] = _moved(state, state["dirpath"], callback.dirpath)


def _moved(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A ModelCheckpoint's state with the paths under `old` moved to `new`."""

    def move(path: str) -> str:
        return (
            str(Path(new) / Path(path).relative_to(old)) if Path(path).is_relative_to(old) else path
        )

    return state | {
        "dirpath": new,
        "best_model_path": move(state["best_model_path"]),
        "kth_best_model_path": move(state.get("kth_best_model_path", "")),
        "last_model_path": move(state.get("last_model_path", "")),
        "best_k_models": {
            move(path): score for path, score in state.get("best_k_models", {}).items()
        },
    }


class WhitenStem(Callback):
    """airbench's data-dependent start: before training, the net's stem whitens the 2x2
    patches of the first `images` training images (`whiten_stem` of nets.FastCNN); its bias
    learns for the first `bias_epochs` epochs, then stays. A resumed run takes the stem from
    its checkpoint, which Lightning loads after this sets it."""

    def __init__(self, images: int = 5000, bias_epochs: int = 3) -> None:
        self.images = images
        self.bias_epochs = bias_epochs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = pl_module.net
        if not hasattr(net, "whiten_stem"):
            raise UserError(
                f"callbacks.whiten_stem needs a net with a whiten_stem method (nets.FastCNN); "
                f"{type(net).__name__} has none"
            )
        train_images = trainer.datamodule.data_train.images[: self.images]
        net.whiten_stem(to_float_images(train_images))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # No gradient, no step (nor momentum or decay). Not requires_grad=False: DDP expects
        # the parameters it was given to keep getting gradients.
        if trainer.current_epoch >= self.bias_epochs:
            pl_module.net.stem.bias.grad = None


class Lookahead(Callback):
    """airbench's lookahead: every `every_n_steps` steps the weights move to a running average
    of themselves (the average `decay` of the way back, `decay` growing as the cube of the
    run's progress up to `final_decay`); at the last step they become that average.

    Not Lightning's WeightAveraging: that keeps the average beside the net, while this writes
    it back into the net, which trains on from there. The average is saved in checkpoints.
    """

    def __init__(self, every_n_steps: int = 5, final_decay: float = 0.95**5) -> None:
        self.every_n_steps = every_n_steps
        self.final_decay = final_decay
        self._average: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self._total_steps = 0
        self._averaged_at = 0  # the last step seen: batches of an accumulation window share one

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total_steps = trainer.estimated_stepping_batches
        self._averaged_at = trainer.global_step
        # The net's floating-point state, as airbench: parameters and BatchNorm statistics
        # (views of the net's own tensors: writing them writes the net).
        self._weights = [t for t in pl_module.net.state_dict().values() if t.is_floating_point()]
        if self._average:  # resumed: the average from the checkpoint
            pairs = zip(self._average, self._weights, strict=True)
            self._average = [average.to(weight.device) for average, weight in pairs]
        else:
            self._average = [weight.clone() for weight in self._weights]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        step, total = trainer.global_step, self._total_steps
        if step == self._averaged_at:  # no optimizer step since: gradients accumulate
            return
        self._averaged_at = step
        last = step >= total
        if step % self.every_n_steps and not last:
            return
        with torch.no_grad():
            if step % self.every_n_steps == 0:
                decay = self.final_decay * min(step / total, 1.0) ** 3
                torch._foreach_lerp_(self._average, self._weights, 1 - decay)
            torch._foreach_copy_(self._weights, self._average)  # the last step: the net becomes it

    def state_dict(self) -> dict[str, Any]:
        return {"average": self._average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._average = list(state_dict["average"])


def _validates_after(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether a mid-epoch validation follows the batch, by Lightning's batch rule (not its
    time rule, `val_check_interval` as a duration)."""
    every, epochs = trainer.val_check_batch, trainer.check_val_every_n_epoch
    if not isinstance(every, int) or not trainer.enable_validation:  # inf: no length
        return False
    if epochs is not None and (trainer.current_epoch + 1) % epochs:
        return False
    count = batch_idx if epochs is not None else trainer.fit_loop.epoch_loop.total_batch_idx
    return (count + 1) % every == 0


def _save_last(trainer: L.Trainer) -> Path:
    """Saves all of the run's state (weights, optimizer, loops) as last.ckpt."""
    checkpoint = trainer.checkpoint_callback
    folder = Path(checkpoint.dirpath) if checkpoint else Path(trainer.default_root_dir)
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path, weights_only=False)
    return path


def _may_stop_after_this_epoch(trainer: L.Trainer) -> bool:
    """At an epoch's end: whether Lightning honours should_stop (min_epochs and min_steps met)."""
    min_epochs, min_steps = trainer.min_epochs or 0, trainer.min_steps or 0
    return trainer.current_epoch + 1 >= min_epochs and trainer.global_step >= min_steps


def _training_ends_after_this_epoch(trainer: L.Trainer) -> bool:
    """At an epoch's end: whether Lightning stops here (max_epochs, max_steps, should_stop)."""
    last_epoch = trainer.current_epoch + 1 == trainer.max_epochs
    return last_epoch or trainer.global_step == trainer.max_steps or trainer.should_stop


def _continue_command(checkpoint: Path) -> str:
    """The train.py command that resumes this run: its own overrides, and the checkpoint; for
    a job of a sweep, the sweep's command again, into its folder (which goes on with the sweep:
    SweepSummary, train_in_sweep)."""
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
    overrides = hydra.overrides.task if hydra is not None else []
    kept = [o for o in overrides if not o.startswith("ckpt_path=")]
    return shlex.join(["python", "train.py", *kept, f"ckpt_path={checkpoint}"])
