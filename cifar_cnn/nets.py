"""Networks: plain `nn.Module`s that map float images in [0, 1] to class logits."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SeedCNN(nn.Module):
    """The Keras tutorial's CNN: valid 3x3 conv, ReLU, 2x2 max-pool stages, then an MLP head.

    With the defaults it has exactly the seed's 315,722 parameters. Each stage pools before
    its ReLU: ReLU and max commute, so outputs and gradients are the tutorial's to the bit,
    and the ReLU runs on a quarter of the values (epochs 9-13% shorter on the project's 2-core
    CPU; benchmarks/README.md).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        conv_channels: Sequence[int] = (32, 64),
        hidden_units: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        size = image_size
        for out_channels in conv_channels:
            stages += [nn.Conv2d(in_channels, out_channels, 3), nn.MaxPool2d(2), nn.ReLU()]
            in_channels = out_channels
            size = (size - 2) // 2  # a valid 3x3 conv loses 2 pixels, the pool halves
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * size * size, hidden_units),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_units, num_classes),
        )
        self.apply(_keras_init)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def _keras_init(module: nn.Module) -> None:
    """Keras' defaults (Glorot-uniform weights, zero biases), so the seed trains as it did there."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


# CIFAR-10's per-channel mean and standard deviation of the training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class FastCNN(nn.Module):
    """airbench's network: a 2x2 stem conv, three conv stages, global max pool, scaled linear head.

    Each stage is conv-pool-BN-GELU-conv-BN-GELU and halves the image (31 -> 15 -> 7 -> 3).
    As in airbench, `whiten_stem` can set the stem's filters from training images and freeze
    them (the callbacks.WhitenStem callback does it before training); else the stem learns.
    The net normalises its [0, 1] input itself, so it takes the same images as SeedCNN. With
    the defaults it has 1,972,792 parameters (1,152 of them the frozen BatchNorm scales, and
    the stem's 288 weights once whitened).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        stem_channels: int = 24,
        batchnorm_momentum: float = 0.4,
        logit_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR10_STD)[:, None, None], persistent=False)
        self.stem = nn.Conv2d(in_channels, stem_channels, kernel_size=2)
        stages, channels = [], stem_channels
        for width in widths:
            stages.append(ConvStage(channels, width, batchnorm_momentum))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def whiten_stem(self, images: Tensor, eps: float = 5e-4) -> None:
        """Sets the stem's filters to whiten the 2x2 patches of `images` (floats in [0, 1]):
        the eigenvectors of their second-moment matrix, scaled by 1 / sqrt(eigenvalue + eps),
        each with its negative (so the stem needs 2 * 3 * 2 * 2 = 24 channels); they stay. The
        bias starts at 0."""
        weight = self.stem.weight  # (out, in, 2, 2)
        out_channels, in_channels, height, width = weight.shape
        if out_channels != 2 * in_channels * height * width:
            raise ValueError(
                f"whitening needs stem_channels={2 * in_channels * height * width}, "
                f"not {out_channels}"
            )
        x = self._normalize(images.to(weight.device).float())
        patches = x.unfold(2, height, 1).unfold(3, width, 1)  # (N, C, H', W', h, w)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, in_channels * height * width)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.flip(0)  # largest first
        filters = filters.reshape(-1, in_channels, height, width)
        weight.copy_(torch.cat([filters, -filters]))
        weight.requires_grad_(False)
        nn.init.zeros_(self.stem.bias)  # the whitened patches, centred as they come

    def _normalize(self, images: Tensor) -> Tensor:
        """Images in [0, 1] to CIFAR-10's zero mean and unit variance per channel: what the stem
        sees, in training and when it is whitened."""
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        x = self._normalize(images)  # (N, 3, 32, 32)
        x = F.gelu(self.stem(x))  # (N, 24, 31, 31)
        x = self.stages(x)  # (N, 256, 3, 3)
        # Global max pool by a pooling op, whose backward routes through saved indices: the
        # backward of `amax` compares again with the maximum, and compiled under bf16 autocast
        # that comparison can miss and divide by zero (NaN gradients; pytorch issue 186799).
        x = F.adaptive_max_pool2d(x, 1).flatten(1)  # (N, 256)
        return self.head(x) * self.logit_scale  # (N, classes)


class ConvStage(nn.Module):
    """conv 3x3, 2x2 max-pool, BN, GELU, conv 3x3, BN, GELU: one of FastCNN's stages."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm_momentum: float) -> None:
        super().__init__()
        self.conv1 = _identity_conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _shift_only_batchnorm(out_channels, batchnorm_momentum)
        self.conv2 = _identity_conv(out_channels, out_channels)
        self.norm2 = _shift_only_batchnorm(out_channels, batchnorm_momentum)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv1(x))  # (N, out, H / 2, W / 2)
        x = F.gelu(self.norm1(x))
        return F.gelu(self.norm2(self.conv2(x)))


def _identity_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A bias-free 3x3 'same' conv whose first `in_channels` filters start as the identity
    (airbench's Dirac initialisation): the stage starts by passing its input through."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding="same", bias=False)
    first = min(in_channels, out_channels)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:first])
    return conv


def _shift_only_batchnorm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm with its scale frozen at 1: only the shift (bias) learns, as in airbench."""
    norm = nn.BatchNorm2d(channels, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm
