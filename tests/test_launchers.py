"""Cluster launching through Hydra's submitit plugin: the SLURM config composes; its local
stand-in runs a sweep for real, and a job signalled as preempted is requeued and continues;
hydra/launcher=shared_gpu runs a sweep a few jobs at a time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from cifar_cnn.errors import UserError
from hydra_plugins.cifar_cnn_launchers.submitit_jobs import (
    LocalJobsThatDieFail,
    SlurmJobsThatDieFail,
    _stopped_since,
)

from .conftest import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_slurm_launcher_takes_its_settings_from_config() -> None:
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                 "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2"]  # fmt: skip
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.cifar_cnn_launchers.submitit_jobs.SlurmJobsThatDieFail"
    )
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node) == ("gpu", 2, 4)
    assert launcher.tasks_per_node == 4  # one task per GPU, as Lightning's DDP wants on SLURM
    assert launcher.timeout_min == 240 and launcher.signal_delay_s == 120
    assert launcher.max_num_timeout == 3


def test_local_launchers_jobs_see_this_machines_gpus() -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=local"], return_hydra_config=True)
    # submitit sets CUDA_VISIBLE_DEVICES to this many (none: "", every GPU hidden).
    assert cfg.hydra.launcher.gpus_per_node == torch.cuda.device_count()


def test_shared_gpu_launcher_is_the_local_one_with_four_jobs_at_once() -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        local = compose("train", overrides=["hydra/launcher=local"], return_hydra_config=True)
        shared = compose("train", overrides=["hydra/launcher=shared_gpu"], return_hydra_config=True)
    assert local.hydra.launcher.max_concurrent_jobs is None  # submitit's own: all at once
    assert shared.hydra.launcher.max_concurrent_jobs == 4
    assert shared.hydra.launcher._target_ == local.hydra.launcher._target_
    assert shared.hydra.launcher.gpus_per_node == torch.cuda.device_count()


def launcher(kind: type, **params: Any) -> Any:
    """A launcher as Hydra makes it from its config, before it launches anything."""
    return kind(submitit_folder="unused", **params)


@pytest.mark.parametrize(
    ("params", "jobs", "setup"),
    [
        ({}, 8, None),  # submitit's own: every job at once, each with every core
        ({"max_concurrent_jobs": 4}, 8, ["export OMP_NUM_THREADS=4"]),  # 16 cores shared out
        ({"max_concurrent_jobs": 4}, 2, ["export OMP_NUM_THREADS=8"]),  # among the 2 that run
        ({"max_concurrent_jobs": 32}, 64, ["export OMP_NUM_THREADS=1"]),  # never below one
        ({"threads_per_job": 3}, 8, ["export OMP_NUM_THREADS=3"]),
        ({"setup": ["module load cuda"], "threads_per_job": 2}, 8,
         ["module load cuda", "export OMP_NUM_THREADS=2"]),
    ],
)  # fmt: skip
def test_each_jobs_threads_are_set_before_it_starts(
    params: dict, jobs: int, setup: list[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    local = launcher(LocalJobsThatDieFail, **params)
    assert local._setup(jobs) == ({"local_setup": ["trap : EXIT", *setup]} if setup else {})


def test_local_jobs_keep_the_gpus_the_sweep_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit would set CUDA_VISIBLE_DEVICES=0 for a job with one GPU: the machine's first."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    setup = launcher(LocalJobsThatDieFail, max_concurrent_jobs=2)._setup(4)["local_setup"]
    assert setup[-1] == "export CUDA_VISIBLE_DEVICES=2,3"
    assert "CUDA_VISIBLE_DEVICES" not in str(launcher(SlurmJobsThatDieFail)._setup(4))


def test_slurm_keeps_its_setup_and_refuses_the_local_settings() -> None:
    slurm = launcher(SlurmJobsThatDieFail, setup=["module load cuda"])
    assert slurm._setup(8) == {"slurm_setup": ["module load cuda"]}
    slurm._check_launch_settings()
    with pytest.raises(UserError, match="hydra.launcher.max_concurrent_jobs is for hydra/launch"):
        launcher(SlurmJobsThatDieFail, max_concurrent_jobs=4)._check_launch_settings()


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["max_concurrent_jobs=0", "threads_per_job=-1"])
def test_a_launch_setting_below_one_is_refused_by_name(
    setting: str, tiny_data_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=shared_gpu",
        f"hydra.launcher.{setting}", "seed=1,2", f"data.data_dir={tiny_data_dir}",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    key, value = setting.split("=")
    assert f"hydra.launcher.{key} is {value}: give a number from 1 up, or null" in output
    assert "Traceback" not in output
    assert not (sweep / "0").exists()  # no job started


@pytest.mark.slow
def test_two_jobs_at_a_time_with_a_thread_each(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Three jobs, at most two at once: the third starts only when one of the first two has
    finished, and each job's torch has the one thread it was given."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=shared_gpu",
        "hydra.launcher.max_concurrent_jobs=2", "hydra.launcher.threads_per_job=1", "seed=1,2,3",
        f"data.data_dir={tiny_data_dir}", "data.batch_size=10", "trainer.accelerator=cpu",
        "trainer.max_epochs=5", "logger.tensorboard=null", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    # Without the launcher's setting, each job would take this many threads.
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "At most 2 jobs at once" in result.stdout + result.stderr

    started, ended = {}, {}
    for job in ("0", "1", "2"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs"] == 5
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={int(job) + 1}" in overrides  # each job in its own folder
        info = sweep / job / "run_info.json"
        assert json.loads(info.read_text())["cpu_threads"] == 1
        # Written as the job's process starts (a busy machine may delay its training until
        # after a job started beside it has ended).
        started[job] = (sweep / job / ".hydra" / "config.yaml").stat().st_mtime
        ended[job] = (sweep / job / "metrics.json").stat().st_mtime
    assert started["1"] < ended["0"] and started["0"] < ended["1"]  # the first two together
    assert started["2"] > min(ended["0"], ended["1"])  # the third in the place of one of them
    summary = (sweep / "summary.md").read_text()
    assert "(3 jobs," in summary and summary.count("| completed |") == 3


@pytest.mark.slow
@pytest.mark.skipif(not Path("/bin/bash").is_file(), reason="needs /bin/bash")
def test_jobs_with_setup_lines_run_where_the_shell_is_bash(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """bash runs the last command of `sh -c` in the shell's place, which would give submitit's
    job controller the launcher's process id."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "tests" / "bash_job_shells.py"), "-m",
        "hydra/launcher=shared_gpu", "hydra.launcher.max_concurrent_jobs=2", "seed=1,2",
        f"data.data_dir={tiny_data_dir}", "data.batch_size=10", "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "logger.tensorboard=null", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["status"] == "completed"


