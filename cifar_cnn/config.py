"""OmegaConf resolvers used by the configs in conf/."""

import sys

from omegaconf import OmegaConf


def stdout_isatty() -> bool:
    """True when stdout is a terminal: progress bars redraw there, log files get plain lines."""
    return sys.stdout.isatty()


OmegaConf.register_new_resolver("stdout_isatty", stdout_isatty, replace=True)
