"""Runs train.py with the shells of submitit's local jobs started as bash, as on hosts whose
/bin/sh is bash: `python tests/bash_job_shells.py <train.py arguments>`."""

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


class BashPopen(subprocess.Popen):
    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        if kwargs.get("shell"):
            kwargs["executable"] = "/bin/bash"
        super().__init__(args, *rest, **kwargs)


if __name__ == "__main__":
    subprocess.Popen = BashPopen  # the shells that submitit's local executor starts
    sys.argv = [str(TRAIN_PY), *sys.argv[1:]]
    runpy.run_path(str(TRAIN_PY), run_name="__main__")
