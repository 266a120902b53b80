"""Stopping and resuming a run: `python train.py <its overrides> ckpt_path=<run folder>`.

The contract:
- A checkpoint holds the weights, the optimizer and schedule, Lightning's loop counters, the
  callbacks' state (best checkpoint, lookahead average), torch's random state (RandomState),
  the epoch's training metrics so far, the run's precision, the trainer settings its schedule
  was laid out over, and a digest of its validation images.
- A resume continues in the run's own folder, from its `last.ckpt`, and refuses up front,
  before any file of the run is touched: other model or data settings (but those of place
  and speed), other data (another validation split), another length of a scheduled run, and
  a run that has already reached its end. It keeps the run's precision unless told one.
- Exact: from any epoch's end (even after SIGKILL) and from a stop by Ctrl-C or SIGTERM
  (GracefulStop saves a batch that steps the optimizer; the data module skips the epoch's
  batches already trained), the run ends with the weights and metrics of an uninterrupted
  one on the same machine. Not exact: TensorBoard points logged after the last checkpoint are
  logged again, and a run moved to other hardware or library versions computes otherwise.
"""

import json
import logging
import math
import os
import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cifar_cnn import steps
from cifar_cnn.checkpoints import read_checkpoint, validation_digest
from cifar_cnn.errors import StoppedBySignal, UserError

log = logging.getLogger(__name__)

# Settings that change where data lives or how fast a run goes, not what it learns.
# (channels_last is not one: the optimizer's saved state keeps the layout it was made in,
# and torch's fused Adam then mixes up elements of the two layouts.)
DATA_PLACES = ("data_dir", "cache_dir", "download", "eval_batch_size", "on_device")
MODEL_SPEED = ("compile",)


def resumed_run(checkpoint: str | Path) -> Path | None:
    """The run folder that `checkpoint` continues: given as the folder itself or as its
    checkpoints/last.ckpt. None for anything else."""
    path = Path(checkpoint).expanduser()
    if path.is_file() and path.name == "last.ckpt" and path.parent.name == "checkpoints":
        path = path.parent.parent
    return path if (path / "checkpoints" / "last.ckpt").is_file() else None


def run_folder(checkpoint: str | None, new_folder: str) -> str:
    """`hydra.run.dir`: the folder of the run that `ckpt_path` resumes, else `new_folder`."""
    resumed = resumed_run(checkpoint) if checkpoint else None
    return str(resumed) if resumed else new_folder


def config_subfolder(checkpoint: str | None) -> str:
    """Hydra's record of a run: a resumed run keeps the first record and adds its own."""
    if checkpoint and resumed_run(checkpoint):
        return f".hydra/resumed_{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"
    return ".hydra"


