"""Writing files so that no reader ever sees one half-written, and reading run records."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The statuses of a run's metrics.json once it has trained to its end: completed, or stopped
# by a search's pruner (its metrics stand as a trial's result).
FINISHED = ("completed", "pruned")


@contextmanager
def written_then_renamed(path: Path) -> Iterator[Path]:
    """Yields a private temporary path beside `path`; once the block has written it, renames
    it to `path` in one step. A run killed meanwhile leaves the previous `path` intact, and
    runs writing the same `path` at once never mix their bytes."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
