"""Evaluating a checkpoint on a CIFAR-10 split: per-class metrics, confusion matrix, errors."""

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import Precision
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from cifar_cnn.checkpoints import load_checkpoint, resolve_checkpoint
from cifar_cnn.data import CLASSES
from cifar_cnn.errors import UserError
from cifar_cnn.export import OnnxClassifier
from cifar_cnn.prediction import checkpoint_classifier, predict_files, predict_logits
from cifar_cnn.validation import validate

log = logging.getLogger(__name__)

# The data settings that decide which images a split holds: taken from the checkpoint, so
# that split=val is the validation set the model was selected on.
SPLIT_SETTINGS = ("val_fraction", "split_seed")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """eval.py: test a checkpoint on a split, or classify image files (`predict=`)."""
    validate(cfg)
    device = _device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.ckpt_path)
    log.info("Checkpoint %s", checkpoint)
    if checkpoint.suffix == ".onnx":
        return _predict_exported(cfg, checkpoint)
    model, data_settings, trained_in, validation_digest = load_checkpoint(checkpoint)
    model = _in_precision(model, cfg.precision or trained_in, device)
    if cfg.predict not in (None, ""):  # a path, though Hydra reads predict=2024 as a number
        return _write_predictions(cfg, checkpoint_classifier(model, device))
    output_dir = _output_dir(cfg)
    if cfg.split not in ("test", "val"):
        raise UserError(f"split={cfg.split} is not a split: use split=test or split=val")

    overrides = {key: data_settings[key] for key in SPLIT_SETTINGS if key in data_settings}
    datamodule = instantiate(cfg.data, **overrides)
    datamodule.prepare_data()
    datamodule.setup()
    if cfg.split == "val" and validation_digest not in (None, datamodule.validation_digest):
        log.warning(
            "split=val: the data in %s gives other validation images than the run's (it was "
            "trained on %s, with those files as they were then): these are not the metrics "
            "the run was selected by",
            datamodule.data_dir, data_settings.get("data_dir"),
        )  # fmt: skip
    dataset = datamodule.data_test if cfg.split == "test" else datamodule.data_val
    logits = predict_logits(model, dataset.images, cfg.data.eval_batch_size, device)
    report = classification_report(logits, dataset.labels)
    report.update(checkpoint=str(checkpoint), split=cfg.split)

    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s accuracy %.4f, loss %.4f\n%s", cfg.split, report["accuracy"], report["loss"],
             format_table(report))  # fmt: skip
    figures = {
        "confusion_matrix": plot_confusion_matrix(torch.tensor(report["confusion_matrix"])),
        "errors": plot_errors(dataset.images, dataset.labels, logits, cfg.num_errors),
    }
    with SummaryWriter(output_dir / "tensorboard") as writer:
        for name, figure in figures.items():
            figure.savefig(output_dir / f"{name}.png", dpi=120)
            writer.add_figure(f"{cfg.split}/{name}", figure, close=False)
        writer.add_scalar(f"{cfg.split}/acc", report["accuracy"])
        writer.add_scalar(f"{cfg.split}/loss", report["loss"])
    return report


def _predict_exported(cfg: DictConfig, model_path: Path) -> dict[str, Any]:
    """`predict=` with a model that export.py wrote, run by onnxruntime on the CPU."""
    if cfg.predict in (None, ""):
        raise UserError(
            f"ckpt_path={model_path} is an exported model: eval.py classifies image files with "
            "it (predict=<image or folder>); test a split with the checkpoint it came from"
        )
    classify = OnnxClassifier(model_path)
    log.info("Running the exported model in onnxruntime on the CPU, in float32")
    return _write_predictions(cfg, classify)


