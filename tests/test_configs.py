"""Every config in conf/ composes, and instantiate builds every object it describes."""

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.module import ImageClassifier
from cifar_cnn.training import build

from .conftest import CONFIG_DIR, compose_in

GROUPS = ("paths", "data", "model", "trainer", "callbacks", "logger", "experiment", "debug")
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
