"""Errors a user can fix: entry points print their message instead of a traceback."""

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class UserError(Exception):
    """An expected problem with the user's data or settings, explained in its message."""


class DataNotFoundError(UserError):
    """No CIFAR-10 data where the config points, and it could not be downloaded."""


class TrainingStopped(UserError):
    """Training stopped early on purpose; the message says why and what was kept."""


class StoppedBySignal(TrainingStopped):
    """Ctrl-C or SIGTERM: the user or the scheduler wants the whole process to end."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For entry points: a UserError logs its message and exits with status 1."""
    try:
        yield
    except UserError as error:
        log.error("%s", error)
        sys.exit(1)