def _write_predictions(cfg: DictConfig, classify: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """predictions.csv for the image files of `predict=`, in the evaluation's folder."""
    csv_path = _output_dir(cfg) / "predictions.csv"
    return {"predictions": len(predict_files(classify, Path(str(cfg.predict)), csv_path))}


def _output_dir(cfg: DictConfig) -> Path:
    """The evaluation's folder, made and logged."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("Writing to %s", output_dir)
    return output_dir


def classification_report(logits: Tensor, labels: Tensor) -> dict[str, Any]:
    """Overall, macro and per-class metrics (torchmetrics), and the confusion matrix."""
    num_classes = len(CLASSES)
    per_class = {
        "precision": MulticlassPrecision(num_classes, average=None),
        "recall": MulticlassRecall(num_classes, average=None),
        "f1": MulticlassF1Score(num_classes, average=None),
        # torchmetrics' per-class accuracy: the share of the class's images classified right.
        "accuracy": MulticlassAccuracy(num_classes, average=None),
    }
    values = {name: metric(logits, labels).tolist() for name, metric in per_class.items()}
    matrix = MulticlassConfusionMatrix(num_classes)(logits, labels)
    return {
        "accuracy": MulticlassAccuracy(num_classes, average="micro")(logits, labels).item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "macro": {name: sum(v) / num_classes for name, v in values.items()},
        "per_class": {
            name: {metric: v[label] for metric, v in values.items()}
            | {"support": int(matrix[label].sum())}
            for label, name in enumerate(CLASSES)
        },
        "confusion_matrix": matrix.tolist(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The per-class metrics as a plain-text table."""
    lines = [f"{'class':<11}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}"]
    rows = [*report["per_class"].items(), ("macro", report["macro"])]
    for name, row in rows:
        support = f"{row['support']:>9}" if "support" in row else ""
        lines.append(
            f"{name:<11}{row['precision']:>10.4f}{row['recall']:>8.4f}{row['f1']:>8.4f}{support}"
        )
    return "\n".join(lines)


def plot_confusion_matrix(matrix: Tensor) -> Figure:
    """Counts in the cells, colours normalised per true class (each row sums to 1)."""
    rates = (matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    figure = Figure(figsize=(7.5, 6.5), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for true in range(len(CLASSES)):
        for predicted in range(len(CLASSES)):
            dark = rates[true, predicted] > 0.5
            axes.text(predicted, true, int(matrix[true, predicted]), ha="center", va="center",
                      fontsize=8, color="white" if dark else "black")  # fmt: skip
    ticks = range(len(CLASSES))
    axes.set_xticks(ticks, CLASSES, rotation=45, ha="right")
    axes.set_yticks(ticks, CLASSES)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    figure.colorbar(image, ax=axes, label="share of the true class")
    return figure


def plot_errors(images: Tensor, labels: Tensor, logits: Tensor, count: int) -> Figure:
    """The `count` wrong predictions made with the highest confidence."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)[:count]]
    columns = 8
    rows = max(1, -(-len(worst) // columns))
    figure = Figure(figsize=(2 * columns, 2.3 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).flat
    for axes, index in zip(grid, worst.tolist(), strict=False):  # the last row may be short
        axes.imshow(images[index].permute(1, 2, 0).numpy())
        axes.set_title(
            f"{CLASSES[labels[index]]} → {CLASSES[predicted[index]]}\n{confidence[index]:.0%}",
            fontsize=9,
        )
    for axes in figure.axes:
        axes.set_axis_off()
    figure.suptitle("Most confident mistakes (true → predicted, confidence)")
    return figure


def _in_precision(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """`model` on `device`, computing in `precision` (Lightning's names) as a Trainer does in
    the run's own test: under bf16-mixed, autocast around float32 inputs. Not Fabric's
    wrapper: its bf16-mixed also rounds the inputs to bf16, which changes the metrics of a
    net that normalises its inputs first (FastCNN). As in training, a precision the device
    lacks becomes the one Lightning takes instead (16-mixed on a CPU: bf16-mixed, with
    Lightning's warning)."""
    plugin = _precision_plugin(precision, device)
    log.info("Evaluating in precision %s", plugin.precision)
    return _InPrecision(plugin.convert_module(model.to(device)), plugin)


def _precision_plugin(precision: str, device: torch.device) -> Precision:
    """The precision plugin that a Trainer on `device` chooses for `precision`. The Trainer's
    report of the machine's devices is left out: it is about a Trainer's arguments ("GPU
    available but not used"), which eval.py does not take."""
    devices = [device.index or 0] if device.type == "cuda" else 1
    device_report = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = device_report.level
    device_report.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*GPU available but not used")
            trainer = L.Trainer(
                accelerator=device.type, devices=devices, precision=precision, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            )  # fmt: skip
    except ValueError as error:
        raise UserError(f"precision={precision} is not allowed: {error}") from error
    finally:
        device_report.setLevel(level)
    return trainer.precision_plugin


class _InPrecision(nn.Module):
    """A net whose forward passes go through a Trainer's precision plugin, as in its test."""

    def __init__(self, model: nn.Module, plugin: Precision) -> None:
        super().__init__()
        self.model = model
        self.plugin = plugin

    def forward(self, images: Tensor) -> Tensor:
        with self.plugin.forward_context():
            return self.model(self.plugin.convert_input(images))


def _device(name: str) -> torch.device:
    """`device=auto|cpu|cuda|cuda:N` as a device that this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refused = UserError(f"device={name} is not allowed: use auto, cpu, cuda or cuda:<index>")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise refused from error
    if device.type not in ("cpu", "cuda"):
        raise refused
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}, but this machine has no GPU that torch can use")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device={name}, but this machine has {torch.cuda.device_count()} GPUs")
    return device
