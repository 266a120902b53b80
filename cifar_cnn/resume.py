"""Continuing a run: `python train.py ckpt_path=<run folder>` (stopping it: stopping.py).

The contract:
- A checkpoint holds the weights, the optimizer and schedule, Lightning's loop counters, the
  callbacks' state (best checkpoint, lookahead average), torch's random state (RandomState),
  the epoch's training metrics so far, the run's precision, the trainer settings its schedule
  was laid out over, a digest of its validation images, and the run's config (RunConfig).
- A resume runs the run's own config, with the command line's overrides on top and this
  machine's `paths`; it prints each setting they change.
- It continues in the run's own folder, from its `last.ckpt`, and refuses up front,
  before any file of the run is touched: other model or data settings (but those of place
  and speed), other data (another validation split), another length of a scheduled run, and
  a run that has already reached its end. It keeps the run's precision unless told one.
- Exact: from any epoch's end (even after SIGKILL) and from a stop by Ctrl-C or SIGTERM
  (GracefulStop saves a batch that steps the optimizer; the data module skips the epoch's
  batches already trained), the run ends with the weights and metrics of an uninterrupted
  one on the same machine. Not exact: TensorBoard points logged after the last checkpoint are
  logged again, and a run moved to other hardware or library versions computes otherwise.
"""

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from cifar_cnn import steps
from cifar_cnn.checkpoints import read_checkpoint, validation_digest
from cifar_cnn.errors import UserError
from cifar_cnn.files import remove_orphaned_partials

log = logging.getLogger(__name__)

# Settings that change where data lives or how fast a run goes, not what it learns.
# (channels_last is not one: the optimizer's saved state keeps the layout it was made in,
# and torch's fused Adam then mixes up elements of the two layouts.)
DATA_PLACES = ("data_dir", "cache_dir", "download", "eval_batch_size", "on_device")
MODEL_SPEED = ("compile",)
RUN_CONFIG = "run_config"  # the checkpoint's record of the run's config (RunConfig)


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


def continued_config(cfg: DictConfig) -> DictConfig:
    """What `python train.py ckpt_path=<run> <overrides>` runs: the run's own config with
    those overrides on top (Resume.continued), as Hydra received them."""
    hydra = HydraConfig.get()
    return Resume(cfg.ckpt_path).continued(cfg, hydra.overrides.task, hydra.runtime.choices)


class RunConfig(Callback):
    """Keeps the run's config (unresolved: `${...}` resolve again where the run goes on) and
    its config groups' choices in each checkpoint: what a continued run starts from."""

    def __init__(self, cfg: DictConfig, choices: Mapping[str, str | None]) -> None:
        self.record = {
            "config": OmegaConf.to_container(cfg, resolve=False),
            "choices": _task_choices(choices),
        }

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_CONFIG] = self.record


