"""Augmentation of training batches on the images' device: flips and shifts as batched tensor
ops, torchvision's policies (AutoAugment, RandAugment, TrivialAugment, RandomErasing) image by
image, and MixUp or CutMix over the batch."""

import importlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor
from torchvision.transforms import v2

from cifar_cnn.errors import UserError


def augment(images: Tensor, flip: bool, padding: int) -> Tensor:
    """Per image: a random horizontal flip, and a random shift of up to `padding` pixels (a
    crop of the reflect-padded image). Draws from torch's global generator."""
    count, channels, height, width = images.shape
    device = images.device
    if flip:
        flipped = torch.rand(count, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if padding:
        padded = F.pad(images, (padding,) * 4, mode="reflect")
        top, left = torch.randint(0, 2 * padding + 1, (2, count, 1), device=device)
        rows = top + torch.arange(height, device=device)  # (count, height)
        columns = left + torch.arange(width, device=device)  # (count, width)
        images = padded[
            torch.arange(count, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]
    return images


class ImagePolicy:
    """torchvision v2 transforms applied in turn to each image of a batch, each image with its
    own draws from torch's global generator.

    One image at a time: a v2 transform called on a batch draws once for the whole batch (the
    same operation and magnitude for every image). `transforms` maps names to `_target_`
    mappings of `torchvision.transforms.v2` classes, applied in the mapping's order.
    """

    def __init__(self, transforms: Mapping[str, Mapping[str, Any]]) -> None:
        for name, config in transforms.items():
            require_v2_transform(f"data.augment.{name}", config)
        self.transform = v2.Compose([instantiate(c) for c in transforms.values()])

    def __call__(self, images: Tensor) -> Tensor:  # (N, 3, H, W) floats in [0, 1]
        return torch.stack([self.transform(image) for image in images])


class BatchMix:
    """MixUp or CutMix of a training batch (`torchvision.transforms.v2`): images blended or
    pasted pairwise, labels turned into class probabilities (N, classes) in the same
    proportions. With both, each batch draws one of them."""

    def __init__(self, transforms: Mapping[str, Mapping[str, Any]]) -> None:
        for name, config in transforms.items():
            require_v2_transform(f"data.mix.{name}", config)
        mixes = [instantiate(c) for c in transforms.values()]
        self.transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(images, labels)


def require_v2_transform(key: str, config: Mapping[str, Any]) -> None:
    """Refuses, naming the key, a config that is no `torchvision.transforms.v2` class: the
    data module's hyperparameters, checkpointed, must name nothing else to build."""
    target = str(config.get("_target_", "")) if isinstance(config, Mapping) else ""
    module_name, _, name = target.rpartition(".")
    found = None
    if module_name == "torchvision.transforms.v2":
        found = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(found, type) and issubclass(found, v2.Transform)):
        raise UserError(
            f"{key} must be a mapping with a `_target_` of torchvision.transforms.v2 (for "
            f"example torchvision.transforms.v2.TrivialAugmentWide), not {config!r}"
        )
