"""Flips and shifts of training batches."""

import torch

from cifar_cnn.data.augmentation import augment


def test_augment_flips_and_shifts_each_image_on_its_own() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 32)
    assert torch.equal(augment(images, flip=False, padding=0), images)

    flipped = augment(images, flip=True, padding=0)
    mirrored = [torch.equal(a, b.flip(2)) for a, b in zip(flipped, images, strict=True)]
    assert all(m or torch.equal(a, b) for m, a, b in zip(mirrored, flipped, images, strict=True))
    assert 10 < sum(mirrored) < 54  # about half

    shifted = augment(images, flip=False, padding=4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
    offsets = set()
    for out, source in zip(shifted, padded, strict=True):
        [offset] = [
            (y, x) for y in range(9) for x in range(9)
            if torch.equal(out, source[:, y : y + 32, x : x + 32])
        ]  # fmt: skip
        offsets.add(offset)
    assert len(offsets) > 20  # the shifts differ from image to image
