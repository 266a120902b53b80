"""The fast recipe (`experiment=fast`), after airbench: its net, the callbacks that whiten the
net's stem before training and pull the weights to their running average, and its schedule.

Each part is plain PyTorch or a Lightning callback; the configs put them together
(conf/model/fast_cnn.yaml, conf/experiment/fast.yaml).
"""

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cifar_cnn.data.images import to_float_images
from cifar_cnn.errors import UserError

# CIFAR-10's per-channel mean and standard deviation of the training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class FastCNN(nn.Module):
    """airbench's network: a 2x2 stem conv, three conv stages, global max pool, scaled linear head.

    Each stage is conv-pool-BN-GELU-conv-BN-GELU and halves the image (31 -> 15 -> 7 -> 3).
    As in airbench, `whiten_stem` can set the stem's filters from training images and freeze
    them (the WhitenStem callback below does it before training); else the stem learns.
    The net normalises its [0, 1] input itself, so it takes the same images as TutorialCNN. With
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
        # that comparison can miss and divide by zero (NaN gradients; pytorch/pytorch#186799).
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


class WhitenStem(Callback):
    """airbench's data-dependent start: before training, the net's stem whitens the 2x2
    patches of the first `images` training images (`FastCNN.whiten_stem`); its bias learns
    for the first `bias_epochs` epochs, then stays. A resumed run takes the stem from its
    checkpoint, which Lightning loads after this sets it."""

    def __init__(self, images: int = 5000, bias_epochs: int = 3) -> None:
        self.images = images
        self.bias_epochs = bias_epochs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = pl_module.net
        if not hasattr(net, "whiten_stem"):
            raise UserError(
                f"callbacks.whiten_stem needs a net with a whiten_stem method (FastCNN); "
                f"{type(net).__name__} has none"
            )
        train_images = trainer.datamodule.data_train.images[: self.images]
        net.whiten_stem(to_float_images(train_images))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # No gradient, no step (nor momentum or decay). Not requires_grad=False: DDP expects
        # the parameters it was given to keep getting gradients.
        if trainer.current_epoch >= self.bias_epochs:
            pl_module.net.stem.bias.grad = None


class Lookahead(Callback):
    """airbench's lookahead: every `every_n_steps` steps the weights move to a running average
    of themselves (the average `decay` of the way back, `decay` growing as the cube of the
    run's progress up to `final_decay`); at the last step they become that average.

    Not Lightning's WeightAveraging: that keeps the average beside the net, while this writes
    it back into the net, which trains on from there. The average is saved in checkpoints.
    """

    def __init__(self, every_n_steps: int = 5, final_decay: float = 0.95**5) -> None:
        self.every_n_steps = every_n_steps
        self.final_decay = final_decay
        self._average: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self._total_steps = 0
        self._averaged_at = 0  # the last step seen: batches of an accumulation window share one

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total_steps = trainer.estimated_stepping_batches
        self._averaged_at = trainer.global_step
        # The net's floating-point state, as airbench: parameters and BatchNorm statistics
        # (views of the net's own tensors: writing them writes the net).
        self._weights = [t for t in pl_module.net.state_dict().values() if t.is_floating_point()]
        if self._average:  # resumed: the average from the checkpoint
            pairs = zip(self._average, self._weights, strict=True)
            self._average = [average.to(weight.device) for average, weight in pairs]
        else:
            self._average = [weight.clone() for weight in self._weights]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        step, total = trainer.global_step, self._total_steps
        if step == self._averaged_at:  # no optimizer step since: gradients accumulate
            return
        self._averaged_at = step
        last = step >= total
        if step % self.every_n_steps and not last:
            return
        with torch.no_grad():
            if step % self.every_n_steps == 0:
                decay = self.final_decay * min(step / total, 1.0) ** 3
                torch._foreach_lerp_(self._average, self._weights, 1 - decay)
            torch._foreach_copy_(self._weights, self._average)  # the last step: the net becomes it

    def state_dict(self) -> dict[str, Any]:
        return {"average": self._average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._average = list(state_dict["average"])


class TriangularLR(LambdaLR):
    """airbench's schedule: each group's rate rises linearly from `start_factor` times its own
    to its own over the first `peak_fraction` of `total_steps`, then falls linearly to
    `end_factor` times its own.

    It scales each group's own rate, so `norm_bias_lr_scale`'s ratio between groups stays
    (OneCycleLR would set one rate for all groups).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        peak_fraction: float = 0.2,
        start_factor: float = 0.2,
        end_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        steps = [0, peak_fraction * total_steps, total_steps]

        def factor(step: int) -> float:
            return float(np.interp(step, steps, [start_factor, 1.0, end_factor]))

        super().__init__(optimizer, factor, last_epoch)
