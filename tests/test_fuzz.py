"""Fuzzed inputs: config values, image files and damaged checkpoints are each accepted, or
refused with one line naming the key or file; never a library's traceback. The number of
inputs each test tried: `pytest tests/test_fuzz.py --hypothesis-show-statistics`."""

import io
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cifar_cnn.checkpoints import read_checkpoint
from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.data.sources import decode_image
from cifar_cnn.errors import UserError
from cifar_cnn.module import ImageClassifier
from cifar_cnn.prediction import predict_files
from cifar_cnn.validation import NULLABLE, RULES, SWITCHES, validate

from .conftest import compose_in, make_image_folder

SETTINGS = settings(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Strings a command line or a YAML file may hold.
ODD_STRINGS = ["", " ", "nan", "inf", "-inf", "1e999", "0x10", "1_000", "true", "off", "null",
               "???", "${oops}", "${model.optimizer.lr}", "1e-3 ", "\n", "é", "\x00", "💥",
               "a" * 300]  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(ODD_STRINGS),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
KEYS = [*RULES, *SWITCHES, "optimized_metric"]


@pytest.fixture(scope="module")
def every_key(tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    """A training config (the fast recipe: it has the most keys) with eval.py's and
    export.py's keys too."""
    folder = tmp_path_factory.mktemp("fuzz-config")
    cfg = compose_in("train", ["experiment=fast"], folder / "run", folder / "cache")
    others = {"model.scheduler.max_lr": 3e-3, "model.net.dropout": 0.2, "num_errors": 16,
              "model.net.hidden_units": 128, "precision": "32-true", "tta": True,
              "callbacks.ema.decay": 0.999, "callbacks.early_stopping.patience": 5}  # fmt: skip
    for key, value in others.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    validate(cfg)
    assert {key for key in KEYS if OmegaConf.select(cfg, key) is None} <= set(NULLABLE)
    return cfg


@pytest.mark.parametrize("key", KEYS)
@settings(SETTINGS, max_examples=30)
@given(value=VALUES)
def test_every_validated_key_takes_or_refuses_any_value_naming_the_key(
    key: str, value: Any, every_key: DictConfig
) -> None:
    cfg = every_key
    before = OmegaConf.select(cfg, key)
    OmegaConf.update(cfg, key, value, force_add=True)
    try:
        validate(cfg)
        taken = OmegaConf.select(cfg, key)  # a value of the key's kind
        assert taken is None or isinstance(taken, bool | int | float | str)
    except UserError as error:
        message = str(error)
        assert message.startswith(f"{key}=") and "\n" not in message, message
    finally:
        OmegaConf.update(cfg, key, before, force_add=True)


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes; a real image file, cut short or with bytes of its header changed; or a
    PNG or BMP header that claims up to 2**31 - 1 pixels a side."""
    kind = draw(st.sampled_from(["random", "intact", "truncated", "header", "huge"]))
    if kind == "random":
        return draw(st.binary(max_size=1024))
    if kind == "huge":
        width, height = (draw(st.integers(1, 2**31 - 1)) for _ in range(2))
        return draw(st.sampled_from([_png, _bmp]))(width, height, draw(st.binary(max_size=64)))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "1"]))
    image_format = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (*size, 3))
    image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    try:
        image.save(out, image_format)
    except OSError:  # a mode the format cannot hold
        image.convert("RGB").save(out := io.BytesIO(), image_format)
    data = bytearray(out.getvalue())
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "header":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, min(len(data), 64) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


def _png(width: int, height: int, rest: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rest)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _bmp(width: int, height: int, rest: bytes) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(rest), 0, 0, 54) + info + rest


@settings(SETTINGS, max_examples=300)
@given(data=image_bytes())
def test_an_image_file_of_the_data_set_decodes_or_stops_naming_it(
    data: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "0001.png"
    path.write_bytes(data)
    try:
        image = decode_image(str(path))
    except UserError as error:
        assert str(path) in str(error)
        return
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


@settings(SETTINGS, max_examples=200)
@given(data=image_bytes())
def test_a_file_to_predict_is_classified_or_skipped_by_name(
    data: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    fuzzed, good = folder / "fuzzed.jpg", folder / "good.png"
    fuzzed.write_bytes(data)
    Image.new("RGB", (40, 30), "red").save(good)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rows = predict_files(
            lambda images: torch.zeros(len(images), 10), folder, tmp_path / "p.csv"
        )
    classified = [row[0] for row in rows]
    assert str(good) in classified
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert (str(fuzzed) in classified) != any(str(fuzzed) in message for message in skipped)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a run of one step."""
    folder = tmp_path_factory.mktemp("fuzz-checkpoint")
    data = make_image_folder(folder / "data", {"train": 2, "test": 1})
    datamodule = CIFAR10DataModule(data, folder / "cache", batch_size=8, val_fraction=0.5)
    net = {"_target_": "cifar_cnn.nets.TutorialCNN", "hidden_units": 8}
    model = ImageClassifier(net, {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3})
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=folder)  # fmt: skip
    trainer.fit(model, datamodule)
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@settings(SETTINGS, max_examples=300)
@given(flips=st.lists(st.tuples(st.sampled_from(["start", "end", "anywhere"]),
                                st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=4))  # fmt: skip
def test_a_checkpoint_with_bytes_flipped_loads_as_it_was_or_is_refused_naming_it(
    flips: list[tuple[str, float, int]], real_checkpoint: Path, tmp_path: Path
) -> None:
    data = bytearray(real_checkpoint.read_bytes())
    for region, where, mask in flips:  # the zip's headers are at its start and its end
        start, end = {"start": (0, 1024), "end": (len(data) - 2048, len(data)),
                      "anywhere": (0, len(data))}[region]  # fmt: skip
        data[start + int(where * (end - start))] ^= mask
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(data)
    try:
        content = read_checkpoint(damaged)
    except UserError as error:
        assert str(damaged) in str(error)
        return
    _assert_same(content, torch.load(real_checkpoint, map_location="cpu", weights_only=True))


def _assert_same(got: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            _assert_same(got[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same(a, b)
    else:
        assert got == expected or (got != got and expected != expected)  # NaN
