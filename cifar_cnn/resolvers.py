"""The OmegaConf resolvers that conf/ uses, registered by the entry points before Hydra starts.

Hydra hands registered resolvers on to the job processes of its launchers.
"""

import os
import sys

import torch
from omegaconf import OmegaConf

from cifar_cnn.resume import config_subfolder, run_folder
from cifar_cnn.runtime import default_precision, on_cpu, on_cuda


def stdout_isatty() -> bool:
    """True when stdout is a terminal: progress bars redraw there, log files get plain lines."""
    return sys.stdout.isatty()


def register_resolvers() -> None:
    """Registers every resolver of conf/ (again, where one is already registered)."""
    OmegaConf.register_new_resolver("stdout_isatty", stdout_isatty, replace=True)
    OmegaConf.register_new_resolver("gpu_count", torch.cuda.device_count, replace=True)
    OmegaConf.register_new_resolver("on_cpu", on_cpu, replace=True)
    OmegaConf.register_new_resolver("on_cuda", on_cuda, replace=True)
    OmegaConf.register_new_resolver("default_precision", default_precision, replace=True)
    OmegaConf.register_new_resolver("run_folder", run_folder, replace=True)
    OmegaConf.register_new_resolver("config_subfolder", config_subfolder, replace=True)
    # Run folder names end in the process id: two runs started in the same second differ.
    # Cached: every job of a sweep gets the same value, even with a launcher of many processes.
    OmegaConf.register_new_resolver("pid", os.getpid, replace=True, use_cache=True)
