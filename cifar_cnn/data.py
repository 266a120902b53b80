"""CIFAR-10 as a LightningDataModule: decoded once into a uint8 tensor cache, batched by indexing.

Two source layouts are accepted under `data_dir`:
- torchvision's `cifar-10-batches-py/` (downloaded there when absent and `download` is true);
- an image-folder tree `train/<class>/*.jpg` and `test/<class>/*.jpg`, the offline form.
Either is decoded once into `cache_dir` (never into `data_dir`, which may be read-only).
"""

import hashlib
import logging
import math
import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_convert
from torchvision.datasets import CIFAR10

from cifar_cnn.errors import DataNotFoundError, UserError
from cifar_cnn.files import written_then_renamed

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATA_DIR_ENV = "CIFAR10_DIR"
CACHE_DIR_ENV = "CIFAR_CNN_CACHE_DIR"
IMAGE_SHAPE = (3, 32, 32)
TORCHVISION_FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
CACHE_FORMAT = 2  # bump when the cache's content or layout changes
# Files with these suffixes must decode (else the run stops, naming the file); other files in
# a class folder (.DS_Store, notes) are skipped with a warning.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

log = logging.getLogger(__name__)


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


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 with a seeded train/val split of the 50,000 training images; test = the 10,000.

    Training batches follow `epoch_order(..., shuffle_seed, epoch)`; `shuffle_seed=None` takes
    the run's seed (`torch.initial_seed()`, which `seed_everything` sets). With `on_device`,
    the whole uint8 data set moves to the training device once and batches are slices of it
    there (`DeviceBatches`), the same batches the DataLoaders give.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        # Paths as strings: checkpoints hold plain values only, so they load weights-only.
        self.hparams.update(data_dir=str(data_dir), cache_dir=str(cache_dir))
        self.data_dir = Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self.data_train: InMemoryDataset | None = None
        self.data_val: InMemoryDataset | None = None
        self.data_test: InMemoryDataset | None = None
        self.validation_digest: str | None = None  # set by setup

    def prepare_data(self) -> None:
        """Downloads (torchvision layout, when online) and decodes into the cache, once per node."""
        if self.cache_path.exists():
            return
        self._check_cache_dir_writable()  # before the decoding, not after it
        log.info("Decoding %s into the cache %s (once)", self.data_dir, self.cache_path)
        train, test = self._decode_source()
        cache = {
            "train_images": train[0],
            "train_labels": train[1],
            "test_images": test[0],
            "test_labels": test[1],
        }
        # Write then rename: a run killed mid-write, or a second run building the same
        # cache at once, never leaves a half-written file under the final name.
        try:
            with written_then_renamed(self.cache_path) as partial:
                torch.save(cache, partial)
        except (OSError, RuntimeError) as error:  # torch.save's failed open is a RuntimeError
            raise UserError(self._unwritable_cache_message(error)) from error
        self._remove_outdated_caches()

    def _check_cache_dir_writable(self) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # no permission, or a file of that name
            raise UserError(self._unwritable_cache_message(error)) from error
        if not os.access(self.cache_dir, os.W_OK | os.X_OK):
            raise UserError(self._unwritable_cache_message("not writable"))

    def _unwritable_cache_message(self, reason: object) -> str:
        return (
            f"cannot write the data cache in {self.cache_dir} ({reason}): point data.cache_dir "
            f"(or the environment variable {CACHE_DIR_ENV}) at a writable folder"
        )

    def _remove_outdated_caches(self) -> None:
        """Deletes this data folder's caches of earlier contents or cache formats, and caches
        of the first format (`cifar10-<content>.pt`, of any folder): each is as large as the
        data set, and none will be read again."""
        first_format = self.cache_dir.glob("cifar10-" + "[0-9a-f]" * 16 + ".pt")
        for outdated in [*self.cache_dir.glob(f"cifar10-{self._folder_key}-*.pt"), *first_format]:
            if outdated != self.cache_path:
                outdated.unlink(missing_ok=True)
                log.info("Removed the outdated data cache %s", outdated)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        cache = self._load_cache()
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
        digest = hashlib.sha256(self.data_val.images.numpy().data)  # 30 MB: 20 ms
        digest.update(self.data_val.labels.numpy().data)
        self.validation_digest = digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, str]:
        """What checkpoints keep of the data: which images the run validated on, so that a
        resume from other data, whose split would differ, is refused (cifar_cnn/training.py)."""
        return {"validation_digest": self.validation_digest} if self.validation_digest else {}

    def _load_cache(self) -> dict[str, Tensor]:
        """The cache's tensors; an unreadable cache (a truncated file, say) is rebuilt."""
        if not self.cache_path.exists():  # removed as outdated by a run that saw new data
            del self.cache_path  # computed again, from the folder as it is now:
            vars(self).pop("_folder_listing", None)  # listed again (image folders)
            self.prepare_data()
        try:
            cache = torch.load(self.cache_path, weights_only=True)
            if set(cache) != {"train_images", "train_labels", "test_images", "test_labels"}:
                raise ValueError(f"unexpected content {sorted(cache)}")
            return cache
        except (
            RuntimeError,
            EOFError,
            OSError,
            pickle.UnpicklingError,
            ValueError,
            TypeError,
        ) as error:
            log.warning("rebuilding the unreadable data cache %s (%s)", self.cache_path, error)
        self.cache_path.unlink(missing_ok=True)
        self.prepare_data()
        return torch.load(self.cache_path, weights_only=True)

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
        in the dtype of the trainer's precision (bf16-true, 64-true: Lightning converts inputs
        before the transfer, when they are still integers), then augments training batches."""
        images, labels = batch
        images = to_float_images(images)
        if self.trainer is not None:
            images = self.trainer.precision_plugin.convert_input(images)
            if self.trainer.training:
                images = augment(images, self.hparams.flip, self.hparams.crop_padding)
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

    @cached_property
    def cache_path(self) -> Path:
        """The cache file for the source as it is now, `cifar10-<folder>-<content>.pt`: a
        changed source gets a new file (and its folder's outdated ones go)."""
        digest = hashlib.sha256(f"format {CACHE_FORMAT}\n{self.data_dir.resolve()}\n".encode())
        for path in self._source_files():
            try:
                stat = os.stat(path)
            except OSError as error:  # a broken link, say
                link = " (a link to a missing file)" if os.path.islink(path) else ""
                raise UserError(f"cannot read {path}{link}: {error.strerror}") from error
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return self.cache_dir / f"cifar10-{self._folder_key}-{digest.hexdigest()[:16]}.pt"

    @cached_property
    def _folder_key(self) -> str:
        """The part of the cache's name that stands for the data folder."""
        return hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]

    def _layout(self) -> str:
        """Which layout data_dir holds; downloads the torchvision batches when allowed."""
        splits = {split: (self.data_dir / split).is_dir() for split in ("train", "test")}
        if all(splits.values()):
            return "folders"
        if (self.data_dir / TORCHVISION_FOLDER).is_dir():
            return "torchvision"
        if any(splits.values()):  # half an image-folder tree: not a reason to download
            [missing] = [split for split, present in splits.items() if not present]
            raise DataNotFoundError(
                f"{self.data_dir / missing} is missing: an image-folder data set needs both "
                f"train/ and test/ under {self.data_dir}"
            )
        if not self.hparams.download:
            raise DataNotFoundError(_missing_data_message(self.data_dir))
        try:
            CIFAR10(self.data_dir, train=True, download=True)
        except OSError as error:  # no network, DNS failure, unwritable data_dir, ...
            raise DataNotFoundError(
                _missing_data_message(self.data_dir, f"the download failed: {error}")
            ) from error
        return "torchvision"

    def _source_files(self) -> list[str]:
        if self._layout() == "torchvision":
            folder = self.data_dir / TORCHVISION_FOLDER
            files = [folder / name for name, _ in CIFAR10.train_list + CIFAR10.test_list]
            missing = [path.name for path in files if not path.is_file()]
            if missing:
                raise UserError(
                    f"{folder} lacks {', '.join(missing)}: delete the folder to download the "
                    "batches again, or point data.data_dir at a complete copy"
                )
            return [str(path) for path in files]
        return [path for files in self._folder_listing.values() for path, _ in files]

    @cached_property
    def _folder_listing(self) -> dict[str, list[tuple[str, int]]]:
        """(image path, label) of each split's images, class by class, sorted by name; the
        test images with the classes interleaved (each class's first, then each one's second,
        ...): mixed, as in torchvision's test batch, so that a part of the test set
        (`trainer.limit_test_batches`) holds every class. Paths as strings: 60,000 `Path`
        objects took 0.6 s, at every run's start."""
        return {
            "train": self._folder_files("train"),
            "test": _interleaved(self._folder_files("test")),
        }

    def _folder_files(self, split: str) -> list[tuple[str, int]]:
        split_dir = self.data_dir / split
        folders = {
            e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
        }
        unknown = sorted(folders - set(CLASSES))
        if unknown:
            raise UserError(
                f"{split_dir} holds folders that are not CIFAR-10 classes: {', '.join(unknown)} "
                f"(the classes are {', '.join(CLASSES)})"
            )
        files, skipped = [], []
        for label, name in enumerate(CLASSES):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                raise DataNotFoundError(
                    f"class folder {class_dir} is missing: an image-folder data set needs "
                    f"one folder per CIFAR-10 class under {split_dir} ({', '.join(CLASSES)})"
                )
            images, others = [], []
            # Subfolders too, as torchvision's ImageFolder reads a class: its own files first,
            # then each subfolder's, all by name. Not hidden ones (.ipynb_checkpoints, say),
            # nor linked ones, which may lead out of the class (a link to "..").
            for folder, subfolders, names in os.walk(class_dir):
                paths = {d: os.path.join(folder, d) for d in subfolders}
                left_out = {
                    d for d, path in paths.items() if d.startswith(".") or os.path.islink(path)
                }
                others += [paths[d] for d in sorted(left_out)]
                subfolders[:] = sorted(set(subfolders) - left_out)
                for name in sorted(names):
                    is_image = _suffix(name).lower() in IMAGE_SUFFIXES
                    (images if is_image else others).append(os.path.join(folder, name))
            if not images:
                raise DataNotFoundError(
                    f"class folder {class_dir} holds no images (files ending in "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files += [(path, label) for path in images]
            skipped += others
        if skipped:
            log.warning(
                "skipped %d entries under %s (files that are not images by their suffix, "
                "hidden or linked folders), e.g. %s",
                len(skipped), split_dir, skipped[0],
            )  # fmt: skip
        return files

    def _decode_source(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        if self._layout() == "torchvision":
            return _read_torchvision(self.data_dir, train=True), _read_torchvision(
                self.data_dir, train=False
            )
        return self._read_folder("train"), self._read_folder("test")

    def _read_folder(self, split: str) -> tuple[Tensor, Tensor]:
        files = self._folder_listing[split]
        images = torch.empty((len(files), *IMAGE_SHAPE), dtype=torch.uint8)
        for i, (path, _) in enumerate(files):
            images[i] = _decode(path)
        labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        return images, labels


def _interleaved(files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Files listed class by class, reordered to each class's first, then each one's second, ..."""
    seen: Counter[int] = Counter()
    keyed = []
    for path, label in files:
        keyed.append((seen[label], label, path))
        seen[label] += 1
    return [(path, label) for _, label, path in sorted(keyed)]


def to_float_images(images: Tensor) -> Tensor:
    """uint8 images (N, 3, H, W) to float32 in [0, 1], the scale the seed trained on."""
    return images.float().div_(255)


def augment(images: Tensor, flip: bool, padding: int) -> Tensor:
    """Per image: a random horizontal flip, and a random shift of up to `padding` pixels (a
    crop of the reflect-padded image); batched tensor ops on the images' device."""
    count, channels, height, width = images.shape
    device = images.device
    if flip:
        flipped = torch.rand(count, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if padding:
        padded = F.pad(images, (padding,) * 4, mode="reflect")
        top, left = torch.randint(0, 2 * padding + 1, (2, count, 1), device=device)
        rows = top + torch.arange(height, device=device)  # (count, height)
        columns = left + torch.arange(width, device=device)  # (count, width)
        images = padded[
            torch.arange(count, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]
    return images


def _suffix(name: str) -> str:
    """`Path(name).suffix` without building a Path (60,000 of them took 0.6 s)."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def deeper_than_8_bits(image: Image.Image) -> bool:
    """16- and 32-bit images (integer or float), which convert("RGB") clips instead of scaling."""
    return image.mode in ("I", "F") or image.mode.startswith("I;")


def upright_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit image as RGB, as training and `predict=` both read files: turned upright by its
    EXIF tag, transparent parts put on white (convert("RGB") alone keeps the colours hidden
    under them)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def _decode(path: str) -> Tensor:
    try:
        with Image.open(path) as image:
            if deeper_than_8_bits(image):
                raise UserError(
                    f"image {path} has {image.mode} pixels (16 or 32 bits): CIFAR-10's are "
                    "8-bit RGB; convert it to 8 bits"
                )
            pixels = np.array(upright_rgb(image))
    # PIL's errors for unreadable, truncated and non-image files, and for a header that
    # claims a huge image.
    except (OSError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot decode image {path}: {error}") from error
    if pixels.shape != (32, 32, 3):
        raise UserError(
            f"image {path} is {pixels.shape[1]}x{pixels.shape[0]}, CIFAR-10's are 32x32"
        )
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _read_torchvision(data_dir: Path, train: bool) -> tuple[Tensor, Tensor]:
    try:
        dataset = CIFAR10(data_dir, train=train, download=False)
    except RuntimeError as error:  # torchvision's checksum test failed
        raise UserError(
            f"the CIFAR-10 batches in {data_dir / TORCHVISION_FOLDER} are incomplete or corrupt "
            f"({error}); delete that folder to download them again"
        ) from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return images, torch.tensor(dataset.targets, dtype=torch.int64)


def _missing_data_message(data_dir: Path, reason: str | None = None) -> str:
    lines = [
        f"no CIFAR-10 data in {data_dir.resolve()}" + (f" ({reason})" if reason else "") + ".",
        f"Point data.data_dir (or the environment variable {DATA_DIR_ENV}) at a folder holding",
        f"  - torchvision's {TORCHVISION_FOLDER}/ batches (downloaded there when online), or",
        "  - an image-folder tree: train/<class>/*.jpg and test/<class>/*.jpg.",
    ]
    return "\n".join(lines)
