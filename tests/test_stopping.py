"""Ctrl-C and SIGTERM: a checkpoint to continue from, and the command that continues."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from cifar_cnn.errors import TrainingStopped
from cifar_cnn.stopping import GracefulStop, continue_command

from .conftest import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # train.py processes, or the full data set
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_last_ckpt_and_exits_non_zero(
    signum: signal.Signals, data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, str(ROOT / "train.py"), f"data.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}", "trainer.accelerator=cpu", "trainer.max_epochs=50",
        "+trainer.limit_train_batches=100", "+trainer.limit_val_batches=1",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:  # wait until training runs
            if "epoch 000 (1/50)" in line:
                break
        process.send_signal(signum)
        output = process.stdout.read()
        assert process.wait(timeout=120) == 1, output
    last = run_dir / "checkpoints" / "last.ckpt"
    # Mid-epoch; or at the first epoch's end, when the signal beats GracefulStop's hook there.
    assert f"stopped by {signum.name} at " in output and f"saved {last}" in output
    assert "Continue with: python train.py ckpt_path=run\n" in output  # relative to the cwd
    assert "Traceback" not in output
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] >= 100  # after the first epoch's 100 steps
    assert not list(run_dir.glob("checkpoints/*.tmp"))


def test_a_signal_during_the_last_validation_still_stops_with_a_message() -> None:
    stop = GracefulStop()
    stop._note(signal.SIGTERM, None)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at the end of training"):
        stop.on_train_end(trainer=None, pl_module=None)


def test_a_stopped_sweep_job_names_the_sweeps_command_to_continue(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    hydra:\n    - hydra.mode=MULTIRUN\n"
        f"    - hydra.sweep.dir={sweep}\n    - hydra/launcher=local\n"
        "    task:\n    - model.optimizer.lr=1e-3,3e-4\n    - trainer.max_epochs=2\n"
    )
    overrides = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}", "model.optimizer.lr=1e-3"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        assert continue_command(sweep / "0" / "checkpoints" / "last.ckpt") == (
            f"python train.py -m model.optimizer.lr=1e-3,3e-4 trainer.max_epochs=2 "
            f"hydra/launcher=local hydra.sweep.dir={sweep}"
        )
        (sweep / "multirun.yaml").unlink()  # an Optuna search: its sweeper writes none
        assert continue_command(sweep / "last.ckpt").startswith("the search's command again")
    finally:
        HydraConfig.instance().cfg = previous  # other tests' runs are not sweep jobs


def test_a_stopped_run_is_continued_by_its_folder_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ckpt_path=<run>` takes the run's own settings back: no override to retype."""
    run = tmp_path / "outputs" / "runs" / "2026-01-01_00-00-00_1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").touch()
    monkeypatch.chdir(tmp_path)
    assert continue_command(run / "checkpoints" / "last.ckpt") == (
        "python train.py ckpt_path=outputs/runs/2026-01-01_00-00-00_1"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not below the current folder: the whole path
    assert continue_command(run / "checkpoints" / "last.ckpt") == f"python train.py ckpt_path={run}"
