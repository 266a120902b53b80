"""Writing files so that no reader ever sees one half-written, and reading run records."""

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The statuses of a run's metrics.json once it has trained to its end: completed, or stopped
# by a search's pruner (its metrics stand as a trial's result).
FINISHED = ("completed", "pruned")
PARTIAL_SUFFIX = ".tmp"  # written_then_renamed's files: `.<name>.<pid>.tmp`


@contextmanager
def written_then_renamed(path: Path) -> Iterator[Path]:
    """Yields a private temporary path beside `path`; once the block has written it, renames
    it to `path` in one step. A run killed meanwhile leaves the previous `path` intact, and
    runs writing the same `path` at once never mix their bytes."""
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read_record(path: Path) -> dict[str, Any] | None:
    """A run's JSON record (metrics.json); None when it is absent, unreadable or not an object
    (a run killed while writing it)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return record if isinstance(record, dict) else None


def remove_orphaned_partials(folder: Path) -> list[Path]:
    """Deletes the temporary files that `written_then_renamed` left in `folder` in processes
    that were killed while writing (SIGKILL runs no cleanup); returns them. A file of a
    process that is still running is left alone, whatever it is: pids are reused."""
    removed = []
    for partial in folder.glob(f".*.*{PARTIAL_SUFFIX}"):
        pid = partial.name.removesuffix(PARTIAL_SUFFIX).rpartition(".")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            partial.unlink(missing_ok=True)
            removed.append(partial)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (anyone's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def finished_record(output_dir: Path) -> dict[str, Any] | None:
    """The metrics.json of the run in `output_dir`, if that run finished (FINISHED)."""
    record = read_record(output_dir / "metrics.json")
    return record if record is not None and record.get("status") in FINISHED else None


def record_failure(output_dir: Path, status: str, error: str) -> None:
    """metrics.json in `output_dir` says the job failed, stopped or was interrupted, and why;
    a completed run's record is kept. The job writes it, or for a job whose process was
    killed, the launcher (hydra_plugins/cifar_cnn_launchers) or the search."""
    if finished_record(output_dir) is not None:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"status": status, "error": error}, indent=2) + "\n"
    with written_then_renamed(output_dir / "metrics.json") as partial:
        partial.write_text(record)


# What a failed write's errno says, in words a user acts on.
FULL = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file size limit (ulimit -f) is reached",
}


def unwritable_message(what: str, error: OSError) -> str:
    """ "cannot write <what> (<the OS's reason>: <what it means>)"."""
    reason = error.strerror or str(error)
    meaning = FULL.get(error.errno)
    return f"cannot write {what} ({reason}{': ' + meaning if meaning else ''})"
