"""Flips and shifts of training batches, torchvision's policies image by image, MixUp and
CutMix."""

import pytest
import torch

from cifar_cnn.data.augmentation import BatchMix, ImagePolicy, augment
from cifar_cnn.errors import UserError


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


POLICIES = {
    "autoaugment": {
        "_target_": "torchvision.transforms.v2.AutoAugment",
        "policy": {"_target_": "torchvision.transforms.v2.AutoAugmentPolicy", "value": "cifar10"},
    },
    "randaugment": {"_target_": "torchvision.transforms.v2.RandAugment"},
    "trivialaugment": {"_target_": "torchvision.transforms.v2.TrivialAugmentWide"},
    "cutout": {"_target_": "torchvision.transforms.v2.RandomErasing", "p": 1.0, "value": 0},
}


def synthetic_batch(count: int = 32) -> torch.Tensor:
    """Floats in [0, 1] from uint8 pixels, as the data module augments them."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator) / 255


@pytest.mark.parametrize("name", POLICIES)
def test_each_policy_draws_per_image_within_range_and_repeats_with_the_seed(name: str) -> None:
    policy = ImagePolicy({name: POLICIES[name]})
    images = synthetic_batch()
    torch.manual_seed(1)
    out = policy(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    torch.manual_seed(1)
    assert torch.equal(policy(images), out)
    torch.manual_seed(2)
    assert not torch.equal(policy(images), out)
    # Different draws within one batch: the same image, copied, comes out in several ways.
    copies = images[:1].expand(32, -1, -1, -1)
    variants = {tuple(image.flatten()[::97].tolist()) for image in policy(copies)}
    assert len(variants) > 4


def test_policies_apply_in_the_order_of_their_mapping() -> None:
    policy = ImagePolicy(
        {"cutout": POLICIES["cutout"], "trivialaugment": POLICIES["trivialaugment"]}
    )
    assert [type(t).__name__ for t in policy.transform.transforms] == [
        "RandomErasing", "TrivialAugmentWide",
    ]  # fmt: skip


@pytest.mark.parametrize("names", [["mixup"], ["cutmix"], ["mixup", "cutmix"]])
def test_mixed_labels_are_class_probabilities_of_the_images_blended(names: list[str]) -> None:
    mixes = {
        name: {"_target_": f"torchvision.transforms.v2.{kind}", "alpha": 1.0, "num_classes": 10}
        for name, kind in (("mixup", "MixUp"), ("cutmix", "CutMix"))
        if name in names
    }
    torch.manual_seed(0)
    images, labels = synthetic_batch(), torch.randint(0, 10, (32,))
    mixed, targets = BatchMix(mixes)(images, labels)
    assert mixed.shape == images.shape and targets.shape == (32, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(32))
    assert (targets >= 0).all()
    # Each image's own label keeps the larger share (lambda >= 0.5) or its partner's does.
    assert (targets.gather(1, labels[:, None]) > 0).all()


@pytest.mark.parametrize(
    "config", [{"_target_": "os.system"}, {"_target_": "torchvision.transforms.v2.Nothing"}, 3]
)
def test_a_transform_that_is_not_torchvision_v2_is_refused_by_its_key(config: object) -> None:
    with pytest.raises(UserError, match=r"data\.augment\.bad must be a mapping with a `_target_`"):
        ImagePolicy({"bad": config})
