"""Batches from uint8 tensors in memory: the seeded epoch orders, each process's share of
them, and batches sliced on the device where the data set lives there."""

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler


class InMemoryDataset(Dataset):
    """Uint8 images and int64 labels in memory, fetched a whole batch at a time.

    `DataLoader` hands `__getitems__` the indices of a batch, so a batch costs one tensor
    index: no per-sample Python work, no collation.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]

    def to(self, device: torch.device) -> "InMemoryDataset":
        """The same data on `device` (itself when already there)."""
        if self.images.device == device:
            return self
        return InMemoryDataset(self.images.to(device), self.labels.to(device))


def epoch_order(count: int, seed: int, epoch: int) -> Tensor:
    """A permutation of range(count) that depends on (seed, epoch) alone: a resumed run and
    both data paths shuffle alike. SeedSequence mixes the two, so that (seed, epoch + 1) and
    (seed + 1, epoch) do not share an order."""
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.randperm(count, generator=torch.Generator().manual_seed(int(mixed)))


class IndexOrder(Sampler[int]):
    """A sampler whose indices come as one tensor, `order()`: DeviceBatches slices by it on
    the device, a DataLoader iterates over it."""

    def order(self) -> Tensor:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


class EpochPermutation(IndexOrder):
    """This process's share of a training epoch's shuffled indices:
    `epoch_order(count, seed, epoch)[rank::world_size]`, cut to `count // world_size` so that
    every process of a distributed run takes as many steps. One process: the whole order.

    Lightning calls `set_epoch` before each epoch, on a DataLoader's sampler and on the
    `sampler` of any other iterable. `trained()`, asked as the epoch's batches begin, says how
    many of its indices were trained on before a resume: they are left out, so that a run
    resumed mid-epoch goes on with the epoch's next batch (Lightning restores its count of the
    epoch's batches, not the loader's place).
    """

    def __init__(
        self,
        count: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        trained: Callable[[], int] = lambda: 0,
    ) -> None:
        self.count = count
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.trained = trained
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        shard = epoch_order(self.count, self.seed, self.epoch)[self.rank :: self.world_size]
        return shard[self.trained() : len(self)]  # (count // world_size - trained,) int64

    def __len__(self) -> int:
        return self.count // self.world_size


class EvaluationShard(IndexOrder):
    """This process's share of an evaluation split, in order: indices rank, rank + world_size,
    ... Every image is evaluated once over all processes (none repeated, none dropped)."""

    def __init__(self, count: int, rank: int, world_size: int) -> None:
        self.count = count
        self.rank = rank
        self.world_size = world_size

    def order(self) -> Tensor:
        return torch.arange(self.rank, self.count, self.world_size)

    def __len__(self) -> int:
        return len(range(self.rank, self.count, self.world_size))


class DeviceBatches:
    """Batches sliced from a dataset that stays on its device, in the sampler's order (or in
    order without one): what the DataLoader yields, with no workers and no copies per step."""

    # Lightning reads these of any loader, as of a DataLoader: it calls `sampler.set_epoch`,
    # and looks for a batch sampler when it checks for shuffling.
    sampler: IndexOrder | None
    batch_sampler = None

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        sampler: IndexOrder | None = None,
        drop_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self._batches_of(len(self.dataset if self.sampler is None else self.sampler))

    def _batches_of(self, count: int) -> int:
        """How many batches `count` images make: a last partial one counts unless dropped."""
        batches = count / self.batch_size
        return math.floor(batches) if self.drop_last else math.ceil(batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.dataset.images, self.dataset.labels
        order = None if self.sampler is None else self.sampler.order().to(images.device)
        # On a resume the order holds fewer images than len(sampler): those not yet trained.
        batches = self._batches_of(len(images if order is None else order))
        for start in range(0, batches * self.batch_size, self.batch_size):
            index = slice(start, start + self.batch_size)
            if order is not None:
                index = order[index]
            yield images[index], labels[index]  # (B, 3, 32, 32) uint8, (B,) int64
