"""Settings of the process a run trains in: its default precision, torch's GPU probe, glibc's
allocator, and the library messages that are known to be harmless."""

import ctypes
import logging
import os
import platform
import warnings

import torch
from lightning.fabric.utilities.device_parser import _select_auto_accelerator

log = logging.getLogger(__name__)


def default_precision(accelerator: str) -> str:
    """`bf16-mixed` where `accelerator` puts the run on a CPU that computes bf16 natively
    (AVX512-BF16 or AMX), where it is the faster at the same accuracy; `32-true` elsewhere:
    other CPUs emulate bf16, and GPU runs keep float32 unless a recipe asks for bf16."""
    if not on_cpu(accelerator):
        return "32-true"
    # torch has no public test of these instructions; its own tests use these two.
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native_bf16 else "32-true"


def on_cpu(accelerator: str) -> bool:
    """True when the trainer's `accelerator` puts it on the CPU on this machine."""
    if accelerator == "auto":
        accelerator = _select_auto_accelerator()  # Lightning's own pick: tpu, mps, cuda, cpu
    return accelerator == "cpu"


def on_cuda(accelerator: str) -> bool:
    """True when the trainer's `accelerator` puts it on CUDA GPUs on this machine."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_probe() -> bool:
    """Where torch sees no GPU, makes `torch.cuda.is_available()` ask the CUDA runtime rather
    than NVML; True when it did.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that asking for CUDA does not
    initialise it in a process that forks later. Adam's `step` asks at every step, and without
    a GPU torch never keeps the answer: each step searches the library path for
    libnvidia-ml.so.1 (the NVML probe in benchmarks/README.md's log). Without a visible GPU
    no process of the run uses CUDA, so a fork has nothing to break.
    """
    if os.environ.get(NVML_CHECK) != "1" or torch.cuda.device_count() > 0:
        return False
    os.environ[NVML_CHECK] = "0"
    return True


# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Lets glibc keep freed blocks of up to 32 MB for reuse; True when set.

    By default glibc returns blocks above 128 KB to the system at every free and maps fresh
    pages at the next allocation, so each CPU training step page-faults through its
    activations and gradients. The cost is up to a few hundred MB held by the process. Not
    glibc (macOS, musl): no-op.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        log.warning("could not set glibc's malloc thresholds: CPU training may be slower")
    return done


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_TIP_FILTER = _DropMessages("💡 Tip")


def silence_known_warnings() -> None:
    """Silences library messages known to be harmless, so that real warnings stand out."""
    # Lightning 2.6 builds torch's LeafSpec, which torch 2.14 deprecates; nothing for us to change.
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
    )
    # Our batches are slices of in-memory tensors: loader worker processes would only add cost.
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    # An advertisement for a hosted service, printed at every Trainer start.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_TIP_FILTER)
    # Two ModelCheckpoints (the best; last.ckpt): "best" is the first's, as train.py intends.
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="best"\)` is called with Trainer')
    # The model summary's size under bf16-mixed: its "Using 32 bits instead" is right, as mixed
    # precision keeps the weights in float32.
    warnings.filterwarnings("ignore", message=r"Precision .*-mixed is not supported by the model")
