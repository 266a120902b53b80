"""CIFAR10DataModule: the split, the batches of both data paths, what reaches the model."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cnn.data import CLASSES, CIFAR10DataModule
from cifar_cnn.data.loading import DeviceBatches, epoch_order
from cifar_cnn.errors import UserError

from ..conftest import ready
from .test_augmentation import POLICIES


@pytest.fixture(scope="module")
def real(data_dir: Path, cache_dir: Path) -> CIFAR10DataModule:
    return ready(data_dir, cache_dir)


def test_real_split_sizes(real: CIFAR10DataModule) -> None:
    assert (len(real.data_train), len(real.data_val), len(real.data_test)) == (
        40_000,
        10_000,
        10_000,
    )


def test_real_labels_are_cifar10_order_and_balanced(
    real: CIFAR10DataModule, data_dir: Path
) -> None:
    train_labels = torch.cat([real.data_train.labels, real.data_val.labels])
    assert torch.bincount(train_labels).tolist() == [5000] * 10
    assert torch.bincount(real.data_test.labels).tolist() == [1000] * 10
    # The test set: each class's first file (by name), then each one's second, ...
    for label, name in enumerate(CLASSES):
        first = np.array(Image.open(min((data_dir / "test" / name).iterdir())))
        assert torch.equal(real.data_test.images[label], torch.from_numpy(first).permute(2, 0, 1))
    assert real.data_test.labels.tolist() == list(range(10)) * 1000


def test_real_batches_are_uint8_then_floats_in_unit_range(real: CIFAR10DataModule) -> None:
    images, labels = next(iter(real.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (64,) and labels.dtype == torch.int64
    floats, same_labels = real.on_after_batch_transfer((images, labels), 0)
    assert floats.dtype == torch.float32 and same_labels is labels
    assert 0.0 <= floats.min() < 0.1 and 0.9 < floats.max() <= 1.0
    assert torch.allclose(floats * 255, images.float())


def test_val_images_come_from_the_training_set_only(real: CIFAR10DataModule) -> None:
    val = {bytes(image.numpy()) for image in real.data_val.images[:500]}
    train = {bytes(image.numpy()) for image in real.data_train.images}
    test = {bytes(image.numpy()) for image in real.data_test.images}
    assert not val & train and not val & test


def test_split_is_seeded_and_stable(tiny_data_dir: Path, tmp_path: Path) -> None:
    first = ready(tiny_data_dir, tmp_path / "cache", val_fraction=0.3, split_seed=7)
    again = ready(tiny_data_dir, tmp_path / "cache", val_fraction=0.3, split_seed=7)
    other = ready(tiny_data_dir, tmp_path / "cache", val_fraction=0.3, split_seed=8)
    assert (len(first.data_train), len(first.data_val), len(first.data_test)) == (70, 30, 40)
    assert torch.equal(first.data_val.images, again.data_val.images)
    assert not torch.equal(first.data_val.images, other.data_val.images)


def test_val_fraction_0_gives_every_training_image_to_training(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Only code asks for it (benchmarks/airbench_reference.py); configs refuse 0."""
    datamodule = ready(tiny_data_dir, tmp_path / "cache", val_fraction=0)
    assert (len(datamodule.data_train), len(datamodule.data_val)) == (100, 0)


@pytest.mark.parametrize(("fraction", "empty"), [(0.001, "validation"), (0.999, "training")])
def test_a_val_fraction_that_leaves_a_split_empty_is_named(
    fraction: float, empty: str, tiny_data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=f"data.val_fraction={fraction} of the 100 training "
                       f"images leaves no {empty} images"):  # fmt: skip
        ready(tiny_data_dir, tmp_path / "cache", val_fraction=fraction)


