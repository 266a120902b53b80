"""Bad settings stop before any data is read, naming the key and the value."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from cifar_cnn.errors import UserError
from cifar_cnn.training import train
from cifar_cnn.validation import check_lr_takes_effect, validate

from .conftest import CONFIG_OPTIONS


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.optimizer.lr=0",
            "model.optimizer.lr=0 is not allowed: it must be a finite number > 0",
        ),
        ("model.optimizer.lr=inf", "model.optimizer.lr=inf is not allowed"),
        ("model.optimizer.lr=-1e-3", "model.optimizer.lr=-0.001 is not allowed"),
        ("model.optimizer.lr=fast", "model.optimizer.lr='fast' is not allowed"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed: it must be a whole number >= 1"),
        ("data.batch_size=6.5", "data.batch_size=6.5 is not allowed"),
        (
            "data.val_fraction=1.0",
            "data.val_fraction=1.0 is not allowed: it must be a number in (0, 1)",
        ),
        ("data.val_fraction=0", "data.val_fraction=0 is not allowed"),
        (
            "model.net.dropout=1",
            "model.net.dropout=1 is not allowed: it must be a number in [0, 1)",
        ),
        ("model.net.dropout=-0.1", "model.net.dropout=-0.1 is not allowed"),
        (
            "trainer.accelerator=tpuu",
            "trainer.accelerator='tpuu' is not allowed: it must be one of",
        ),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed: it must be a whole number"),
        (
            "data.crop_padding=-2",
            "data.crop_padding=-2 is not allowed: it must be a whole number in [0, 32)",
        ),
        ("data.crop_padding=32", "data.crop_padding=32 is not allowed"),
        (
            "trainer.precision=bf16-true",
            "trainer.precision='bf16-true' is not allowed: it must be one of 32-true, "
            "bf16-mixed, 16-mixed",
        ),
        ("trainer.precision=64", "trainer.precision=64 is not allowed"),
        (
            "experiment=tutorial_augmented model.scheduler.max_lr=0",
            "model.scheduler.max_lr=0 is not",
        ),
        (
            "experiment=tutorial_augmented model.optimizer.lr=0.01",
            "model.optimizer.lr has no effect: OneCycleLR sets the learning rate itself "
            "(model.scheduler.max_lr=0.003)",
        ),
        ("experiment=fast model.label_smoothing=1.0", "model.label_smoothing=1.0 is not"),
        ("experiment=fast model.optimizer.momentum=1.2", "model.optimizer.momentum=1.2 is not"),
        ("experiment=fast model.norm_bias_lr_scale=0", "model.norm_bias_lr_scale=0 is not"),
        ("experiment=fast model.scheduler.peak_fraction=2", "model.scheduler.peak_fraction=2 is"),
        ("experiment=fast model.scheduler.start_factor=-1", "model.scheduler.start_factor=-1 is"),
        ("data.shuffle_seed=-1", "data.shuffle_seed=-1 is not allowed"),
        ("data.split_seed=1.5", "data.split_seed=1.5 is not allowed"),
        (
            "experiment=tutorial_augmented +model.norm_bias_lr_scale=64",
            "model.norm_bias_lr_scale=64 has no effect on the rate with OneCycleLR",
        ),
        ("seed=-1", "seed=-1 is not allowed: it must be a whole number in [0, 2**32)"),
        ("data.batch_size=null", "data.batch_size=None is not allowed"),
        ("model.optimizer.lr=null", "model.optimizer.lr=None is not allowed"),
        ("data.flip=null", "data.flip=None is not allowed: it must be true or false"),
        ("data.flip=off", "data.flip='off' is not allowed: it must be true or false"),
        ("data.download=no", "data.download='no' is not allowed: it must be true or false"),
        ("experiment=fast model.flip_tta=1", "model.flip_tta=1 is not allowed: it must be true"),
        ("optimized_metric=val/acc_bst", "optimized_metric=val/acc_bst is not allowed: it must"),
        ("optimized_metric=null", "optimized_metric=None is not allowed: it must be one of"),
        (
            "experiment=tutorial_augmented"
            " model.scheduler._target_=torch.optim.lr_scheduler.CyclicLR ++model.optimizer.lr=0.01",
            "model.optimizer.lr has no effect: CyclicLR sets the learning rate itself "
            "(model.scheduler.max_lr=0.003)",
        ),
        pytest.param(
            "trainer=gpu",
            "trainer.accelerator=gpu, but this machine has no GPU that torch can use",
            marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="needs a machine without a GPU"
            ),
        ),
        (
            "+trainer.gradient_clip_val=1.0 trainer.precision=bf16-mixed",
            "trainer.gradient_clip_val=1.0 with trainer.precision=bf16-mixed needs "
            "model.optimizer.fused=false",
        ),
    ],
)
def test_bad_values_stop_before_any_data_is_loaded(
    override: str, message: str, compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config(*override.split(), f"data.data_dir={tmp_path / 'never-read'}")
    with pytest.raises(UserError) as error:
        train(cfg)
    assert message in str(error.value)


def test_an_lr_that_a_schedule_interpolates_takes_effect(
    compose_config: Callable[..., DictConfig],
) -> None:
    cfg = compose_config(
        "experiment=tutorial_augmented", "model.scheduler.max_lr=${model.optimizer.lr}",
        "model.optimizer.lr=0.01",
    )  # fmt: skip
    validate(cfg)  # not refused: the lr is the schedule's peak
    assert cfg.model.scheduler.max_lr == 0.01


def test_the_lr_check_reads_override_keys_with_their_prefixes(
    compose_config: Callable[..., DictConfig],
) -> None:
    cfg = compose_config("experiment=tutorial_augmented")
    for key in ("model.optimizer.lr", "+model.optimizer.lr", "++model.optimizer.lr"):
        with pytest.raises(UserError, match="model.optimizer.lr has no effect"):
            check_lr_takes_effect(cfg, {key})  # as Optuna's sweeper gives its parameters
    check_lr_takes_effect(cfg, {"~model.optimizer.lr", "model.scheduler.max_lr"})


def test_the_shipped_configs_pass_validation(compose_config: Callable[..., DictConfig]) -> None:
    for option in CONFIG_OPTIONS:
        cfg = compose_config(option)
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            cfg = compose_config(option, "trainer.accelerator=cpu")  # refused here: no GPU
        validate(cfg)
