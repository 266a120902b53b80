"""Training runs as jobs of a sweep: folders, failures, reruns, TensorBoard over the jobs."""

import csv
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # every test runs a sweep of train.py processes

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(
    sweep: Path, data_dir: Path, cache_dir: Path, *overrides: str
) -> subprocess.CompletedProcess:
    """A two-job learning-rate sweep (`overrides` name the rates) on a tiny data tree."""
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", f"data.data_dir={data_dir}",
        "data.batch_size=10", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
        f"hydra.sweep.dir={sweep}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    return subprocess.run(
        command, cwd=sweep.parent, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    result = run_sweep(
        sweep, tiny_data_dir, cache_dir, "model.optimizer.lr=1e12,3e-4", "trainer.max_epochs=3"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # every job ran, but not all completed
    assert "1 of 2 jobs did not complete: 0" in output and "Traceback" not in output

    failed = json.loads((sweep / "0" / "metrics.json").read_text())
    assert failed["status"] == "failed" and re.search("loss became (nan|inf)", failed["error"])
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "completed"
    with (sweep / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))

    def swept(job: str) -> str:  # as Hydra recorded it, e.g. model.optimizer.lr=0.0003
        lines = (sweep / job / ".hydra" / "overrides.yaml").read_text().splitlines()
        return next(line[2:] for line in lines if "optimizer.lr" in line)

    assert [(row["job"], row["overrides"], row["status"]) for row in rows] == [
        ("1", swept("1"), "completed"),
        ("0", swept("0"), "failed"),
    ]
    assert float(rows[0]["val/acc_best"]) >= 0 and rows[0]["best_checkpoint"].endswith(".ckpt")
    with Image.open(sweep / "summary.png") as image:
        assert image.format == "PNG"
    assert f"| 1 | {swept('1')} |" in (sweep / "summary.md").read_text()


def test_a_sweep_run_again_keeps_its_completed_jobs_and_its_folder_refuses_another(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    command = ("model.optimizer.lr=3e-4", "trainer.max_epochs=1")
    assert run_sweep(sweep, tiny_data_dir, cache_dir, *command).returncode == 0
    job = {path.name: path.read_bytes() for path in (sweep / "0").rglob("*") if path.is_file()}

    again = run_sweep(sweep, tiny_data_dir, cache_dir, *command)
    assert again.returncode == 0, again.stdout
    assert "This job's run completed before: its metrics stand" in again.stdout
    assert (sweep / "0" / "metrics.json").read_bytes() == job["metrics.json"]

    other = run_sweep(sweep, tiny_data_dir, cache_dir, "model.optimizer.lr=1e-3", command[1])
    output = other.stdout + other.stderr
    assert other.returncode == 1 and "Traceback" not in output
    message = "holds another sweep (there: model.optimizer.lr=3e-4; here: model.optimizer.lr=1e-3)"
    assert f"{sweep} {message}" in output
    assert (sweep / "0" / "metrics.json").read_bytes() == job["metrics.json"]
    assert (sweep / "0" / ".hydra" / "overrides.yaml").read_bytes() == job["overrides.yaml"]


def test_tensorboard_serves_a_sweeps_runs_curves_and_hparams(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    result = run_sweep(
        sweep, tiny_data_dir, cache_dir, "model.optimizer.lr=1e-3,3e-4", "trainer.max_epochs=2"
    )
    assert result.returncode == 0, result.stderr

    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1",
         "--port", "0", "--load_fast", "false", "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = _served_address(server)
        deadline = time.monotonic() + 60
        # It reads the event files in the background; hp/test_acc is each run's last point.
        while time.monotonic() < deadline:
            tags = _get(f"{address}/data/plugin/scalars/tags")
            if len(tags) == 2 and all("hp/test_acc" in run_tags for run_tags in tags.values()):
                break
            time.sleep(0.5)
        runs = _get(f"{address}/data/runs")
        assert sorted(runs) == ["0/tensorboard", "1/tensorboard"]
        for run in runs:
            query = urllib.parse.urlencode({"run": run, "tag": "val/acc"})
            curve = _get(f"{address}/data/plugin/scalars/scalars?{query}")
            assert [step for _, step, _ in curve] == [7, 15]  # 8 steps an epoch, 2 epochs
            metrics = json.loads((sweep / run.split("/")[0] / "metrics.json").read_text())
            query = urllib.parse.urlencode({"run": run, "tag": "hp/test_acc"})
            [(_, _, test_acc)] = _get(f"{address}/data/plugin/scalars/scalars?{query}")
            assert test_acc == pytest.approx(metrics["test/acc"])
        experiment = _post(f"{address}/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {info["name"] for info in experiment["hparamInfos"]}
        assert {"model/optimizer/lr", "data/batch_size", "seed"} <= hparams
        groups = _post(
            f"{address}/data/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
             "colParams": [{"hparam": "model/optimizer/lr"}], "startIndex": 0, "sliceSize": 10},
        )["sessionGroups"]  # fmt: skip
        assert sorted(g["hparams"]["model/optimizer/lr"] for g in groups) == [3e-4, 1e-3]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _served_address(server: subprocess.Popen) -> str:
    """TensorBoard's address, from its start-up line ("... at http://127.0.0.1:PORT/ ...")."""
    for line in server.stderr:
        if match := re.search(r"(http://127\.0\.0\.1:\d+)/", line):
            return match.group(1)
    raise AssertionError(f"tensorboard exited ({server.wait()}) without serving")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def run_train_py(*overrides: str, cache_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_multirun_gives_each_job_its_own_folder(
    data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_train_py(
        "-m", "model.optimizer.lr=1e-3,3e-4", "debug=fast_dev_run", f"data.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}", cache_dir=cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for job, lr in (("0", "0.001"), ("1", "0.0003")):
        assert (
            f"model.optimizer.lr={lr}"
            in (sweep_dir / job / ".hydra" / "overrides.yaml").read_text()
        )
        assert (sweep_dir / job / "metrics.json").is_file()
