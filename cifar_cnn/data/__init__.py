"""CIFAR-10 for training and evaluation, one module per reason to change:

- `sources`: the two layouts on disk, their listing and decoding, the decode cache;
- `loading`: in-memory datasets, seeded epoch orders, each process's share, device batches;
- `augmentation`: flips and shifts of training batches, on the device;
- `images`: the classes, and the image conversions that prediction shares;
- `datamodule`: `CIFAR10DataModule`, which puts them together for Lightning.
"""

from cifar_cnn.data.datamodule import CIFAR10DataModule
from cifar_cnn.data.images import CLASSES

__all__ = ["CLASSES", "CIFAR10DataModule"]