class Resume:
    """The checkpoint a run continues from, and the checks it must pass first."""

    def __init__(self, ckpt_path: str) -> None:
        run = resumed_run(ckpt_path)
        if run is None:
            raise UserError(
                f"cannot resume from {ckpt_path}: ckpt_path takes a run folder "
                "(outputs/runs/<run>) or its checkpoints/last.ckpt; to start a new run from "
                "other weights, load them in code"
            )
        self.checkpoint = run / "checkpoints" / "last.ckpt"
        self.saved = read_checkpoint(self.checkpoint)

    def keep_precision(self, cfg: DictConfig) -> bool:
        """The run goes on in the precision it trained in, unless the command or an experiment
        sets one: the default depends on the machine, and a run moved to another one would
        change it midway. True when that changed the config."""
        default, own = cfg.trainer.precision, self.saved["precision"]
        if not OmegaConf.is_interpolation(cfg.trainer, "precision") or own == default:
            return False
        with read_write(cfg), open_dict(cfg):
            cfg.trainer.precision = own
        log.info("Resuming in the run's own precision, %s (this machine's: %s)", own, default)
        return True

    def check(
        self, datamodule: L.LightningDataModule, model: L.LightningModule, trainer: L.Trainer
    ) -> None:
        """Refuses the resume unless it continues the run as it was (this loads the data)."""
        self.check_same_settings(datamodule, model)
        self._check_same_schedule(trainer)
        self._check_unfinished(trainer)
        self._check_same_validation_images(datamodule)

    def check_same_settings(
        self, datamodule: L.LightningDataModule, model: L.LightningModule
    ) -> None:
        """The model and data settings must be the run's, but for those of place and speed."""
        now = {"model": dict(model.hparams), "data": dict(datamodule.hparams)}
        then = {
            "model": self.saved["hyper_parameters"],
            "data": self.saved.get("datamodule_hyper_parameters", {}),
        }
        for settings in (now, then):
            settings["data"] = {k: v for k, v in settings["data"].items() if k not in DATA_PLACES}
            settings["model"] = {k: v for k, v in settings["model"].items() if k not in MODEL_SPEED}
        differences = {
            key: pair for key, pair in sorted(_paired(then, now).items()) if pair[0] != pair[1]
        }
        if differences:
            overrides = self.checkpoint.parent.parent / ".hydra" / "overrides.yaml"
            raise UserError(
                f"cannot resume from {self.checkpoint}: it was trained with other settings "
                f"({_listed(differences)}). "
                f"{_how_to_resume(differences)} (the run's overrides: {overrides})"
            )

    def _check_same_schedule(self, trainer: L.Trainer) -> None:
        """A schedule laid out over the run's steps (`total_steps`) keeps its length: a resume
        with another would jump to another point of it (OneCycleLR: fail past its end)."""
        laid_out_by = self.saved.get("schedule_laid_out_by") or {}
        now = steps.run_length_settings(trainer)
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
                f"cannot resume from {self.checkpoint}: its model.scheduler was laid out over "
                f"the run's length, and these trainer settings change it "
                f"({_listed(differences)}). A schedule's length is fixed when the run starts: "
                f"resume with {' '.join(again)}, or start a new run"
            )

    def _check_unfinished(self, trainer: L.Trainer) -> None:
        """Lightning returns at once from a checkpoint at the trainer's limit: say so instead."""
        progress = self.saved.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        epochs = progress.get("current", {}).get("processed", 0)
        reached = []
        if trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
            reached.append(f"trainer.max_epochs={trainer.max_epochs}")
        if trainer.max_steps != -1 and self.saved.get("global_step", 0) >= trainer.max_steps:
            reached.append(f"trainer.max_steps={trainer.max_steps}")
        if reached:
            run = self.checkpoint.parent.parent
            go_on = "raise it to train on, or"
            if self.saved.get("schedule_laid_out_by"):  # _check_same_schedule refuses that
                go_on = "its learning-rate schedule has ended (start a new run to train longer);"
            raise UserError(
                f"{run} has already reached {' and '.join(reached)}: {go_on} evaluate the run "
                f"with: python eval.py ckpt_path={run}"
            )

    def _check_same_validation_images(self, datamodule: L.LightningDataModule) -> None:
        """Other data (another copy whose files changed, the other layout, which lists the
        images in another order) draws another split: the run would train on images it
        validated on and selected its best epoch by."""
        then = validation_digest(self.saved)
        datamodule.prepare_data()
        datamodule.setup("fit")  # done once: the fit's own setup finds the data loaded
        if datamodule.validation_digest != then:
            trained_on = self.saved.get("datamodule_hyper_parameters", {}).get("data_dir")
            raise UserError(
                f"cannot resume from {self.checkpoint}: the data in {datamodule.data_dir} gives "
                f"other validation images than the run's (it was trained on {trained_on}, with "
                "those files as they were then; or the images decode otherwise here, with "
                "another Pillow), so it would train on images it validated on. Resume with the "
                "run's data (data.data_dir), or start a new run"
            )


def _listed(differences: dict[str, tuple[Any, Any]]) -> str:  # "key is a there, b now; ..."
    return "; ".join(f"{key} is {a!r} there, {b!r} now" for key, (a, b) in differences.items())


def _how_to_resume(differences: dict[str, tuple[Any, Any]]) -> str:
    """Hydra overrides that give the checkpoint's settings again: `++key=value`, or `~key` where
    the checkpoint has none (its default applied). Plain values only."""
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
    """The train.py command that resumes this run: its own overrides, and the checkpoint; for
    a job of a sweep, the sweep's command again, into its folder (which goes on with it)."""
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


@contextmanager
def stops_on_sigterm() -> Iterator[None]:
    """Lightning ends a SIGTERM outside training (sanity check, test) with exit status 0;
    make it a stop with a message and status 1. During training GracefulStop handles it."""
    try:
        yield
    except SIGTERMException as error:
        raise StoppedBySignal("stopped by SIGTERM outside training; nothing was saved") from error


class RandomState(Callback):
    """Saves torch's global random state in checkpoints and restores it on resume: dropout and
    augmentation draw from it, so a resumed run draws what an uninterrupted one would."""

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
        state = checkpoint.get("random_state")  # none where the run had no RandomState
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class MovedRunFolder(Callback):
    """Resuming a run whose folder was moved or copied (to another disk or machine): rewrites
    its checkpoint callbacks' records (best and last files, best-k scores) from the old folder
    to the new one before they are loaded. Lightning drops those records when the folder
    differs: the best epoch so far would be forgotten, and the old best file left behind."""

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
        inside = Path(path).is_relative_to(old)
        return str(Path(new) / Path(path).relative_to(old)) if inside else path

    return state | {
        "dirpath": new,
        "best_model_path": move(state["best_model_path"]),
        "kth_best_model_path": move(state.get("kth_best_model_path", "")),
        "last_model_path": move(state.get("last_model_path", "")),
        "best_k_models": {
            move(path): score for path, score in state.get("best_k_models", {}).items()
        },
    }
