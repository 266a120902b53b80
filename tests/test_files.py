"""Write-then-rename files and the half-written ones that killed processes leave."""

import subprocess
import sys
from pathlib import Path

import pytest

from cifar_cnn.files import remove_orphaned_partials, written_then_renamed


def test_half_written_files_of_dead_processes_are_removed_and_no_others(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = tmp_path / f".last.ckpt.{dead.stdout.strip()}.tmp"
    orphan.write_bytes(b"half")
    with written_then_renamed(tmp_path / "epoch_000.ckpt") as mine:  # this process's, alive
        mine.write_bytes(b"being written")
        kept = [tmp_path / "last.ckpt", tmp_path / ".notes.tmp", tmp_path / ".x.12ab.tmp"]
        for path in kept:
            path.write_bytes(b"")
        assert remove_orphaned_partials(tmp_path) == [orphan]
        assert mine.exists() and all(path.exists() for path in kept)
    assert not orphan.exists() and (tmp_path / "epoch_000.ckpt").read_bytes() == b"being written"


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous")
    with pytest.raises(OSError), written_then_renamed(path) as partial:
        partial.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert path.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [path]
