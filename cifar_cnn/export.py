"""Exporting a checkpoint as a deployable model (ONNX or TorchScript), checked against PyTorch.

The exported graph takes what a camera or an image library gives: RGB uint8 images
(N, 3, 32, 32), any N; the scaling to [0, 1], the net's own normalisation and, by default,
the run's test-time augmentation are inside it, and it returns the logits. It always computes
in float32, whatever precision the run trained in. A JSON file beside it describes the input
and output and records the checks that the export passed.

onnx and onnxruntime come with the optional `export` extra: they are imported where needed.
"""

import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from cifar_cnn.checkpoints import load_checkpoint, resolve_checkpoint
from cifar_cnn.data.images import CLASSES, IMAGE_SHAPE, to_float_images
from cifar_cnn.errors import UserError
from cifar_cnn.files import written_then_renamed
from cifar_cnn.module import augmented_logits
from cifar_cnn.validation import validate

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
# ONNX's operator set: the exporter's own default, pinned so that a torch upgrade does not
# change what consumers need; 20 has GELU as one operator (FastCNN).
OPSET = 20
# Largest difference of a logit between the exported model and PyTorch, both in float32.
TOLERANCE = 1e-4
CHECK_BATCH_SIZES = (1, 7)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# The exporter's graph passes log every step at INFO: their news, not the export's.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir")


class DeployableNet(nn.Module):
    """What an exported file computes: RGB uint8 images (N, 3, 32, 32) to logits (N, 10),
    scaled to [0, 1] as in training, with the test-time augmentation that `flip` and
    `translate` turn on (ImageClassifier's in eval mode)."""

    def __init__(self, net: nn.Module, flip: bool, translate: bool) -> None:
        super().__init__()
        self.net = net
        self.flip = flip
        self.translate = translate

    def forward(self, images: Tensor) -> Tensor:
        return augmented_logits(self.net, to_float_images(images), self.flip, self.translate)


def export(cfg: DictConfig) -> dict[str, Any]:
    """export.py: writes the checkpoint's model in `cfg.format`, checks it, describes it."""
    validate(cfg)
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format} is not a format: use format=onnx or torchscript")
    if cfg.format == "onnx":
        onnx_modules()  # before the data is read: say at once that the extra is missing
    checkpoint = resolve_checkpoint(cfg.ckpt_path)
    log.info("Checkpoint %s", checkpoint)
    model, _, trained_in, _ = load_checkpoint(checkpoint)
    tta = {"flip": bool(cfg.tta and model.hparams.flip_tta),
           "translate": bool(cfg.tta and model.hparams.translate_tta)}  # fmt: skip
    # float32 whatever the run trained in: mixed precision keeps float32 weights, and a
    # consumer's runtime need not support bf16.
    net = DeployableNet(model.net.float(), **tta).eval()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / FORMATS[cfg.format]

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    images = datamodule.data_test.images
    # Written under a temporary name and checked there: a file that fails a check is not kept.
    with written_then_renamed(path) as partial:
        if cfg.format == "onnx":
            export_onnx(net, images[:2], partial, checkpoint)
            run: Callable[[Tensor], Tensor] = OnnxClassifier(partial)
        else:
            export_torchscript(net, images[:2], partial, checkpoint)
            run = torchscript_runner(partial)
        checks = check_export(net, run, images, cfg.data.eval_batch_size, path)
    description = describe(cfg.format, checkpoint, trained_in, tta, checks)
    (output_dir / "model.json").write_text(json.dumps(description, indent=2) + "\n")
    log.info("Wrote %s and %s", path, output_dir / "model.json")
    return description


