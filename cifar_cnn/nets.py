"""Networks: plain `nn.Module`s that map float images in [0, 1] to class logits.

The fast recipe's net, `FastCNN`, lives with the rest of that recipe in `fast_recipe.py`.
"""

from collections.abc import Sequence

from torch import Tensor, nn


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
