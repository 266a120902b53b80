"""Writing files so that no reader ever sees one half-written."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