def export_onnx(net: nn.Module, example: Tensor, path: Path, source: Path) -> None:
    """`net` as an ONNX file with a dynamic batch dimension, its weights inside the file."""
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings(), _logs_at_warning(*EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            torch.onnx.export(
                net, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=OPSET, dynamic_shapes={INPUT_NAME: {0: batch}},
                external_data=False, verbose=False,
            )  # fmt: skip
    except torch.onnx.OnnxExporterError as error:
        raise UserError(f"{source} could not be exported to ONNX ({_first_line(error)})") from error
    onnx, _ = onnx_modules()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(
            f"the ONNX export of {source} fails onnx.checker ({_first_line(error)})"
        ) from error


def export_torchscript(net: nn.Module, example: Tensor, path: Path, source: Path) -> None:
    """`net` traced into a TorchScript file: its ops do not depend on the data, and the
    batch size stays free (the checks run other sizes than the example's)."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # torch marks TorchScript deprecated in favour of torch.export; it still loads
            # where only libtorch is, which is what this format is for.
            warnings.filterwarnings("ignore", message=r".*is deprecated", category=FutureWarning)
            torch.jit.trace(net, example).save(str(path))
    except RuntimeError as error:
        raise UserError(
            f"{source} could not be exported to TorchScript ({_first_line(error)})"
        ) from error


def torchscript_runner(path: Path) -> Callable[[Tensor], Tensor]:
    """A function that runs the TorchScript file at `path` as `torch.jit.load` reads it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is deprecated", category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    return torch.no_grad()(loaded)


@torch.inference_mode()
def check_export(
    net: nn.Module, run: Callable[[Tensor], Tensor], images: Tensor, batch_size: int, path: Path
) -> dict[str, Any]:
    """The exported model against PyTorch's on test images: logits within TOLERANCE on
    batches of 1 and 7, and the same top-1 class on every image."""
    log.info("Checking the exported model against PyTorch on %d test images", len(images))
    differences = {}
    for size in CHECK_BATCH_SIZES:
        batch = images[:size]
        differences[f"batch_{size}"] = (run(batch) - net(batch)).abs().max().item()
    log.info("Largest logit difference to PyTorch: %s", differences)
    worst = max(differences.values())
    if not worst <= TOLERANCE:  # NaN too
        raise UserError(
            f"{path}: its logits differ from PyTorch's by up to {worst:.3g}, more than "
            f"{TOLERANCE:g}: not kept"
        )
    agreeing = 0
    for batch in images.split(batch_size):
        agreeing += (run(batch).argmax(dim=1) == net(batch).argmax(dim=1)).sum().item()
    log.info("Top-1 agreement with PyTorch on the %d test images: %d (%.2f%%)",
             len(images), agreeing, 100 * agreeing / len(images))  # fmt: skip
    if agreeing < len(images):
        raise UserError(
            f"{path}: its top-1 class differs from PyTorch's on {len(images) - agreeing} of "
            f"the {len(images)} test images (float32 should agree on all): not kept"
        )
    return {
        "max_abs_logit_difference": differences,
        "tolerance": TOLERANCE,
        "top1_agreement": {"images": len(images), "agreeing": agreeing},
    }


def describe(
    format: str, checkpoint: Path, trained_in: str, tta: dict[str, bool], checks: dict[str, Any]
) -> dict[str, Any]:
    """model.json: what a consumer needs to feed the model and read its output."""
    channels, height, width = IMAGE_SHAPE
    description: dict[str, Any] = {
        "file": FORMATS[format],
        "format": format,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "range": [0, 255],
            "layout": "NCHW",
            "channels": "RGB",
            "shape": ["batch", channels, height, width],
            "preprocessing": "none: the model scales to [0, 1] (and normalises if its net does)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", len(CLASSES)],
            "meaning": "logits, in the order of classes; softmax gives probabilities",
        },
        "classes": list(CLASSES),
        "test_time_augmentation": tta,
        "computes_in": "float32",
        "trained_in": trained_in,
        "source_checkpoint": str(checkpoint.resolve()),
        "torch": torch.__version__,
        "checks": checks,
    }
    if format == "onnx":
        onnx, onnxruntime = onnx_modules()
        description["opset"] = OPSET
        description["onnx"] = onnx.__version__
        description["onnxruntime"] = onnxruntime.__version__
        description["checks"] = {"onnx_checker": "passed", **checks}
    return description


class OnnxClassifier:
    """An exported .onnx model run by onnxruntime on the CPU: uint8 images (N, 3, 32, 32) to
    float32 logits. Refuses files that are not ONNX models or take other inputs."""

    def __init__(self, path: Path, batch_size: int = 256) -> None:
        _, onnxruntime = onnx_modules()
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime's errors derive from Exception alone
            raise UserError(
                f"{path} is not a readable ONNX model ({_first_line(error)})"
            ) from error
        inputs = self.session.get_inputs()
        spec = inputs[0] if len(inputs) == 1 else None
        if spec is None or spec.type != "tensor(uint8)" or spec.shape[1:] != list(IMAGE_SHAPE):
            taken = f"{spec.type} {spec.shape}" if spec else f"{len(inputs)} inputs"
            raise UserError(
                f"{path} is not a model that export.py wrote: it takes {taken}, not uint8 "
                f"images (N, {', '.join(map(str, IMAGE_SHAPE))})"
            )
        self.input_name = spec.name
        self.batch_size = batch_size

    def __call__(self, images: Tensor) -> Tensor:
        outputs = [
            self.session.run(None, {self.input_name: batch.contiguous().numpy()})[0]
            for batch in images.split(self.batch_size)
        ]
        return torch.cat([torch.from_numpy(output) for output in outputs])


def onnx_modules() -> tuple[ModuleType, ModuleType]:
    """onnx and onnxruntime, or a UserError that says how to install them."""
    try:
        return import_module("onnx"), import_module("onnxruntime")
    except ImportError as error:
        raise UserError(
            f"ONNX models need the optional packages of the `export` extra ({error.name} is "
            "missing): pip install -e '.[export]'"
        ) from error


@contextmanager
def _logs_at_warning(*names: str) -> Iterator[None]:
    """The loggers `names` pass only warnings and errors within the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
