"""CIFAR10DataModule: a seeded train/val split, seeded epoch orders, batches by indexing."""

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, default_convert

from cifar_cnn.data.augmentation import BatchMix, ImagePolicy, augment
from cifar_cnn.data.images import to_float_images
from cifar_cnn.data.loading import (
    DeviceBatches,
    EpochPermutation,
    EvaluationShard,
    IndexOrder,
    InMemoryDataset,
)
from cifar_cnn.data.sources import CIFAR10Source
from cifar_cnn.errors import UserError


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 with a seeded train/val split of the 50,000 training images; test = the 10,000.

    Training batches follow `epoch_order(..., shuffle_seed, epoch)`; `shuffle_seed=None` takes
    the run's seed (`torch.initial_seed()`, which `seed_everything` sets). With `on_device`,
    the whole uint8 data set moves to the training device once and batches are slices of it
    there (`DeviceBatches`), the same batches the DataLoaders give.

    Training batches are augmented on the device, after the transfer, on both paths alike:
    flips and shifts (`flip`, `crop_padding`), then `augment`, torchvision v2 policies applied
    image by image, then `mix`, MixUp or CutMix, whose labels are class probabilities. Both
    are mappings of `_target_` configs (conf/augment), kept plain so checkpoints load
    weights-only.
    """

    def __init__(
        self,
        data_dir: str | Path,
        cache_dir: str | Path,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        download: bool = True,
        flip: bool = False,
        crop_padding: int = 0,
        drop_last: bool = False,
        shuffle_seed: int | None = None,
        on_device: bool = False,
        augment: Mapping[str, Mapping[str, Any]] | None = None,
        mix: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        # Paths as strings: checkpoints hold plain values only, so they load weights-only.
        self.hparams.update(data_dir=str(data_dir), cache_dir=str(cache_dir))
        self.source = CIFAR10Source(data_dir, cache_dir, download)
        self.data_train: InMemoryDataset | None = None
        self.data_val: InMemoryDataset | None = None
        self.data_test: InMemoryDataset | None = None
        self.validation_digest: str | None = None  # set by setup
        self.image_policy = ImagePolicy(augment) if augment else None
        self.batch_mix = BatchMix(mix) if mix else None

    @property
    def data_dir(self) -> Path:
        return self.source.data_dir

    def prepare_data(self) -> None:
        """Downloads (torchvision layout, when online) and decodes into the cache, once per node."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        cache = self.source.load()
        images, labels = cache["train_images"], cache["train_labels"]
        num_val = round(len(labels) * self.hparams.val_fraction)
        # 0 itself is for code that wants every training image (benchmarks/airbench_reference)
        if not 0 <= num_val < len(labels) or (num_val == 0 and self.hparams.val_fraction > 0):
            empty = "validation" if num_val == 0 else "training"
            raise UserError(
                f"data.val_fraction={self.hparams.val_fraction} of the {len(labels)} training "
                f"images leaves no {empty} images"
            )
        # Seeded apart from the run's seed: every run of a sweep validates on the same images.
        order = torch.randperm(
            len(labels), generator=torch.Generator().manual_seed(self.hparams.split_seed)
        )
        val_index, train_index = order[:num_val], order[num_val:]
        self.data_train = InMemoryDataset(images[train_index], labels[train_index])
        self.data_val = InMemoryDataset(images[val_index], labels[val_index])
        self.data_test = InMemoryDataset(cache["test_images"], cache["test_labels"])
        digest = hashlib.sha256(self.data_val.images.numpy().data)
        digest.update(self.data_val.labels.numpy().data)
        self.validation_digest = digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, str]:
        """What checkpoints keep of the data: which images the run validated on, so that a
        resume from other data, whose split would differ, is refused (cifar_cnn/resume.py)."""
        return {"validation_digest": self.validation_digest} if self.validation_digest else {}

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        dataset = self._require(self.data_train)
        seed = self.hparams.shuffle_seed
        seed = torch.initial_seed() if seed is None else seed
        sampler = EpochPermutation(
            len(dataset), seed, *self._rank_and_world_size, trained=self._trained_this_epoch
        )
        if self.hparams.drop_last and len(sampler) < self.hparams.batch_size:
            share = " a process" if self._rank_and_world_size[1] > 1 else ""
            raise UserError(
                f"data.batch_size={self.hparams.batch_size} with data.drop_last=true leaves no "
                f"training batch: an epoch has {len(sampler)} training images{share}"
            )
        return self._batches("data_train", self.hparams.batch_size, sampler)

    def _trained_this_epoch(self) -> int:
        """How many of this process's training images of the current epoch the run trained on:
        none, but in a run resumed mid-epoch."""
        if self.trainer is None or not self.trainer.training:
            return 0
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return batches * self.hparams.batch_size

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._batches("data_val", self.hparams.eval_batch_size, self._shard("data_val"))

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._batches("data_test", self.hparams.eval_batch_size, self._shard("data_test"))

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        """Scales uint8 images to floats in [0, 1] on the device (a quarter of the bytes travel),
        then augments training batches."""
        images, labels = batch
        images = to_float_images(images)
        if self.trainer is not None and self.trainer.training:
            images = augment(images, self.hparams.flip, self.hparams.crop_padding)
            if self.image_policy:
                images = self.image_policy(images)
            if self.batch_mix:
                images, labels = self.batch_mix(images, labels)  # labels: (N, classes)
        return images, labels

    def _batches(
        self, split: str, batch_size: int, sampler: IndexOrder | None
    ) -> DataLoader | DeviceBatches:
        """The batches of `self.<split>` in the order of `sampler` (None: in order). Only
        training batches drop a last partial batch (`drop_last`)."""
        dataset = self._require(getattr(self, split))
        drop_last = isinstance(sampler, EpochPermutation) and self.hparams.drop_last
        if self.hparams.on_device:
            dataset = dataset.to(self._device)
            setattr(self, split, dataset)  # moved once, kept there for the next epochs
            return DeviceBatches(dataset, batch_size, sampler, drop_last)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=default_convert,  # __getitems__ already returns whole batches
            # Its own generator: otherwise each iter() draws a (workers') seed from torch's
            # global one, which dropout and augmentation draw from too, and a run resumed
            # mid-epoch, whose iter() comes after the saved state, would draw once more.
            generator=torch.Generator(),
        )

    @staticmethod
    def _require(dataset: InMemoryDataset | None) -> InMemoryDataset:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return dataset

    def _shard(self, split: str) -> EvaluationShard | None:
        """This process's share of an evaluation split in a distributed run; None alone."""
        rank, world_size = self._rank_and_world_size
        if world_size == 1:
            return None
        return EvaluationShard(len(self._require(getattr(self, split))), rank, world_size)

    @property
    def _rank_and_world_size(self) -> tuple[int, int]:
        """The data module splits the batches among processes itself (the trainer configs set
        `use_distributed_sampler: false`): its seeded order then holds in DDP and on device."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    @property
    def _device(self) -> torch.device:
        """The training device once a Trainer is attached, else the CPU."""
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