def test_a_batch_larger_than_the_training_set_with_drop_last_is_named(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    datamodule = ready(tiny_data_dir, tmp_path / "cache", batch_size=81, drop_last=True)
    with pytest.raises(UserError, match="data.batch_size=81 with data.drop_last=true leaves no "
                       "training batch: an epoch has 80 training images"):  # fmt: skip
        datamodule.train_dataloader()
    assert len(ready(tiny_data_dir, tmp_path / "cache", batch_size=80, drop_last=True)
               .train_dataloader()) == 1  # fmt: skip


def test_only_training_batches_are_augmented(tiny_data_dir: Path, tmp_path: Path) -> None:
    datamodule = ready(tiny_data_dir, tmp_path / "cache", flip=True, crop_padding=4)
    batch = next(iter(datamodule.train_dataloader()))
    plain = batch[0].float() / 255
    for training in (False, True):
        datamodule.trainer = SimpleNamespace(training=training)
        images, _ = datamodule.on_after_batch_transfer(batch, 0)
        assert torch.equal(images, plain) != training


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
    return list(loader)


MIXUP = {"_target_": "torchvision.transforms.v2.MixUp", "num_classes": 10}
CUTMIX = {"_target_": "torchvision.transforms.v2.CutMix", "num_classes": 10}


@pytest.mark.parametrize(
    ("drop_last", "augment"),
    [(False, None), (True, None), *[(False, [name]) for name in POLICIES], (False, ["all"])],
)
def test_device_path_and_dataloader_give_the_same_batches(
    drop_last: bool, augment: list[str] | None, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """80 training images in batches of 24: three full batches and a last one of 8. Under
    each policy, and all of them with MixUp and CutMix."""
    settings = dict(batch_size=24, shuffle_seed=3, drop_last=drop_last, flip=True, crop_padding=2)
    if augment:
        everything = augment == ["all"]
        settings["augment"] = POLICIES if everything else {augment[0]: POLICIES[augment[0]]}
        settings["mix"] = {"mixup": MIXUP, "cutmix": CUTMIX} if everything else None
    loader = ready(tiny_data_dir, tmp_path / "cache", **settings)
    device = ready(tiny_data_dir, tmp_path / "cache", on_device=True, **settings)
    on_device = device.train_dataloader()
    assert isinstance(on_device, DeviceBatches)
    assert len(on_device) == len(loader.train_dataloader()) == (3 if drop_last else 4)
    for epoch in (0, 1):
        expected = epoch_batches(loader.train_dataloader(), epoch)
        batches = epoch_batches(on_device, epoch)
        assert [len(labels) for _, labels in batches] == [24, 24, 24] + ([] if drop_last else [8])
        for (images, labels), (same_images, same_labels) in zip(expected, batches, strict=True):
            assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
            augmented = []
            for datamodule, batch in ((loader, (images, labels)), (device, (same_images, labels))):
                datamodule.trainer = SimpleNamespace(training=True)
                torch.manual_seed(epoch)  # the augmentation draws alike too
                augmented.append(datamodule.on_after_batch_transfer(batch, 0))
                datamodule.trainer = None
            for expected_tensor, tensor in zip(*augmented, strict=True):  # images, labels
                assert torch.equal(expected_tensor, tensor)
    first, second = (epoch_batches(on_device, epoch)[0][1] for epoch in (0, 1))
    assert not torch.equal(first, second)  # a new order every epoch


def test_the_shuffle_seed_defaults_to_the_run_seed(tiny_data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(7)  # what seed_everything(7) does to torch
    sampler = ready(tiny_data_dir, tmp_path / "cache").train_dataloader().sampler
    assert sampler.seed == 7
    assert list(sampler) == epoch_order(80, seed=7, epoch=0).tolist()


def test_augmented_device_batches_keep_shape_type_and_range(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    datamodule = ready(tiny_data_dir, tmp_path / "cache", on_device=True, flip=True, crop_padding=4)
    images, labels = next(iter(datamodule.train_dataloader()))
    datamodule.trainer = SimpleNamespace(training=True)
    floats, same_labels = datamodule.on_after_batch_transfer((images, labels), 0)
    assert floats.shape == images.shape == (64, 3, 32, 32) and floats.dtype == torch.float32
    assert floats.min() >= 0.0 and floats.max() <= 1.0
    assert same_labels is labels and labels.dtype == torch.int64
