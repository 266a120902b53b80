"""What a run needs to be reproduced, beside Hydra's record of its config and overrides."""

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf",
            "numpy", "pillow")  # fmt: skip
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def provenance(seed: int, device: torch.device) -> dict[str, Any]:
    """The command, seed, versions, hardware (`device`: the run's) and the project's git
    commit (None outside git), dirty where files differ from it, new ones included."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "host": platform.node(),
        "pid": os.getpid(),
        "seed": seed,
        "python": platform.python_version(),
        "packages": {name: importlib.metadata.version(name) for name in PACKAGES},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu_threads": torch.get_num_threads(),
        "git": _git_state(),
    }


def _git_state() -> dict[str, Any] | None:
    def git(*args: str) -> str:
        command = ["git", "-C", str(PROJECT_ROOT), *args]
        return subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=10
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain").strip()  # new files too, not ignored ones
    except (OSError, subprocess.SubprocessError):  # no git, or an installed copy
        return None
    return {"commit": commit, "dirty": bool(changed)}