def sweep_with_job_0_signalled(
    signum: signal.Signals,
    once: str,
    max_epochs: int,
    data_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
) -> tuple[int, str, Path]:
    """A local sweep of two jobs (seed=1,2) whose job 0 gets `signum` once its folder holds
    `once` (run_info.json: it is about to train; checkpoints/last.ckpt: an epoch ended): the
    sweep's exit status, its output and its folder."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", "seed=1,2",
        f"data.data_dir={data_dir}", "data.batch_size=10", "trainer.accelerator=cpu",
        f"trainer.max_epochs={max_epochs}", "logger.tensorboard=null", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    sweep_process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (sweep / "0" / once).exists():
            assert sweep_process.poll() is None and time.monotonic() < deadline, f"no {once}"
            time.sleep(0.02)
        os.kill(json.loads((sweep / "0" / "run_info.json").read_text())["pid"], signum)
        output, _ = sweep_process.communicate(timeout=300)
    finally:
        sweep_process.kill()
    return sweep_process.returncode, output, sweep


@pytest.mark.slow
def test_local_launcher_runs_a_sweep_and_a_preempted_job_continues(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    returncode, output, sweep = sweep_with_job_0_signalled(
        signal.SIGUSR2, "checkpoints/last.ckpt", 40, tiny_data_dir, cache_dir, tmp_path
    )  # USR2: what SLURM sends before preemption
    assert returncode == 0, output

    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs"] == 40
    logs = [(sweep / job / "train.log").read_text() for job in ("0", "1")]
    assert "continuing from it" in logs[0] and "continuing from it" not in logs[1]
    assert logs[0].count("epoch 000 (1/40)") == 1  # not started again from scratch
    assert (sweep / "summary.md").is_file()


@pytest.mark.slow
def test_a_sweep_job_on_the_local_launcher_trains_in_two_ddp_processes(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """submitit runs the job in `python -m submitit.core._submit`: Lightning must start the
    job's second process from train.py, not from that module."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", "trainer=ddp_cpu",
        "seed=1", f"data.data_dir={tiny_data_dir}", "data.batch_size=10", "trainer.max_epochs=1",
        "logger.tensorboard=null", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    second = (sweep / "0" / "train_ddp_process_1.log").read_text()  # in the job's folder
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in second


@pytest.mark.slow
def test_a_job_killed_by_sigkill_fails_and_the_sweep_goes_on_to_its_summary(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """As the kernel's out-of-memory killer does: the job runs no more code, and submitit
    finds no result."""
    returncode, output, sweep = sweep_with_job_0_signalled(
        signal.SIGKILL, "run_info.json", 3, tiny_data_dir, cache_dir, tmp_path
    )
    assert returncode == 1, output  # a job did not complete
    assert "Traceback" not in output
    assert "1 of 2 jobs did not complete: 0" in output
    killed = json.loads((sweep / "0" / "metrics.json").read_text())
    assert killed["status"] == "failed"
    assert killed["error"].startswith("KilledJob: the job's process ended without a result")
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "completed"
    summary = (sweep / "summary.md").read_text()
    assert "(2 jobs," in summary and "| failed |" in summary and "| completed |" in summary


def test_only_a_stop_recorded_since_the_jobs_submission_counts(tmp_path: Path) -> None:
    record, submitted = tmp_path / "metrics.json", tmp_path / "submitted.pkl"
    submitted.touch()
    assert not _stopped_since(record, submitted)  # no record: killed before it wrote one
    record.write_text(json.dumps({"status": "stopped", "error": "StoppedBySignal: ..."}))
    assert _stopped_since(record, submitted)
    os.utime(record, (0, submitted.stat().st_mtime - 60))  # an earlier attempt's record
    assert not _stopped_since(record, submitted)
    record.write_text(json.dumps({"status": "failed", "error": "..."}))
    assert not _stopped_since(record, submitted)


@pytest.mark.slow
def test_a_job_stopped_by_sigterm_keeps_its_record_and_the_sweep_goes_on(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """The job saves its last.ckpt and records "stopped", then exits without a result: the
    launcher keeps that record (a killed job's would say "failed") and the other job ends."""
    returncode, output, sweep = sweep_with_job_0_signalled(
        signal.SIGTERM, "checkpoints/last.ckpt", 40, tiny_data_dir, cache_dir, tmp_path
    )
    assert returncode == 1, output  # a job did not complete
    assert "Traceback" not in output and "job 0 was stopped by a signal" in output
    stopped = json.loads((sweep / "0" / "metrics.json").read_text())
    assert stopped["status"] == "stopped"
    assert stopped["error"].startswith("StoppedBySignal: stopped by SIGTERM")
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "completed"
    assert "| stopped |" in (sweep / "summary.md").read_text()
