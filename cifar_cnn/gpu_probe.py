"""torch's check for a GPU at every optimizer step, made cheap on machines without one."""

import os

import torch

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_probe() -> bool:
    """Lets `torch.cuda.is_available()` ask the CUDA runtime instead of NVML where there is no
    GPU; True when set.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that asking whether CUDA is
    available does not initialise CUDA in a process that forks later. torch's optimizers ask
    at every step (`Optimizer.step` checks for CUDA graph capture), and torch keeps the answer
    only once CUDA is initialised, which without a GPU never happens: each step then searches
    six folders for libnvidia-ml.so.1 and maps and unmaps ld.so.cache. On the project's CPU
    that cost 0.3-0.4 ms of a 5-6 ms bf16 step of the seed net (benchmarks/README.md), on a
    plain PyTorch loop in the same process too. Without a GPU there is no CUDA state that a
    fork could break, and the runtime's answer takes under a microsecond.
    """
    if os.environ.get(NVML_CHECK) != "1" or torch.cuda.device_count() > 0:
        return False
    os.environ[NVML_CHECK] = "0"
    return True
