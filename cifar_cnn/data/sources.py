"""CIFAR-10 on disk, decoded once into a cache of uint8 tensors.

Two layouts are read from `data_dir`:
- torchvision's `cifar-10-batches-py/` (downloaded there when absent and `download` is true);
- an image-folder tree `train/<class>/*.jpg` and `test/<class>/*.jpg`, the offline form.
Either is decoded into a file in `cache_dir` (never into `data_dir`, which may be read-only),
named by the folder and its files' sizes and times, so a changed folder gets a new cache.
The cache folder stays bounded: writing a cache deletes that folder's outdated caches and all
but the KEPT_CACHES most recently used caches of other folders, never one that a running
process is about to read or reading (it holds a shared lock from prepare to the end of load).
An outdated cache is deleted all the same: a run about to read it reads the new one.
"""

import fcntl
import hashlib
import io
import logging
import os
import pickle
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import CIFAR10

from cifar_cnn.data.images import CLASSES, IMAGE_SHAPE, deeper_than_8_bits, upright_rgb
from cifar_cnn.errors import DataNotFoundError, UserError
from cifar_cnn.files import (
    FULL,
    remove_orphaned_partials,
    unwritable_message,
    written_then_renamed,
)

DATA_DIR_ENV = "CIFAR10_DIR"
CACHE_DIR_ENV = "CIFAR_CNN_CACHE_DIR"
TORCHVISION_FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
CACHE_FORMAT = 2  # bump when the cache's content or layout changes
CACHE_KEYS = {"train_images", "train_labels", "test_images", "test_labels"}
# Files with these suffixes must decode (else the run stops, naming the file); other files in
# a class folder (.DS_Store, notes) are skipped with a warning.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Caches of other data folders (or of other contents) kept besides the one in use, the most
# recently used first: each is as large as its data set.
KEPT_CACHES = 2

log = logging.getLogger(__name__)


