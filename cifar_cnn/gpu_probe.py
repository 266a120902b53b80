"""torch's check for a GPU at every Adam step, made cheap on machines without one."""

import os

import torch

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_probe() -> bool:
    """Where torch sees no GPU, makes `torch.cuda.is_available()` ask the CUDA runtime rather
    than NVML; True when it did.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that asking whether CUDA is
    available does not initialise CUDA in a process that forks later. Adam's `step` (and that
    of most torch optimizers, not SGD's) asks at every step, and torch keeps the answer only
    once CUDA is initialised, which without a GPU never happens: each step then searches the
    library path for libnvidia-ml.so.1 (benchmarks/README.md, "The NVML probe", measures what
    that costs). Where that library is missing, torch asks the runtime after the search anyway,
    so the setting protected no fork there; where it is present but no GPU is visible, no
    process of the run uses CUDA, so a fork has nothing to break.
    """
    if os.environ.get(NVML_CHECK) != "1" or torch.cuda.device_count() > 0:
        return False
    os.environ[NVML_CHECK] = "0"
    return True
