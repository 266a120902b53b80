"""Seeded epoch orders, each process's share, and batches sliced on the device."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cifar_cnn.data.loading import epoch_order

from ..conftest import ready


@pytest.mark.parametrize("on_device", [False, True])
def test_evaluation_batches_are_in_order_and_keep_the_last_partial_one(
    on_device: bool, tiny_data_dir: Path, tmp_path: Path
) -> None:
    datamodule = ready(
        tiny_data_dir, tmp_path / "cache", on_device=on_device, eval_batch_size=16, drop_last=True
    )
    batches = list(datamodule.test_dataloader())
    assert [len(labels) for _, labels in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([images for images, _ in batches]), datamodule.data_test.images)
    val = [len(labels) for _, labels in datamodule.val_dataloader()]
    assert val == [16, 4]  # 20 of the 100 training images


@pytest.mark.parametrize("on_device", [False, True])
def test_processes_train_on_equal_disjoint_shares_and_evaluate_each_image_once(
    on_device: bool, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Three processes: 80 training images give each 26 (two sit out the epoch); the 40
    test images are evaluated once over all of them."""
    training, testing = [], []
    for rank in range(3):
        datamodule = ready(tiny_data_dir, tmp_path / "cache", on_device=on_device, batch_size=8)
        datamodule.trainer = SimpleNamespace(
            global_rank=rank, world_size=3, training=False,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )  # fmt: skip
        training.append(torch.cat([images for images, _ in datamodule.train_dataloader()]))
        testing.append(torch.cat([images for images, _ in datamodule.test_dataloader()]))

    assert [len(images) for images in training] == [26, 26, 26]
    trained = {image.numpy().tobytes() for images in training for image in images}
    assert len(trained) == 78  # no image in two shares
    tested = sorted(image.numpy().tobytes() for images in testing for image in images)
    assert tested == sorted(image.numpy().tobytes() for image in datamodule.data_test.images)


def test_epoch_order_depends_on_seed_and_epoch_alone() -> None:
    order = epoch_order(100, seed=42, epoch=3)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, epoch_order(100, seed=42, epoch=3))
    others = [epoch_order(100, 42, 4), epoch_order(100, 43, 3), epoch_order(100, 43, 2)]
    assert all(not torch.equal(order, other) for other in others)
