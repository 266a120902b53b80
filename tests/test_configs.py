"""Every config in conf/ composes, and instantiate builds every object it describes."""

from collections.abc import Callable
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.module import ImageClassifier
from cifar_cnn.training import build

from .conftest import CONFIG_DIR, CONFIG_GROUPS, CONFIG_OPTIONS, compose_in


def test_every_group_has_an_option() -> None:
    assert {option.split("=")[0] for option in CONFIG_OPTIONS} == set(CONFIG_GROUPS)


@pytest.mark.parametrize("option", CONFIG_OPTIONS)
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


def test_default_config_is_the_tutorial(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config()
    assert cfg.data.batch_size == 64
    assert cfg.data.val_fraction == 0.2
    assert cfg.trainer.max_epochs == 10
    assert cfg.trainer.accelerator == "auto"
    assert cfg.model.optimizer.lr == 1e-3
    assert cfg.optimized_metric == "val/acc_best"
    tutorial = compose_config("experiment=tutorial")
    assert tutorial.data == cfg.data and tutorial.model == cfg.model
    assert tutorial.trainer.max_epochs == cfg.trainer.max_epochs
    assert tutorial.trainer.precision == "32-true"  # the tutorial's, whatever the CPU


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


def test_export_config_composes(cache_dir: Path, tmp_path: Path) -> None:
    cfg = compose_in("export", ["ckpt_path=model.ckpt"], tmp_path / "export", cache_dir)
    assert isinstance(instantiate(cfg.data), CIFAR10DataModule)
    assert (cfg.format, cfg.tta) == ("onnx", True)


SWEEPER_OPTIONS = [
    f"hydra/sweeper/{group}={path.stem}"
    for group in ("sampler", "pruner")
    for path in sorted((CONFIG_DIR / "hydra" / "sweeper" / group).glob("*.yaml"))
]


@pytest.mark.parametrize("option", SWEEPER_OPTIONS)
def test_every_sampler_and_pruner_of_a_search_builds(option: str) -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=tutorial_cnn", option],
                      return_hydra_config=True)  # fmt: skip
    group, name = option.removeprefix("hydra/sweeper/").split("=")
    built = instantiate(cfg.hydra.sweeper[group])
    base = optuna.samplers.BaseSampler if group == "sampler" else optuna.pruners.BasePruner
    assert isinstance(built, base) and name in type(built).__name__.lower()
