"""The benchmarks run end to end in a smoke mode and end with one JSON line."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_cnn.data import CIFAR10DataModule

from .conftest import make_image_folder

pytestmark = pytest.mark.slow  # every test runs a benchmark script

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, cache_dir: Path, *args: str) -> tuple[str, dict]:
    """Runs benchmarks/<script> with `args` on the CPU; its output, and its last line's JSON."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", *args]
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "64-true"], "precision 64-true: the plain loop runs 32-true, bf16-"),
        (["--precision", "bf16"], "precision bf16: the plain loop runs 32-true, bf16-"),
        (["--steps", "9"], "--steps 9: an epoch has 8 batches"),  # 80 images, batches of 10
    ],
)
def test_train_speed_refuses_what_the_plain_loop_would_not_match(
    args: list[str], message: str, tiny_data_dir: Path, cache_dir: Path
) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--device", "cpu",
               *args, f"data.data_dir={tiny_data_dir}", "data.batch_size=10"]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and message in result.stderr


def test_train_speed_smoke_run_writes_json(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "speed.json"
    stdout, last_line = run_benchmark(
        "train_speed.py", cache_dir, "--steps", "3", "--epochs", "2", "--output", str(output),
        "--precision", "bf16-mixed", f"data.data_dir={tiny_data_dir}", "data.batch_size=10",
    )  # fmt: skip
    assert last_line["precision"] == "bf16-mixed"  # for both paths
    assert last_line == json.loads(output.read_text())
    assert {"reference_epoch_s", "project_epoch_s", "ratio", "device", "torch"} <= last_line.keys()
    assert last_line["ratio"] == last_line["project_epoch_s"] / last_line["reference_epoch_s"]
    assert last_line["steps_per_epoch"] == 3 and last_line["batch_size"] == 10
    for path, runs in (("reference", 2), ("project", 1)):  # the reference runs twice
        timings = last_line["details"][path]
        assert len(timings["epoch_times_s"]) == 2 * runs and timings["images_per_s"] > 0
        assert timings["eval_images_per_s"] > 0
        # A whole run's training time, warm-up epoch included (the mean over runs).
        whole_run = sum(timings["epoch_times_s"]) / runs
        assert timings["train_s"] == pytest.approx(whole_run, abs=0.01)
        timed = timings["epoch_times_s"][1::2]  # each run's second epoch: the first warms up
        assert timings["epoch_s"] == pytest.approx(sum(timed) / len(timed), abs=1e-3)
    assert "ratio project/reference" in stdout


def test_train_speed_profile_counts_each_paths_operations_per_step(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    stdout, last_line = run_benchmark(
        "train_speed.py", cache_dir, "--steps", "3", "--epochs", "2", "--profile",
        f"data.data_dir={tiny_data_dir}", "data.batch_size=10",
    )  # fmt: skip
    details = last_line["details"]
    for path in ("reference", "project"):
        profile = details[path]["profile"]
        assert f"{path}: one epoch of 3 steps under torch.profiler" in stdout
        # At least a forward and a backward per step; on a CPU, no kernels and no waits.
        assert profile["aten_ops_per_step"] >= 2
        assert profile["kernel_launches_per_step"] == profile["host_waits_per_step"] == 0
    # The project's step does all the plain loop's work, and more (its metrics, for one).
    project_ops, reference_ops = (
        details[path]["profile"]["aten_ops_per_step"] for path in ("project", "reference")
    )
    assert project_ops > reference_ops


def test_step_overhead_smoke_run_times_each_path(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "overhead.json"
    stdout, summary = run_benchmark(
        "step_overhead.py", cache_dir, "--steps", "3", "--epochs", "2", "--rounds", "1",
        "--output", str(output), f"data.data_dir={tiny_data_dir}", "data.batch_size=10",
    )  # fmt: skip
    assert summary == json.loads(output.read_text())
    paths = ["one_layer_plain", "one_layer_lightning", "one_layer_manual", "one_layer_grouped",
             "plain", "on_device", "dataloader", "bare_step"]  # fmt: skip
    assert list(summary["us_per_step"]) == paths
    assert all(len(times) == 1 and times[0] > 0 for times in summary["us_per_step"].values())
    assert "Lightning's loop:" in stdout and "project/plain" in stdout
    drawn = summary["us_per_batch"]  # on this CPU: the data paths alone
    assert list(drawn) == ["batches_on_device", "batches_dataloader"]
    assert all(len(times) == 1 and times[0] > 0 for times in drawn.values())
    assert "Drawing a batch, nothing trained:" in stdout


def test_airbench_reference_trains_airbench_on_the_project_data(
    tmp_path: Path, cache_dir: Path
) -> None:
    pytest.importorskip("airbench", reason="the benchmark extra: pip install -e '.[bench]'")
    # 1,030 training images: one of airbench's batches of 1024 an epoch; 40 test images.
    data_dir = make_image_folder(tmp_path / "data", {"train": 103, "test": 4})
    output = tmp_path / "airbench.json"
    stdout, summary = run_benchmark(
        "airbench_reference.py", cache_dir, "--runs", "2", "--epochs", "2",
        "--output", str(output), f"data.data_dir={data_dir}",
    )  # fmt: skip
    assert summary == json.loads(output.read_text())
    assert [run["seed"] for run in summary["runs"]] == [0, 1]
    accuracies = [run["tta_acc"] for run in summary["runs"]]
    for accuracy in accuracies:  # a share of the 40 test images
        assert 0 <= accuracy <= 1 and (accuracy * 40) == pytest.approx(round(accuracy * 40))
    assert summary["tta_acc_mean"] == pytest.approx(sum(accuracies) / 2)
    assert summary["epochs"] == 2 and summary["device"]  # the CPU's model name
    assert "seed 1: test accuracy" in stdout


def test_airbench_reference_writes_the_cache_as_airbench_reads_it(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("airbench", reason="the benchmark extra: pip install -e '.[bench]'")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("CIFAR_CNN_CACHE_DIR", str(cache_dir))
    airbench_reference = importlib.import_module("airbench_reference")
    data_dir = make_image_folder(tmp_path / "data", {"train": 3, "test": 2})
    folder = tmp_path / "cifar10"

    airbench_reference.write_airbench_data(folder, [f"data.data_dir={data_dir}"])

    datamodule = CIFAR10DataModule(data_dir, cache_dir)
    cache = torch.load(datamodule.source.cache_path, weights_only=True)
    train, test = (torch.load(folder / f"{split}.pt") for split in ("train", "test"))
    assert train["images"].shape == (30, 32, 32, 3) and train["images"].dtype == torch.uint8
    # The test set as it is; the training set shuffled, each image with its own label.
    assert torch.equal(test["images"].permute(0, 3, 1, 2), cache["test_images"])
    assert torch.equal(test["labels"], cache["test_labels"])
    label_of = {image.numpy().tobytes(): int(label) for image, label in
                zip(cache["train_images"], cache["train_labels"], strict=True)}  # fmt: skip
    written = [(image.permute(2, 0, 1).numpy().tobytes(), int(label)) for image, label in
               zip(train["images"], train["labels"], strict=True)]  # fmt: skip
    assert sorted(written) == sorted(label_of.items())
    assert train["labels"].tolist() != cache["train_labels"].tolist()  # not class by class


def test_export_speed_smoke_run_measures_both_nets_and_formats(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "export.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "export_speed.py"), "--images", "16",
               "--batch-size", "8", "--rounds", "1", "--output", str(output),
               f"data.data_dir={tiny_data_dir}"]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads(output.read_text())
    assert summary["images"] == 16 and set(summary["nets"]) == {"tutorial", "fast"}
    for net in summary["nets"].values():
        assert set(net["images_per_s"]) == {"pytorch", "onnxruntime", "torchscript"}
        assert min(net["file_mb"].values()) > 0.5 and min(net["export_s"].values()) > 0
        assert max(net["max_abs_logit_difference"].values()) <= 1e-4
    assert summary["nets"]["fast"]["passes_per_image"] == 6
    assert "ort/pt" in result.stdout


def test_search_pruning_smoke_run_compares_two_searches(
    tiny_data_dir: Path, cache_dir: Path
) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "search_pruning.py"), "--trials", "2",
               "--epochs", "2", "--", "trainer.accelerator=cpu",
               "logger.tensorboard=null"]  # fmt: skip
    env = {**os.environ, "CIFAR10_DIR": str(tiny_data_dir), "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["trials"], summary["epochs"]) == (2, 2)
    for search in ("none", "median"):  # the median pruner waits for 5 trials: none pruned
        figures = summary[search]
        assert (figures["complete"], figures["pruned"], figures["epochs_trained"]) == (2, 0, 4)
        assert figures["wall_time_s"] > 0
    assert isinstance(summary["wall_time_saved"], float)


def test_augment_speed_smoke_run_times_every_policy() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "augment_speed.py"), "--batch-size", "8",
               "--rounds", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    policies = {path.stem for path in (ROOT / "conf" / "augment").glob("*.yaml")}
    timed = set(summary["ms_per_batch"])
    assert policies < timed and "flip_and_shift_4" in timed
    assert {"trivialaugment_one_draw_per_batch", "cutout_one_draw_per_batch"} < timed
    assert all(ms > 0 for ms in summary["ms_per_batch"].values())


def test_sweep_throughput_smoke_run_times_each_number_of_jobs_at_once(
    tiny_data_dir: Path, cache_dir: Path
) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "sweep_throughput.py"), "--jobs", "2",
               "--concurrent", "1,2", "--epochs", "1", "--", "trainer.accelerator=cpu",
               "data.batch_size=10", "hydra.launcher.threads_per_job=1"]  # fmt: skip
    env = {**os.environ, "CIFAR10_DIR": str(tiny_data_dir), "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["jobs"], summary["epochs"]) == (2, 1)
    assert [s["max_concurrent_jobs"] for s in summary["sweeps"]] == [1, 2]
    for sweep in summary["sweeps"]:
        assert sweep["completed"] == 2 and sweep["jobs_per_hour"] > 0
        assert 0 <= sweep["mean_test_acc"] <= 1
    assert summary["speedup_over_one_at_a_time"]["1"] == 1.0
