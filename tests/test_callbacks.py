"""FiniteLoss and GracefulStop in real training runs (EpochSummary: see test_train.py)."""

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cifar_cnn.callbacks import GracefulStop, TrainingStopped, _continue_command
from cifar_cnn.training import train

from .conftest import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_a_diverging_loss_stops_the_run_naming_step_and_learning_rate(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    cfg = compose_config(
        f"data.data_dir={tiny_data_dir}", "data.batch_size=10", "model.optimizer.lr=1e12",
        "trainer.accelerator=cpu", "trainer.max_epochs=50", "trainer.log_every_n_steps=1",
    )  # fmt: skip
    with pytest.raises(TrainingStopped, match=r"loss became (nan|inf) at step \d+ .*rate 1e\+12"):
        train(cfg)


def test_the_loss_is_checked_without_a_read_per_step_and_before_any_checkpoint(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """Read every 1000 steps only, the check still names the first bad step (the same as a
    read every step names) and stops the run before a checkpoint holds the NaN weights."""
    messages = []
    for every in (1, 1000):
        cfg = compose_config(
            f"data.data_dir={tiny_data_dir}", "data.batch_size=10", "model.optimizer.lr=1e12",
            "trainer.accelerator=cpu", "trainer.max_epochs=50",
            f"trainer.log_every_n_steps={every}",
        )  # fmt: skip
        with pytest.raises(TrainingStopped) as stopped:
            train(cfg)
        messages.append(str(stopped.value))
        checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
        assert not checkpoints.exists() or not any(checkpoints.iterdir())
    assert messages[0] == messages[1]


def test_a_checkpoint_saved_by_ctrl_c_after_the_loss_diverged_is_refused(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """Ctrl-C mid-epoch saves last.ckpt before any validation or epoch end checks the loss."""
    cfg = compose_config(
        f"data.data_dir={tiny_data_dir}", "data.batch_size=4", "model.optimizer.lr=1e12",
        "trainer.accelerator=cpu", "trainer.log_every_n_steps=1000",
        "+callbacks.interrupt._target_=tests.test_resume.InterruptAtStep",
        "+callbacks.interrupt.step=12",  # of 20 steps in the epoch
    )  # fmt: skip
    with pytest.raises(TrainingStopped, match=r"loss became (nan|inf) at step ([0-9]|1[01]) "):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


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
        assert _continue_command(sweep / "0" / "checkpoints" / "last.ckpt") == (
            f"python train.py -m model.optimizer.lr=1e-3,3e-4 trainer.max_epochs=2 "
            f"hydra/launcher=local hydra.sweep.dir={sweep}"
        )
        (sweep / "multirun.yaml").unlink()  # an Optuna search: its sweeper writes none
        assert _continue_command(sweep / "last.ckpt").startswith("the search's command again")
    finally:
        HydraConfig.instance().cfg = previous  # other tests' runs are not sweep jobs
