"""Networks: plain `nn.Module`s that map float images in [0, 1] to class logits.

The fast recipe's net, `FastCNN`, lives with the rest of that recipe in `fast_recipe.py`.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet


class TutorialCNN(nn.Module):
    """The Keras tutorial's CNN: valid 3x3 conv, ReLU, 2x2 max-pool stages, then an MLP head.

    With the defaults it has exactly the tutorial's 315,722 parameters. Each stage pools
    before its ReLU: ReLU and max commute, so outputs and gradients are the tutorial's to the
    bit, and the ReLU runs on a quarter of the values.
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
    """Keras' defaults (Glorot-uniform weights, zero biases), so the net trains as it did there."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class CifarResNet(ResNet):
    """torchvision's ResNet with BasicBlocks, its stem made for 32x32 images as in the ResNet
    paper's CIFAR nets: a 3x3 stride-1 convolution and no max-pool, so the four stages see
    32, 16, 8 and 4 pixels. `blocks=(2, 2, 2, 2)`: ResNet-18, 11,173,962 parameters."""

    def __init__(self, num_classes: int = 10, blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__(BasicBlock, list(blocks), num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()


class WideResNet(nn.Module):
    """Wide residual network WRN-`depth`-`width` (Zagoruyko and Komodakis, 2016): three stages
    of pre-activation blocks with 16, 32 and 64 times `width` channels. WRN-16-8 has
    10,961,370 parameters, WRN-28-10 36,479,194. torchvision has no such CIFAR net."""

    def __init__(
        self, num_classes: int = 10, depth: int = 16, width: int = 8, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth}: a WideResNet's depth is 6 * n + 4 (16, 22, 28)")
        blocks_per_stage = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        stages = []
        for stage, out_channels in enumerate(channels[1:]):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                in_channels = channels[stage] if block == 0 else out_channels
                stages.append(PreActBlock(in_channels, out_channels, stride, dropout))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels[-1])
        self.fc = nn.Linear(channels[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stages(self.stem(images))  # (N, 64 * width, 8, 8)
        x = F.relu(self.norm(x))
        return self.fc(x.mean(dim=(2, 3)))  # (N, classes)


class PreActBlock(nn.Module):
    """BatchNorm, ReLU, 3x3 conv, twice, around a shortcut (a 1x1 conv where the shape
    changes); dropout between the two convs."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.norm2(out))))
        return out + shortcut
