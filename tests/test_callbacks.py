"""EpochSummary and FiniteLoss."""

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from cifar_cnn.errors import TrainingStopped
from cifar_cnn.training import train


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
        "+callbacks.interrupt._target_=tests.probes.InterruptAtStep",
        "+callbacks.interrupt.step=12",  # of 20 steps in the epoch
    )  # fmt: skip
    with pytest.raises(TrainingStopped, match=r"loss became (nan|inf) at step ([0-9]|1[01]) "):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
