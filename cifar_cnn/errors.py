"""Errors a user can fix: entry points print their message instead of a traceback."""


class UserError(Exception):
    """An expected problem with the user's data or settings, explained in its message."""


class DataNotFoundError(UserError):
    """No CIFAR-10 data where the config points, and it could not be downloaded."""
