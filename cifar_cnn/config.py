"""OmegaConf resolvers used by the configs in conf/, and the checks of a composed config."""

import math
import os
import sys
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.device_parser import _select_auto_accelerator
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, OmegaConf

from cifar_cnn.errors import UserError

ACCELERATORS = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))

# What a training run reports (metrics.json), and so what sweepers can optimise.
RUN_FIGURES = ("val/acc_best", "test/acc", "test/loss")

# key: (test of the value, what is allowed). Keys a config lacks are not checked; null is
# refused but where NULLABLE says what it means.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: isinstance(v, int) and 0 <= v < 2**32, "a whole number in [0, 2**32)"),
    "model.optimizer.lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "model.scheduler.max_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "model.optimizer.weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "model.net.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.net.hidden_units": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "data.batch_size": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "data.eval_batch_size": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "data.val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "data.crop_padding": (
        lambda v: isinstance(v, int) and 0 <= v < 32,
        "a whole number in [0, 32)",
    ),
    "data.shuffle_seed": (lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0"),
    "data.split_seed": (
        lambda v: isinstance(v, int) and 0 <= v < 2**64,  # torch.Generator's seeds
        "a whole number in [0, 2**64)",
    ),
    "num_errors": (  # errors.png's grid: drawing takes seconds a hundred images
        lambda v: isinstance(v, int) and 0 <= v <= 256,
        "a whole number in [0, 256]",
    ),
    "model.label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.norm_bias_lr_scale": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "model.optimizer.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.scheduler.peak_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "model.scheduler.start_factor": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "model.scheduler.end_factor": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "trainer.max_epochs": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "trainer.accelerator": (lambda v: v in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
}

# On/off settings. Hydra reads only true and false as such: `data.flip=off` is the string
# "off", which would count as on.
SWITCHES = (
    "data.download",
    "data.flip",
    "data.drop_last",
    "data.on_device",
    "model.channels_last",
    "model.compile",
    "model.flip_tta",
    "model.translate_tta",
    "model.optimizer.nesterov",
    "model.optimizer.fused",
)
# null: the run's seed; Lightning's default (1000 epochs, or none with trainer.max_steps);
# torch's choice.
NULLABLE = ("data.shuffle_seed", "trainer.max_epochs", "model.optimizer.fused")
ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """Stops on the first value outside what is allowed, naming the key and the value."""
    for key, (allowed, description) in RULES.items():
        value = _checked_value(cfg, key)
        if value is ABSENT:
            continue
        try:
            ok = bool(allowed(value)) and not isinstance(value, bool)
        except TypeError:  # a string where a number belongs, say
            ok = False
        if not ok:
            raise UserError(f"{key}={value!r} is not allowed: it must be {description}")
    for key in SWITCHES:
        value = _checked_value(cfg, key)
        if value is not ABSENT and not isinstance(value, bool):
            raise UserError(f"{key}={value!r} is not allowed: it must be true or false")
    check_optimized_metric(cfg)
    _check_clipping(cfg)
    _check_norm_bias_lr_scale(cfg)
    _check_gpu_present(cfg)
    if HydraConfig.initialized():
        overrides = HydraConfig.get().overrides.task
        check_lr_takes_effect(cfg, [o.partition("=")[0] for o in overrides])
    if OmegaConf.select(cfg, "trainer.fast_dev_run") and OmegaConf.select(cfg, "ckpt_path"):
        raise UserError(
            "trainer.fast_dev_run (debug=fast_dev_run) runs one batch of a new run: it does not "
            "go with ckpt_path"
        )


def _checked_value(cfg: DictConfig, key: str) -> Any:
    """The key's value, to check; ABSENT where the config lacks the key, or holds a null that
    means something (NULLABLE)."""
    value = OmegaConf.select(cfg, key, default=ABSENT)
    return ABSENT if value is None and key in NULLABLE else value


def check_optimized_metric(cfg: DictConfig) -> None:
    """What train.py returns to sweepers must be one of the run's figures."""
    if "optimized_metric" in cfg and cfg.optimized_metric not in RUN_FIGURES:  # null too
        raise UserError(
            f"optimized_metric={cfg.optimized_metric} is not allowed: it must be one of "
            + ", ".join(RUN_FIGURES)
        )


MIXED_PRECISIONS = ("16", "bf16", "16-mixed", "bf16-mixed")


def _check_clipping(cfg: DictConfig) -> None:
    """Lightning refuses to clip a fused optimizer's gradients under mixed precision (such an
    optimizer unscales them inside its step); say so before any data is loaded."""
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val")
    precision = str(OmegaConf.select(cfg, "trainer.precision"))
    clips = isinstance(clip, int | float) and clip > 0  # as Lightning tests it
    if clips and precision in MIXED_PRECISIONS and OmegaConf.select(cfg, "model.optimizer.fused"):
        raise UserError(
            f"trainer.gradient_clip_val={clip!r} with trainer.precision={precision} needs "
            "model.optimizer.fused=false (or trainer.precision=32-true): Lightning cannot clip a "
            "fused optimizer's gradients under mixed precision"
        )


# Schedulers that set the learning rate themselves, and the arguments they set it from.
RATE_SETTING_SCHEDULERS = {
    "torch.optim.lr_scheduler.OneCycleLR": ("max_lr",),
    "torch.optim.lr_scheduler.CyclicLR": ("base_lr", "max_lr"),
}


