"""Checks of a composed config, before any data is read: each refusal names the key, the
value and what is allowed."""

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifar_cnn.data.augmentation import require_v2_transform
from cifar_cnn.errors import UserError

ACCELERATORS = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
# Lightning's names. The `-true` half precisions are left out: they convert the metrics'
# states and the images with the weights, which no recipe here needs.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
MIXED_PRECISIONS = ("16-mixed", "bf16-mixed")

# What a training run reports (metrics.json), and so what sweepers can optimise.
RUN_METRICS = ("val/acc_best", "test/acc", "test/loss")

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
    "callbacks.ema.decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "callbacks.early_stopping.patience": (
        lambda v: isinstance(v, int) and v >= 0,
        "a whole number >= 0",
    ),
    "trainer.max_epochs": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    "trainer.accelerator": (lambda v: v in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
    "trainer.precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),  # eval.py's
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
    "tta",  # export.py's
)
# null: the run's seed; Lightning's default (1000 epochs, or none with trainer.max_steps);
# torch's choice; the run's own precision (eval.py).
NULLABLE = ("data.shuffle_seed", "trainer.max_epochs", "model.optimizer.fused", "precision")
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
    _check_augmentations(cfg)
    _check_callbacks(cfg)
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
    means something (NULLABLE). A value left `???` or an interpolation that does not resolve
    is refused here, naming the key: OmegaConf's own error would come later, as a traceback."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    # `name in node` is false for a value left ???
    present = isinstance(node, DictConfig) and name in node.keys()  # noqa: SIM118
    child = node._get_node(name) if present else None
    if child is not None and child._is_missing():
        raise UserError(f"{key}=??? is not allowed: it needs a value")
    try:
        value = OmegaConf.select(cfg, key, default=ABSENT)
    except OmegaConfBaseException as error:
        raw = child._value() if child is not None else "?"
        reason = str(error).splitlines()[0]
        raise UserError(f"{key}={raw!r} is not allowed: it does not resolve ({reason})") from error
    return ABSENT if value is None and key in NULLABLE else value


def check_optimized_metric(cfg: DictConfig) -> None:
    """What train.py returns to sweepers must be one of the run's metrics."""
    if "optimized_metric" in cfg and cfg.optimized_metric not in RUN_METRICS:  # null too
        raise UserError(
            f"optimized_metric={cfg.optimized_metric} is not allowed: it must be one of "
            + ", ".join(RUN_METRICS)
        )


def _check_augmentations(cfg: DictConfig) -> None:
    """data.augment and data.mix name torchvision v2 transforms only (conf/augment)."""
    for key in ("augment", "mix"):
        transforms = OmegaConf.select(cfg, f"data.{key}", default=None)
        if transforms is None:
            continue
        if not isinstance(transforms, DictConfig):
            raise UserError(
                f"data.{key}={transforms!r} is not allowed: it must be a mapping of names to "
                "torchvision.transforms.v2 configs (the augment config group)"
            )
        for name, transform in transforms.items():
            require_v2_transform(f"data.{key}.{name}", transform)


# Callbacks that replace the weights by an average of their past values: two at once would
# each average the other's output.
WEIGHT_AVERAGING = ("cifar_cnn.callbacks.EMA", "cifar_cnn.fast_recipe.Lookahead")


def _check_callbacks(cfg: DictConfig) -> None:
    """One weight average at a time."""
    callbacks = {
        name: OmegaConf.select(callback, "_target_")
        for name, callback in (OmegaConf.select(cfg, "callbacks") or {}).items()
        if callback is not None
    }
    averaging = [name for name, target in callbacks.items() if target in WEIGHT_AVERAGING]
    if len(averaging) > 1:
        names = " and ".join(f"callbacks.{name}" for name in averaging)
        raise UserError(
            f"{names} both average the weights, and do not go together: drop one, e.g. "
            f"callbacks.{averaging[-1]}=null"
        )


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
