"""Every config in conf/ composes, and instantiate builds every object it describes."""

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

import cifar_cnn.config
from cifar_cnn.config import check_lr_takes_effect, validate
from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.errors import UserError
from cifar_cnn.module import ImageClassifier
from cifar_cnn.training import build, train

from .conftest import CONFIG_DIR, compose_in

GROUPS = ("paths", "data", "model", "trainer", "callbacks", "logger", "experiment", "debug",
          "hparams_search")  # fmt: skip
OPTIONS = [
    f"{group}={path.stem}"
    for group in GROUPS
    for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


def test_every_group_has_an_option() -> None:
    assert {option.split("=")[0] for option in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("option", OPTIONS)
def test_config_option_composes_and_builds(
    option: str, compose_config: Callable[..., DictConfig]
) -> None:
    cfg = compose_config(option)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        cfg = compose_config(option, "trainer.accelerator=cpu")  # the rest of it still builds
    datamodule, model, trainer = build(cfg)
    assert isinstance(datamodule, CIFAR10DataModule)
    assert isinstance(model, ImageClassifier)
    assert isinstance(trainer, L.Trainer)


def test_default_config_is_the_seed_experiment(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config()
    assert cfg.data.batch_size == 64
    assert cfg.data.val_fraction == 0.2
    assert cfg.trainer.max_epochs == 10
    assert cfg.trainer.accelerator == "auto"
    assert cfg.model.optimizer.lr == 1e-3
    assert cfg.optimized_metric == "val/acc_best"
    seed = compose_config("experiment=seed_keras")
    assert seed.data == cfg.data and seed.model == cfg.model
    assert seed.trainer.max_epochs == cfg.trainer.max_epochs
    assert seed.trainer.precision == "32-true"  # the tutorial's, whatever the CPU


@pytest.mark.parametrize(
    ("has_cuda", "avx512_bf16", "amx"),
    [(False, False, False), (False, True, False), (False, False, True), (True, True, True)],
)
def test_the_default_precision_is_bf16_autocast_on_cpus_that_compute_bf16(
    has_cuda: bool,
    avx512_bf16: bool,
    amx: bool,
    monkeypatch: pytest.MonkeyPatch,
    compose_config: Callable[..., DictConfig],
) -> None:
    auto = "cuda" if has_cuda else "cpu"  # what Lightning's accelerator=auto picks
    monkeypatch.setattr(cifar_cnn.config, "_select_auto_accelerator", lambda: auto)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    on_cpu = "bf16-mixed" if avx512_bf16 or amx else "32-true"
    assert compose_config().trainer.precision == ("32-true" if has_cuda else on_cpu)
    assert compose_config("trainer=cpu").trainer.precision == on_cpu
    for accelerator in ("cuda", "gpu", "mps", "tpu"):
        composed = compose_config(f"trainer.accelerator={accelerator}")
        assert composed.trainer.precision == "32-true"
    monkeypatch.setattr(cifar_cnn.config, "_select_auto_accelerator", lambda: "tpu")
    assert compose_config().trainer.precision == "32-true"  # XLA takes no bf16-mixed
    assert compose_config("trainer=ddp_cpu").trainer.precision == on_cpu
    assert compose_config("trainer.precision=64-true").trainer.precision == "64-true"


@pytest.mark.parametrize("has_cuda", [False, True])
def test_ddp_syncs_batchnorm_on_gpus_only(
    has_cuda: bool, monkeypatch: pytest.MonkeyPatch, compose_config: Callable[..., DictConfig]
) -> None:
    """PyTorch's SyncBatchNorm fails on CPU processes: `trainer=ddp` on a machine without GPUs
    stopped in every process before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert compose_config("trainer=ddp").trainer.sync_batchnorm is has_cuda
    assert (
        compose_config("trainer=ddp", "trainer.accelerator=gpu").trainer.sync_batchnorm is has_cuda
    )
    assert compose_config("trainer=ddp", "trainer.accelerator=cpu").trainer.sync_batchnorm is False
    assert compose_config("trainer=ddp_cpu").trainer.sync_batchnorm is False


def test_debug_runs_and_sweeps_stay_apart_from_real_ones() -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["debug=fast_dev_run"], return_hydra_config=True)
    log_dir = cfg.paths.log_dir
    assert cfg.hydra.run.dir.startswith(f"{log_dir}/debug/")
    assert cfg.hydra.sweep.dir.startswith(f"{log_dir}/debug/multiruns/")


def test_data_dir_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "elsewhere"))
    assert compose_config().data.data_dir == str(tmp_path / "elsewhere")
    assert compose_config("data.data_dir=/mnt/cifar").data.data_dir == "/mnt/cifar"


def test_eval_config_composes(cache_dir: Path, tmp_path: Path) -> None:
    cfg = compose_in("eval", ["ckpt_path=model.ckpt"], tmp_path / "eval", cache_dir)
    assert isinstance(instantiate(cfg.data), CIFAR10DataModule)
    assert (cfg.split, cfg.predict, cfg.device) == ("test", None, "auto")


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
        ("experiment=seed_augmented model.scheduler.max_lr=0", "model.scheduler.max_lr=0 is not"),
        (
            "experiment=seed_augmented model.optimizer.lr=0.01",
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
            "experiment=seed_augmented +model.norm_bias_lr_scale=64",
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
            "experiment=seed_augmented model.scheduler._target_=torch.optim.lr_scheduler.CyclicLR"
            " ++model.optimizer.lr=0.01",
            "model.optimizer.lr has no effect: CyclicLR sets the learning rate itself "
            "(model.scheduler.max_lr=0.003)",
        ),
        ("debug=fast_dev_run ckpt_path=outputs/runs/x", "does not go with ckpt_path"),
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
        "experiment=seed_augmented", "model.scheduler.max_lr=${model.optimizer.lr}",
        "model.optimizer.lr=0.01",
    )  # fmt: skip
    validate(cfg)  # not refused: the lr is the schedule's peak
    assert cfg.model.scheduler.max_lr == 0.01


def test_the_lr_check_reads_override_keys_with_their_prefixes(
    compose_config: Callable[..., DictConfig],
) -> None:
    cfg = compose_config("experiment=seed_augmented")
    for key in ("model.optimizer.lr", "+model.optimizer.lr", "++model.optimizer.lr"):
        with pytest.raises(UserError, match="model.optimizer.lr has no effect"):
            check_lr_takes_effect(cfg, {key})  # as Optuna's sweeper gives its parameters
    check_lr_takes_effect(cfg, {"~model.optimizer.lr", "model.scheduler.max_lr"})


def test_the_shipped_configs_pass_validation(compose_config: Callable[..., DictConfig]) -> None:
    for option in OPTIONS:
        cfg = compose_config(option)
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            cfg = compose_config(option, "trainer.accelerator=cpu")  # refused here: no GPU
        validate(cfg)