class CIFAR10Source:
    """The data set in `data_dir` and its decode cache in `cache_dir`."""

    def __init__(self, data_dir: str | Path, cache_dir: str | Path, download: bool) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self.download = download
        self._held: BinaryIO | None = None  # the cache file, locked until it has been read

    def prepare(self) -> None:
        """Downloads (torchvision layout, when online) and decodes into the cache, if absent.
        The cache is then held as in use until `load` has read it."""
        if self._hold() is not None:
            return
        self._check_cache_dir_writable()  # before the decoding, not after it
        log.info("Decoding %s into the cache %s (once)", self.data_dir, self.cache_path)
        (train_images, train_labels), (test_images, test_labels) = self._decode()
        cache = {
            "train_images": train_images,
            "train_labels": train_labels,
            "test_images": test_images,
            "test_labels": test_labels,
        }
        # Write then rename: a run killed mid-write, or a second run building the same
        # cache at once, never leaves a half-written file under the final name. Serialised
        # first, then written by Python: torch.save's own writer loses the OS's reason (a
        # full disk) for a failed write.
        serialised = io.BytesIO()
        torch.save(cache, serialised)
        try:
            with written_then_renamed(self.cache_path) as partial:
                partial.write_bytes(serialised.getbuffer())
        except OSError as error:
            if error.errno not in FULL:  # no permission, say
                raise UserError(self._unwritable_cache_message(error)) from error
            raise UserError(
                unwritable_message(f"the data cache {self.cache_path}", error)
                + f": free space there, or point data.cache_dir (or the environment variable "
                f"{CACHE_DIR_ENV}) at a folder on another disk"
            ) from error
        self._hold()
        self._prune_caches()

    def load(self) -> dict[str, Tensor]:
        """The cache's tensors (CACHE_KEYS); an unreadable cache (truncated, say) is rebuilt."""
        try:
            return self._load()
        finally:
            self._let_go()

    def _load(self) -> dict[str, Tensor]:
        still_there = self._held is not None and os.fstat(self._held.fileno()).st_nlink > 0
        held = self._held if still_there else self._hold()
        if held is None:  # removed as outdated by a run that saw new data
            del self.cache_path  # computed again, from the folder as it is now:
            vars(self).pop("_folder_listing", None)  # listed again (image folders)
            self.prepare()
            held = self._hold()
        try:
            if held is None:
                raise OSError(f"{self.cache_path} was deleted as it was opened")
            cache = torch.load(held, weights_only=True)
            if set(cache) != CACHE_KEYS:
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
        self.prepare()
        return torch.load(self._hold() or self.cache_path, weights_only=True)

    def _hold(self) -> BinaryIO | None:
        """The cache file, opened and locked as in use (shared: by any number of processes);
        None where there is none, or another process's pruning deleted it meanwhile."""
        self._let_go()
        try:
            self._held = self.cache_path.open("rb")
        except (FileNotFoundError, NotADirectoryError):  # the latter: cache_dir is a file
            return None
        fcntl.flock(self._held, fcntl.LOCK_SH)
        if os.fstat(self._held.fileno()).st_nlink == 0:  # deleted before the lock was had
            self._held.close()
            self._held = None
            return None
        os.utime(self.cache_path)  # recently used: kept by the other processes' pruning
        return self._held

    def _let_go(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    @cached_property
    def cache_path(self) -> Path:
        """The cache file for the source as it is now, `cifar10-<folder>-<content>.pt`."""
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

    def _prune_caches(self) -> None:
        """Deletes this data folder's caches of earlier contents or cache formats (none will be
        read again), the caches of other folders but the KEPT_CACHES most recently used (not
        one that a running process is about to read: it holds it), and the partial files of
        processes killed while writing one."""
        others = sorted(
            (path for path in self.cache_dir.glob("cifar10-*-*.pt") if path != self.cache_path),
            key=_last_used,
            reverse=True,
        )
        own = [path for path in others if path.name.startswith(f"cifar10-{self._folder_key}-")]
        elsewhere = [path for path in others if path not in own]
        for path in own:  # a run about to read one reads the folder's new cache instead
            path.unlink(missing_ok=True)
            log.info("Removed the outdated data cache %s", path)
        for path in elsewhere[KEPT_CACHES:]:
            if _delete_unless_held(path):  # else another run would decode its data again
                log.info("Removed the least recently used data cache %s", path)
        remove_orphaned_partials(self.cache_dir)

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
        if not self.download:
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
        (`trainer.limit_test_batches`) holds every class. Paths as strings: `Path` objects
        for 60,000 files would cost every run's start noticeably."""
        return {
            "train": _class_folder_files(self.data_dir / "train"),
            "test": _interleaved(_class_folder_files(self.data_dir / "test")),
        }

    def _decode(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(images, labels) of the training and the test split."""
        if self._layout() == "torchvision":
            return _read_torchvision(self.data_dir, True), _read_torchvision(self.data_dir, False)
        return _read_files(self._folder_listing["train"]), _read_files(self._folder_listing["test"])


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned by another process meanwhile
        return 0.0


def _delete_unless_held(path: Path) -> bool:
    """Deletes the cache file unless a process holds it (CIFAR10Source._hold); True if so."""
    try:
        with path.open("rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)  # while locked: no process takes it meanwhile
            return True
    except FileNotFoundError:
        return False


def _class_folder_files(split_dir: Path) -> list[tuple[str, int]]:
    """(path, label) of the images in each class folder of `split_dir`, class by class."""
    folders = {e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")}
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
            left_out = {d for d, path in paths.items() if d.startswith(".") or os.path.islink(path)}
            others += [paths[d] for d in sorted(left_out)]
            subfolders[:] = sorted(set(subfolders) - left_out)
            for name in sorted(names):
                is_image = suffix(name).lower() in IMAGE_SUFFIXES
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


def _interleaved(files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Files listed class by class, reordered to each class's first, then each one's second, ..."""
    seen: Counter[int] = Counter()
    keyed = []
    for path, label in files:
        keyed.append((seen[label], label, path))
        seen[label] += 1
    return [(path, label) for _, label, path in sorted(keyed)]


def suffix(name: str) -> str:
    """`Path(name).suffix` without building a Path (the listing reads 60,000 names)."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def _read_files(files: list[tuple[str, int]]) -> tuple[Tensor, Tensor]:
    images = torch.empty((len(files), *IMAGE_SHAPE), dtype=torch.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = decode_image(path)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return images, labels


def decode_image(path: str) -> Tensor:
    """A CIFAR-10 image file as a uint8 (3, 32, 32) tensor; a file that is not one stops the
    run, naming it."""
    try:
        with Image.open(path) as image:
            if image.size != (32, 32):  # told by the header: no need to decode a huge image
                width, height = image.size
                raise UserError(f"image {path} is {width}x{height}, CIFAR-10's are 32x32")
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