def _check_norm_bias_lr_scale(cfg: DictConfig) -> None:
    """Such a schedule sets every parameter group's rate: the scale would only cut the
    BatchNorm biases' weight decay."""
    scale = OmegaConf.select(cfg, "model.norm_bias_lr_scale")
    scheduler = str(OmegaConf.select(cfg, "model.scheduler._target_"))
    if scale not in (None, 1) and scheduler in RATE_SETTING_SCHEDULERS:
        raise UserError(
            f"model.norm_bias_lr_scale={scale} has no effect on the rate with "
            f"{scheduler.rpartition('.')[2]}, which sets every parameter group's rate itself "
            "(it would only divide the BatchNorm biases' weight decay): set "
            "model.norm_bias_lr_scale=1, or another model.scheduler"
        )


def check_lr_takes_effect(cfg: DictConfig, set_keys: Collection[str]) -> None:
    """Refuses `model.optimizer.lr` among `set_keys` (the keys set on the command line or by
    a search, `+`/`++` prefixes and all) where the scheduler sets the rate from its own
    arguments: it would change nothing. Unless they interpolate it (`max_lr: ${...lr}`)."""
    scheduler = OmegaConf.select(cfg, "model.scheduler._target_")
    rate_keys = [k for k in RATE_SETTING_SCHEDULERS.get(scheduler, ()) if k in cfg.model.scheduler]
    if "model.optimizer.lr" not in {key.lstrip("+") for key in set_keys} or not rate_keys:
        return  # ("~model.optimizer.lr" removes it: nothing is set)
    if any(OmegaConf.is_interpolation(cfg.model.scheduler, key) for key in rate_keys):
        return
    rates = ", ".join(f"model.scheduler.{key}={cfg.model.scheduler[key]}" for key in rate_keys)
    raise UserError(
        f"model.optimizer.lr has no effect: {scheduler.rpartition('.')[2]} sets the learning "
        f"rate itself ({rates}); set or sweep that instead"
    )


def _check_gpu_present(cfg: DictConfig) -> None:
    """Lightning's own message for a GPU accelerator on a machine without one names no GPU."""
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    mps = accelerator == "gpu" and torch.backends.mps.is_available()  # Apple's GPUs
    if accelerator in ("gpu", "cuda") and not (torch.cuda.is_available() or mps):
        raise UserError(
            f"trainer.accelerator={accelerator}, but this machine has no GPU that torch can use: "
            "use trainer=cpu, or trainer.accelerator=auto to take a GPU where there is one"
        )


def stdout_isatty() -> bool:
    """True when stdout is a terminal: progress bars redraw there, log files get plain lines."""
    return sys.stdout.isatty()


def on_cuda(accelerator: str) -> bool:
    """True when the trainer's `accelerator` puts it on CUDA GPUs on this machine."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def default_precision(accelerator: str) -> str:
    """`bf16-mixed` (bf16 autocast) when the trainer's `accelerator` puts it on a CPU that
    computes bf16 natively (AVX512-BF16 or AMX): on the project's CPU the seed's epochs take a
    third less time than in float32, at the same test accuracy (README.md, Speed). `32-true`
    elsewhere: other CPUs emulate bf16, and GPUs keep the float32 their figures came from."""
    if accelerator == "auto":
        accelerator = _select_auto_accelerator()  # Lightning's own choice: tpu, mps, cuda, cpu
    if accelerator != "cpu":
        return "32-true"
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native_bf16 else "32-true"


def run_folder(checkpoint: str | None, new_folder: str) -> str:
    """Where a run writes: the folder of the run that `ckpt_path` resumes, else `new_folder`."""
    resumed = resumed_run(checkpoint) if checkpoint else None
    return str(resumed) if resumed else new_folder


def resumed_run(checkpoint: str | Path) -> Path | None:
    """The run folder that `checkpoint` continues: given as the folder itself or as its
    checkpoints/last.ckpt. None for anything else (train.py then says what it takes)."""
    path = Path(checkpoint).expanduser()
    if path.is_file() and path.name == "last.ckpt" and path.parent.name == "checkpoints":
        path = path.parent.parent
    return path if (path / "checkpoints" / "last.ckpt").is_file() else None


def config_subfolder(checkpoint: str | None) -> str:
    """Hydra's record of a run: a resumed run keeps the first record and adds its own."""
    if checkpoint and resumed_run(checkpoint):
        return f".hydra/resumed_{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"
    return ".hydra"


OmegaConf.register_new_resolver("stdout_isatty", stdout_isatty, replace=True)
OmegaConf.register_new_resolver("gpu_count", torch.cuda.device_count, replace=True)
OmegaConf.register_new_resolver("on_cuda", on_cuda, replace=True)
OmegaConf.register_new_resolver("default_precision", default_precision, replace=True)
OmegaConf.register_new_resolver("run_folder", run_folder, replace=True)
OmegaConf.register_new_resolver("config_subfolder", config_subfolder, replace=True)
# Run folder names end in the process id: two runs started in the same second differ.
# Cached: every job of a sweep gets the same value, even with a launcher of many processes.
OmegaConf.register_new_resolver("pid", os.getpid, replace=True, use_cache=True)
