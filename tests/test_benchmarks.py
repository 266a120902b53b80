"""The speed benchmark runs end to end in a smoke mode and ends with one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def test_train_speed_smoke_run_writes_json(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "speed.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--device", "cpu",
        "--steps", "3", "--epochs", "2", "--output", str(output),
        f"data.data_dir={tiny_data_dir}", "data.batch_size=10",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    last_line = json.loads(result.stdout.strip().splitlines()[-1])
    assert last_line == json.loads(output.read_text())
    assert {"reference_epoch_s", "project_epoch_s", "ratio", "device", "torch"} <= last_line.keys()
    assert last_line["ratio"] == last_line["project_epoch_s"] / last_line["reference_epoch_s"]
    assert last_line["steps_per_epoch"] == 3 and last_line["batch_size"] == 10
    for path, runs in (("reference", 2), ("project", 1)):  # the reference runs twice
        figures = last_line["details"][path]
        assert len(figures["epoch_times_s"]) == 2 * runs and figures["images_per_s"] > 0
        assert figures["eval_images_per_s"] > 0
        # A whole run's training time, warm-up epoch included (the mean over runs).
        whole_run = sum(figures["epoch_times_s"]) / runs
        assert figures["train_s"] == pytest.approx(whole_run, abs=0.01)
    assert "ratio project/reference" in result.stdout


def test_train_speed_profile_counts_each_paths_operations_per_step(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--device", "cpu",
        "--steps", "3", "--epochs", "2", "--profile",
        f"data.data_dir={tiny_data_dir}", "data.batch_size=10",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    details = json.loads(result.stdout.strip().splitlines()[-1])["details"]
    for path in ("reference", "project"):
        profile = details[path]["profile"]
        assert f"{path}: one epoch of 3 steps under torch.profiler" in result.stdout
        # At least a forward and a backward per step; on a CPU, no kernels and no waits.
        assert profile["aten_ops_per_step"] >= 2
        assert profile["kernel_launches_per_step"] == profile["host_waits_per_step"] == 0
    # The project's step does all the plain loop's work, and more (its metrics, for one).
    project_ops, reference_ops = (
        details[path]["profile"]["aten_ops_per_step"] for path in ("project", "reference")
    )
    assert project_ops > reference_ops


def test_airbench_reference_trains_airbench_on_the_project_data(
    tmp_path: Path, cache_dir: Path
) -> None:
    pytest.importorskip("airbench", reason="the benchmark extra: pip install -e '.[bench]'")
    # 1,030 training images: one of airbench's batches of 1024 an epoch; 40 test images.
    data_dir = make_image_folder(tmp_path / "data", {"train": 103, "test": 4})
    output = tmp_path / "airbench.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "airbench_reference.py"), "--device", "cpu",
        "--runs", "2", "--epochs", "2", "--output", str(output), f"data.data_dir={data_dir}",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads(output.read_text())
    assert [run["seed"] for run in summary["runs"]] == [0, 1]
    accuracies = [run["tta_acc"] for run in summary["runs"]]
    for accuracy in accuracies:  # a share of the 40 test images
        assert 0 <= accuracy <= 1 and (accuracy * 40) == pytest.approx(round(accuracy * 40))
    assert summary["tta_acc_mean"] == pytest.approx(sum(accuracies) / 2)
    assert summary["device"] == "cpu" and summary["epochs"] == 2
    assert "seed 1: test accuracy" in result.stdout
