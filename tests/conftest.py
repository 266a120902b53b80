"""Fixtures: the real data set, small image-folder trees, and composed configs for tmp folders."""

import os
import resource
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from cifar_cnn.data import CLASSES, CIFAR10DataModule
from cifar_cnn.data.sources import DATA_DIR_ENV
from cifar_cnn.resolvers import register_resolvers
from cifar_cnn.resume import continued_config
from cifar_cnn.runtime import silence_known_warnings

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_GROUPS = ("paths", "data", "augment", "model", "trainer", "callbacks", "logger",
                 "experiment", "debug", "hparams_search")  # fmt: skip
# Every option of every group, as `group=option`.
CONFIG_OPTIONS = [
    f"{group}={path.stem}"
    for group in CONFIG_GROUPS
    for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


def pytest_configure(config: pytest.Config) -> None:
    register_resolvers()  # as the entry points do
    silence_known_warnings()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Workers share the cores: one thread each (and in the processes they start) instead
        # of every worker's torch spinning a thread per core.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real CIFAR-10 data named by CIFAR10_DIR: skipped without it, an error in CI."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value or not Path(value).is_dir():
        message = f"set {DATA_DIR_ENV} to a CIFAR-10 folder to run the tests on real data"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(value)


def ready(data_dir: Path, cache_dir: Path, **kwargs: object) -> CIFAR10DataModule:
    """A data module with its data prepared and set up."""
    datamodule = CIFAR10DataModule(data_dir, cache_dir, **kwargs)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Writes random 32x32 JPEGs as `<root>/<split>/<class>/NNNN.jpg`; returns root."""
    generator = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name in CLASSES:
            class_dir = root / split / name
            class_dir.mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(class_dir / f"{i:04d}.jpg")
    return root


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """An image-folder tree of 10 train and 4 test images per class."""
    return make_image_folder(tmp_path / "tiny-cifar", {"train": 10, "test": 4})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The decode cache: CIFAR_CNN_CACHE_DIR when set, else a fresh folder (one a worker)."""
    value = os.environ.get("CIFAR_CNN_CACHE_DIR")
    return Path(value) if value else tmp_path_factory.mktemp("cache")


def compose_in(
    config_name: str, overrides: list[str], output_dir: Path, cache_dir: Path
) -> DictConfig:
    """Composes conf/<config_name>.yaml as its entry point would, writing into output_dir: a
    training run with a ckpt_path continues that run's own config."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as inside a real run
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent / "outputs")
        cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra
    return continued_config(cfg) if config_name == "train" and cfg.ckpt_path else cfg


@pytest.fixture
def compose_config(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """Composes conf/train.yaml with overrides, each run in its own folder under tmp_path."""

    def compose_with(*overrides: str) -> DictConfig:
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_path))
        return compose_in("train", list(overrides), run_dir, cache_dir)

    return compose_with


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """A disk that fills up: in this process, writing a file past `size` bytes fails with
    EFBIG ("File too large"), as on a full disk with ENOSPC (RLIMIT_FSIZE, with SIGXFSZ,
    which would kill the process, ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def limit_file_size(size: int) -> Callable[[], None]:
    """For subprocess.Popen's preexec_fn: file_size_limit(size) in the started process."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored signals stay so across exec
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )

    return limit
