"""run_info.json's facts: the run's own device, and the git state of the project's files."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cifar_cnn import provenance as provenance_module
from cifar_cnn.provenance import provenance


def test_the_device_is_the_runs_not_the_machines_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert provenance(0, torch.device("cpu"))["device"] == "cpu"  # trainer=cpu on a GPU machine
    assert provenance(0, torch.device("cuda", 0))["device"] == "NVIDIA H100"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_new_file_makes_the_tree_dirty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of a new config file (conf/experiment/mine.yaml) is not the commit's."""

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "train.py").write_text("")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(provenance_module, "PROJECT_ROOT", tmp_path)
    assert provenance_module._git_state()["dirty"] is False
    (tmp_path / "mine.yaml").write_text("seed: 1\n")
    assert provenance_module._git_state()["dirty"] is True
