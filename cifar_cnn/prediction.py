"""Classifying image files of any size and mode with a trained classifier."""

import csv
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from cifar_cnn.data.images import CLASSES, deeper_than_8_bits, to_float_images, upright_rgb
from cifar_cnn.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
TOP_K = 3
BATCH_SIZE = 256


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: Tensor, batch_size: int, device: torch.device
) -> Tensor:
    """Logits (on the CPU) for uint8 images (N, 3, 32, 32), preprocessed as in training."""
    model = model.to(device).eval()
    batches = images.split(batch_size)
    return torch.cat([model(to_float_images(batch.to(device))).float().cpu() for batch in batches])


def checkpoint_classifier(model: nn.Module, device: torch.device) -> Callable[[Tensor], Tensor]:
    """`model` (taking floats in [0, 1]) as `predict_files` takes it: uint8 images to logits."""
    return partial(predict_logits, model, batch_size=BATCH_SIZE, device=device)


def load_image_file(path: Path) -> Tensor:
    """An image file as a uint8 (3, 32, 32) tensor, like the CIFAR-10 training images.

    Read as the training images are (`upright_rgb`), then the centre square is cropped
    before resizing, so that nothing is stretched. Raises OSError for non-images, ValueError
    for images of more than 8 bits a channel.
    """
    with Image.open(path) as image:
        if deeper_than_8_bits(image):
            raise ValueError(f"{image.mode} pixels (16 or 32 bits); convert it to 8 bits")
        image = ImageOps.fit(upright_rgb(image), (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def predict_files(
    classify: Callable[[Tensor], Tensor], source: Path, csv_path: Path
) -> list[list[str]]:
    """Classifies `source` (a file, or every file below a folder); writes `csv_path`.

    `classify` maps uint8 images (N, 3, 32, 32) to logits on the CPU: a checkpoint's model
    (`checkpoint_classifier`) or an exported one (`cifar_cnn.export.OnnxClassifier`). Files
    that are not images are reported by name and skipped.
    """
    if not source.exists():
        raise UserError(f"predict={source} does not exist")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise UserError(f"predict={source} is an empty folder: no image files to classify")
    images, readable = [], []
    for path in files:
        try:
            images.append(load_image_file(path))
            readable.append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            log.warning("skipped %s: not a readable image (%s)", path, error)
    if not readable:
        raise UserError(f"none of the {len(files)} files in {source} is a readable image")

    probabilities = classify(torch.stack(images)).softmax(dim=1)
    top = probabilities.topk(TOP_K, dim=1)
    rows = [
        [str(path)]
        + [value for k in range(TOP_K) for value in (CLASSES[labels[k]], f"{probs[k]:.4f}")]
        for path, probs, labels in zip(
            readable, top.values.tolist(), top.indices.tolist(), strict=True
        )
    ]
    header = ["file", "class", "probability"]
    header += [f"{rank}{suffix}" for rank in ("second", "third") for suffix in ("", "_probability")]
    with csv_path.open("w", newline="") as out:
        csv.writer(out).writerows([header, *rows])
    table = "\n".join(f"{row[1]:<11}{float(row[2]):>6.1%}  {row[0]}" for row in rows)
    log.info("Predictions (%d files, %s):\n%s", len(rows), csv_path, table)
    return rows
