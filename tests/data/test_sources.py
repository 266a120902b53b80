"""The data on disk: both layouts, listing, decoding, and the decode cache."""

import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from cifar_cnn.data import CLASSES, CIFAR10DataModule
from cifar_cnn.data.sources import CIFAR10Source, suffix
from cifar_cnn.errors import DataNotFoundError, UserError
from cifar_cnn.prediction import load_image_file

from ..conftest import file_size_limit, make_image_folder, ready


def folder_contents(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_the_test_images_interleave_the_classes_so_any_part_holds_all(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    extra = tiny_data_dir / "test" / "ship" / "0004.jpg"  # classes of other sizes: ship has 5
    Image.new("RGB", (32, 32), (1, 2, 3)).save(extra)
    (tiny_data_dir / "test" / "dog" / "0003.jpg").unlink()  # and dog 3
    labels = ready(tiny_data_dir, tmp_path / "cache").data_test.labels.tolist()
    assert labels == [*range(10)] * 3 + [0, 1, 2, 3, 4, 6, 7, 8, 9] + [8]


def test_cache_lives_outside_the_data_and_is_reused(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = folder_contents(tiny_data_dir)
    first = ready(tiny_data_dir, tmp_path / "cache")
    assert folder_contents(tiny_data_dir) == before
    assert (
        first.source.cache_path.parent == tmp_path / "cache" and first.source.cache_path.is_file()
    )

    monkeypatch.setattr(
        "cifar_cnn.data.sources.decode_image", lambda path: pytest.fail(f"decoded {path}")
    )
    second = ready(tiny_data_dir, tmp_path / "cache")
    assert torch.equal(second.data_test.images, first.data_test.images)


def test_cache_is_rebuilt_when_the_source_changes(tiny_data_dir: Path, tmp_path: Path) -> None:
    first = ready(tiny_data_dir, tmp_path / "cache")
    another_folder = ready(
        make_image_folder(tmp_path / "b", {"train": 3, "test": 1}), first.source.cache_dir
    )
    waiting = CIFAR10DataModule(tiny_data_dir, tmp_path / "cache")
    waiting.prepare_data()  # set up after the data changes
    make_image_folder(tmp_path / "other", {"test": 5}, seed=1)
    replacement = tmp_path / "other" / "test" / "bird" / "0001.jpg"
    replacement.replace(tiny_data_dir / "test" / "bird" / "0001.jpg")
    (tmp_path / "other" / "test" / "cat" / "0004.jpg").replace(
        tiny_data_dir / "test" / "cat" / "0004.jpg"
    )
    second = ready(tiny_data_dir, tmp_path / "cache")
    assert second.source.cache_path != first.source.cache_path
    assert not first.source.cache_path.exists()  # outdated: removed
    assert another_folder.source.cache_path.is_file()  # another folder's: kept
    waiting.setup()  # a run that chose its cache before the data changed reads the new one
    assert len(waiting.data_test) == 41 and torch.equal(
        waiting.data_test.images, second.data_test.images
    )
    assert (
        waiting.source.cache_path == second.source.cache_path and second.source.cache_path.is_file()
    )
    changed = 1 * 10 + 2  # each class's second image (0001.jpg) follows the ten first ones
    assert not torch.equal(second.data_test.images[changed], first.data_test.images[changed])
    assert torch.equal(second.data_test.images[changed + 1], first.data_test.images[changed + 1])


def test_torchvision_batches_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online layout: torchvision's pickled batches (checksums waived for fake ones)."""
    folder = tmp_path / "data" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        rows = rng.integers(0, 256, (20, 3 * 32 * 32), dtype=np.uint8)  # channel planes per row
        labels = rng.integers(0, 10, 20).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": rows, "labels": labels}))
        expected[name] = (torch.from_numpy(rows).view(20, 3, 32, 32), torch.tensor(labels))
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": list(CLASSES)}))
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)

    datamodule = ready(tmp_path / "data", tmp_path / "cache", download=False)
    assert torch.equal(datamodule.data_test.images, expected["test_batch"][0])
    assert torch.equal(datamodule.data_test.labels, expected["test_batch"][1])
    assert len(datamodule.data_train) + len(datamodule.data_val) == 100


def test_missing_data_names_the_folder_the_variable_and_the_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as error:
        ready(tmp_path / "nowhere", tmp_path / "cache", download=False)
    message = str(error.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    for expected in ("CIFAR10_DIR", "data.data_dir", "cifar-10-batches-py", "train/<class>/*.jpg"):
        assert expected in message


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr("cifar_cnn.data.sources.CIFAR10", offline)
    with pytest.raises(DataNotFoundError, match="the download failed: .*Name or service not known"):
        ready(tmp_path / "nowhere", tmp_path / "cache", download=True)


def test_missing_class_folder_is_named(tiny_data_dir: Path, tmp_path: Path) -> None:
    for path in (tiny_data_dir / "train" / "frog").iterdir():
        path.unlink()
    (tiny_data_dir / "train" / "frog").rmdir()
    with pytest.raises(DataNotFoundError, match=r"train/frog is missing"):
        ready(tiny_data_dir, tmp_path / "cache")


@pytest.mark.parametrize("name", ["a.jpg", "b.JPEG", "a.tar.gz", ".jpg", "..jpg", "a.", "a", "."])
def test_the_listing_reads_suffixes_as_pathlib_does(name: str) -> None:
    """The cache key lists the files that count as images: the same ones as with `Path`."""
    assert suffix(name) == Path(name).suffix


def test_files_that_are_not_images_are_skipped_with_a_count(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tiny_data_dir / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tiny_data_dir / "train" / "dog" / "notes.txt").write_text("labelled by hand")
    datamodule = ready(tiny_data_dir, tmp_path / "cache")
    assert len(datamodule.data_train) + len(datamodule.data_val) == 100
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 2 entries" in warnings[0]


def test_images_in_subfolders_of_a_class_folder_count_as_that_class(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    nested = tiny_data_dir / "test" / "horse" / "from-camera" / "day-2"
    nested.mkdir(parents=True)
    Image.new("RGB", (32, 32), (9, 8, 7)).save(nested / "0000.png")
    datamodule = ready(tiny_data_dir, tmp_path / "cache")
    horses = datamodule.data_test.images[datamodule.data_test.labels == CLASSES.index("horse")]
    assert len(horses) == 5
    assert horses[-1].flatten(1).tolist() == [[9] * 1024, [8] * 1024, [7] * 1024]


def test_hidden_and_linked_subfolders_of_a_class_folder_are_skipped(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cat = tiny_data_dir / "train" / "cat"
    (cat / "up").symlink_to("..")  # a loop out of the class: every class's images again
    (cat / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (64, 64)).save(cat / ".ipynb_checkpoints" / "big.png")
    datamodule = ready(tiny_data_dir, tmp_path / "cache")
    assert len(datamodule.data_train) + len(datamodule.data_val) == 100
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("skipped 2 entries under")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_broken_image_stops_the_run_naming_the_file(
    damage: str, tiny_data_dir: Path, tmp_path: Path
) -> None:
    broken = tiny_data_dir / "test" / "ship" / "0002.jpg"
    content = broken.read_bytes()
    broken.write_bytes(b"not a jpeg" if damage == "garbage" else content[: len(content) // 2])
    with pytest.raises(UserError, match=f"cannot decode image {broken}"):
        ready(tiny_data_dir, tmp_path / "cache")


def test_a_broken_link_or_a_huge_image_header_stops_the_run_naming_the_file(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tiny_data_dir / "train" / "cat" / "9999.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(UserError, match=f"cannot read {link} \\(a link to a missing file\\)"):
        ready(tiny_data_dir, tmp_path / "cache")
    link.unlink()
    # PIL refuses images of over twice MAX_IMAGE_PIXELS as decompression bombs: as a header
    # that claims 20000x20000 pixels would be.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match="cannot decode image .*exceeds limit"):
        ready(tiny_data_dir, tmp_path / "cache")


def test_a_cache_folder_that_cannot_be_written_is_named_before_decoding(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    decoded = []
    monkeypatch.setattr(CIFAR10Source, "_decode", lambda self: decoded.append(1))
    with pytest.raises(
        UserError,
        match=f"cannot write the data cache in {not_a_folder} .*"
        "point data.cache_dir \\(or the environment variable CIFAR_CNN_CACHE_DIR",
    ):
        ready(tiny_data_dir, not_a_folder)
    assert not decoded


def test_a_cache_write_on_a_full_disk_stops_naming_the_cache_and_leaves_no_part(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    source = CIFAR10Source(tiny_data_dir, tmp_path / "cache", download=False)
    with file_size_limit(50_000), pytest.raises(UserError) as error:  # the cache is ~0.5 MB
        source.prepare()
    assert str(error.value) == (
        f"cannot write the data cache {source.cache_path} (File too large: the file size limit "
        "(ulimit -f) is reached): free space there, or point data.cache_dir (or the "
        "environment variable CIFAR_CNN_CACHE_DIR) at a folder on another disk"
    )
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written file left
    source.prepare()  # space again: written
    assert set(source.load()) == {"train_images", "train_labels", "test_images", "test_labels"}


def test_images_of_another_size_stop_the_run_and_grayscale_ones_are_converted(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    Image.new("L", (32, 32), 77).save(tiny_data_dir / "test" / "frog" / "0000.jpg")
    datamodule = ready(tiny_data_dir, tmp_path / "cache")
    frog = datamodule.data_test.images[6]  # the first frog: the classes are interleaved
    assert frog.shape == (3, 32, 32) and (frog == 77).all()

    wrong = tiny_data_dir / "train" / "deer" / "0003.jpg"
    Image.new("RGB", (40, 30)).save(wrong)
    with pytest.raises(UserError, match=f"image {wrong} is 40x30, CIFAR-10's are 32x32"):
        ready(tiny_data_dir, tmp_path / "cache")


def test_transparent_training_images_are_read_on_white_as_predict_reads_them(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    clear = tiny_data_dir / "test" / "airplane" / "0000.png"
    (tiny_data_dir / "test" / "airplane" / "0000.jpg").unlink()
    Image.new("RGBA", (32, 32), (200, 10, 10, 0)).save(clear)  # red, but fully transparent
    datamodule = ready(tiny_data_dir, tmp_path / "cache")
    airplane = datamodule.data_test.images[0]
    assert (airplane == 255).all()
    assert torch.equal(airplane, load_image_file(clear))


def test_unknown_class_folders_and_empty_class_folders_are_named(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    (tiny_data_dir / "train" / "airplanes").mkdir()
    with pytest.raises(UserError, match="folders that are not CIFAR-10 classes: airplanes"):
        ready(tiny_data_dir, tmp_path / "cache")
    (tiny_data_dir / "train" / "airplanes").rmdir()
    for image in (tiny_data_dir / "test" / "cat").iterdir():
        image.unlink()
    (tiny_data_dir / "test" / "cat" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(DataNotFoundError, match="test/cat holds no images"):
        ready(tiny_data_dir, tmp_path / "cache")


@pytest.mark.parametrize("present", ["train", "test"])
def test_half_an_image_folder_tree_is_named_not_downloaded_over(
    present: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = make_image_folder(tmp_path / "data", {present: 1})
    monkeypatch.setattr(CIFAR10, "__init__", lambda *args, **kwargs: pytest.fail("downloads"))
    missing = {"train": "test", "test": "train"}[present]
    with pytest.raises(DataNotFoundError, match=f"{data_dir / missing} is missing"):
        ready(data_dir, tmp_path / "cache")


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_images_deeper_than_8_bits_are_refused_not_clipped(
    mode: str, tiny_data_dir: Path, tmp_path: Path
) -> None:
    deep = tiny_data_dir / "train" / "horse" / "0010.tiff"
    Image.new(mode, (32, 32), 9000).save(deep)  # convert("RGB") made every pixel 255
    with pytest.raises(UserError, match=f"image {deep} has {mode} pixels"):
        ready(tiny_data_dir, tmp_path / "cache")


def test_incomplete_torchvision_batches_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "data" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    for name, _ in CIFAR10.train_list[:-1] + CIFAR10.test_list:
        (folder / name).write_bytes(b"a batch cut short")
    with pytest.raises(UserError, match=f"{folder} lacks data_batch_5"):
        ready(tmp_path / "data", tmp_path / "cache", download=False)
    (folder / "data_batch_5").write_bytes(b"a batch cut short")
    with pytest.raises(UserError, match="are incomplete or corrupt"):
        ready(tmp_path / "data", tmp_path / "cache", download=False)


def test_a_truncated_cache_is_rebuilt(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = ready(tiny_data_dir, tmp_path / "cache")
    content = first.source.cache_path.read_bytes()
    first.source.cache_path.write_bytes(content[: len(content) // 3])
    second = ready(tiny_data_dir, tmp_path / "cache")
    assert "rebuilding the unreadable data cache" in caplog.text
    assert torch.equal(second.data_test.images, first.data_test.images)
    assert first.source.cache_path.read_bytes() == content


def _build_and_sum(data_dir: Path, cache_dir: Path) -> int:
    return int(ready(data_dir, cache_dir).data_test.images.sum())


@pytest.mark.slow  # starts Python processes
def test_two_processes_building_one_cache_at_once(tiny_data_dir: Path, tmp_path: Path) -> None:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        sums = list(pool.map(_build_and_sum, [tiny_data_dir] * 2, [tmp_path / "cache"] * 2))
    assert sums[0] == sums[1] == _build_and_sum(tiny_data_dir, tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]


@pytest.mark.slow  # starts Python processes
def test_a_read_only_data_folder_works(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The data folder loses its write bits. Root ignores them, so as root the loading runs
    without the capability to override file permissions (setpriv)."""
    for path in [tiny_data_dir, *tiny_data_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root, and setpriv (util-linux) is not installed")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]

    def run(code: str) -> subprocess.CompletedProcess:
        command = [*prefix, sys.executable, "-c", code]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    probe = run(f"open({str(tiny_data_dir / 'probe')!r}, 'w')")
    assert probe.returncode != 0 and "PermissionError" in probe.stderr  # really read-only
    result = run(
        "from cifar_cnn.data import CIFAR10DataModule as D\n"
        f"d = D({str(tiny_data_dir)!r}, {str(tmp_path / 'cache')!r})\n"
        "d.prepare_data(); d.setup()\n"
        "print(len(d.data_train), len(d.data_val), len(d.data_test))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["80", "20", "40"]


def test_the_cache_folder_keeps_the_recent_caches_and_those_in_use(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    older = [cache / f"cifar10-{i:08x}-{i:016x}.pt" for i in range(5)]  # other folders'
    for age, path in enumerate(older):  # older[0] the most recently used
        torch.save({"x": torch.zeros(1)}, path)
        os.utime(path, (1e9 - age, 1e9 - age))
    held_elsewhere = subprocess.Popen(  # another process, about to read the oldest
        [sys.executable, "-c", f"import fcntl, sys; f = open({str(older[4])!r}, 'rb'); "
         "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert held_elsewhere.stdout.readline() == "held\n"
    partial = cache / f".cifar10-x-y.pt.{2**22 + 1}.tmp"  # of a process killed while writing
    partial.write_bytes(b"half")
    try:
        source = CIFAR10Source(tiny_data_dir, cache, download=False)
        source.prepare()
        assert set(cache.iterdir()) == {older[0], older[1], older[4], source.cache_path}
    finally:
        held_elsewhere.communicate("")
    other = CIFAR10Source(make_image_folder(tmp_path / "b", {"train": 1, "test": 1}), cache,
                          download=False)  # fmt: skip
    other.prepare()  # no more in use: pruned as the others
    assert set(cache.iterdir()) == {older[0], source.cache_path, other.cache_path}
