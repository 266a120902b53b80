"""The C allocator's settings for training on a CPU."""

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Lets glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the
    system; True when set.

    By default glibc gives blocks above a threshold (128 KB at first) back to the system at
    every free and maps fresh pages at the next allocation, so each training step of the
    seed net page-faults through its activations and gradients: on the project's CPU the
    plain loop of benchmarks/train_speed.py took 34 ms a step, 21 ms with this (batch 64).
    The cost is up to a few hundred MB held by the process. Not glibc (macOS, musl): no-op.
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