class Resume:
    """The checkpoint a run continues from, its config, and the checks it must pass first."""

    def __init__(self, ckpt_path: str) -> None:
        run = resumed_run(ckpt_path)
        if run is None and (Path(ckpt_path).expanduser() / ".hydra").is_dir():
            raise UserError(
                f"cannot resume from {ckpt_path}: the run has no checkpoints/last.ckpt, as it "
                "stopped before its first epoch ended; there is nothing to continue, start it "
                "anew"
            )
        if run is None:
            raise UserError(
                f"cannot resume from {ckpt_path}: ckpt_path takes a run folder "
                "(outputs/runs/<run>) or its checkpoints/last.ckpt; to start a new run from "
                "other weights, load them in code"
            )
        self.run = run
        self.checkpoint = run / "checkpoints" / "last.ckpt"
        self.saved = read_checkpoint(self.checkpoint)

    def recorded(self) -> tuple[dict[str, Any], dict[str, str | None]]:
        """The run's config and config-group choices, as its checkpoint records them (the
        settings it last trained with); for a checkpoint saved without RunConfig, as Hydra
        recorded the run's start in its .hydra/ folder."""
        record = self.saved.get(RUN_CONFIG)
        if record is not None:
            return record["config"], record["choices"]
        hydra_dir = self.run / ".hydra"
        try:
            config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"))
            hydra = OmegaConf.load(hydra_dir / "hydra.yaml").hydra
        except (OSError, OmegaConfBaseException) as error:
            raise UserError(
                f"cannot resume from {self.checkpoint}: it holds no record of the run's "
                f"config, and {hydra_dir} has none that reads ({error}); start a new run"
            ) from error
        return config, _task_choices(OmegaConf.to_container(hydra.runtime.choices))

    def continued(
        self, cfg: DictConfig, overrides: Sequence[str], choices: Mapping[str, str | None]
    ) -> DictConfig:
        """The run's own config with `overrides` (a command line's, Hydra's grammar) on top,
        and the paths of `cfg`, the config composed now (this machine's places). `choices`
        are the config groups that `cfg` was composed from: a group override must pick the
        run's own option (its settings are in the run's config already). The settings that
        the overrides change are logged."""
        config, run_choices = self.recorded()
        continued = OmegaConf.create(config)
        applied = []
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            key = override.key_or_group
            if key == "ckpt_path":
                continue
            if key in choices or key in run_choices or _selects_several(override, continued):
                own = run_choices.get(key)
                if override.value() != own:
                    raise UserError(
                        f"cannot continue {self.run} with {override.input_line}: the run was "
                        f"composed with {key}={'null' if own is None else own}, and a continued "
                        "run keeps its own settings: override single keys instead (for example "
                        "trainer.max_epochs=20), or start a new run"
                    )
                continue
            if override.is_add():  # the run's config holds what its own `+key=...` added
                override = dataclasses.replace(override, type=OverrideType.FORCE_ADD)
            if override.is_delete() and OmegaConf.select(continued, key) is None:
                continue  # deleted in the run already
            applied.append(override)
        continued.paths = OmegaConf.to_container(cfg.paths, resolve=False)
        continued.ckpt_path = cfg.ckpt_path
        OmegaConf.set_struct(continued, True)  # as Hydra composes: `key=` sets known keys only
        try:  # Hydra's own rules for `key=`, `+key=`, `++key=` and `~key`
            ConfigLoaderImpl._apply_overrides_to_config(applied, continued)
        except HydraException as error:
            raise UserError(f"cannot continue {self.run}: {error}") from error
        now = OmegaConf.to_container(continued, resolve=False)
        for key, (then, to) in sorted(_paired(_settings(config), _settings(now)).items()):
            if then != to:
                log.info("Continuing with %s %s -> %s", key, then, to)
        return continued

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
        for partial in remove_orphaned_partials(self.checkpoint.parent):
            log.info("Removed %s, a checkpoint half-written when the run was killed", partial)

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
            raise UserError(
                f"cannot resume from {self.checkpoint}: it was trained with other settings "
                f"({_listed(differences)}). A continued run takes the run's own settings back: "
                "leave out the overrides that change them, or start a new run"
            )

    def _check_same_schedule(self, trainer: L.Trainer) -> None:
        """A schedule laid out over the run's steps (`total_steps`) keeps its length: a resume
        with another would jump to another point of it (OneCycleLR: fail past its end)."""
        laid_out_by = self.saved.get("schedule_laid_out_by") or {}
        now = steps.run_length_settings(trainer)
        differences = {
            # processes: trainer.devices x trainer.num_nodes
            ("processes" if key == "processes" else f"trainer.{key}"): (value, now[key])
            for key, value in laid_out_by.items()
            if now[key] != value
        }
        if differences:
            raise UserError(
                f"cannot resume from {self.checkpoint}: its model.scheduler was laid out over "
                f"the run's length, and these settings change it ({_listed(differences)}). A "
                "schedule's length is fixed when the run starts: leave out the overrides that "
                "change it, or start a new run"
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


def composed_choices(cfg: DictConfig) -> dict[str, Any]:
    """The config groups' options that Hydra composed this run from (none outside Hydra).
    Hydra records no choice for a group given several options (`augment=[trivialaugment,
    cutout]`): those given on the command line are added, as lists."""
    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    choices = dict(hydra.runtime.choices)
    for override in OverridesParser.create().parse_overrides(list(hydra.overrides.task)):
        if override.key_or_group not in choices and _selects_several(override, cfg):
            choices[override.key_or_group] = override.value()
    return choices


def _selects_several(override: Override, config: DictConfig) -> bool:
    """Whether `override` gives a config group a list of options: a list for a key that
    holds none (a value override would fail there)."""
    holds = OmegaConf.select(config, override.key_or_group, default=None)
    return isinstance(override.value(), list) and not isinstance(holds, ListConfig)


def _task_choices(choices: Mapping[str, Any]) -> dict[str, Any]:
    """The choices of the run's own config groups, not of Hydra's (hydra/launcher, ...)."""
    return {group: option for group, option in choices.items() if not group.startswith("hydra/")}


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """A run's settings, less those of place (paths) and the checkpoint it continues from."""
    return {key: value for key, value in config.items() if key not in ("paths", "ckpt_path")}


def _listed(differences: dict[str, tuple[Any, Any]]) -> str:  # "key is a there, b now; ..."
    return "; ".join(f"{key} is {a!r} there, {b!r} now" for key, (a, b) in differences.items())


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
