"""EpochSummary and FiniteLoss; the EMA of the weights, learning-rate curves, early stopping."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_cnn.errors import TrainingStopped
from cifar_cnn.module import ImageClassifier
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


TINY_RUN = [
    "data.batch_size=16", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
]  # 5 steps an epoch  # fmt: skip


def test_ema_checkpoints_hold_the_average_of_the_steps_weights(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The average, (1 - decay) of each step's weights on top of decay of the average before
    (from the first step's weights), is what checkpoints hold and what was tested; the current
    weights travel beside it for a resume."""
    steps = tmp_path / "steps.pt"
    cfg = compose_config(
        *TINY_RUN, f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=2",
        "callbacks=[default,ema]", "callbacks.ema.decay=0.6",
        "+callbacks.steps._target_=tests.probes.SaveStepWeights", f"+callbacks.steps.to={steps}",
    )  # fmt: skip
    metrics = train(cfg)
    weights = torch.load(steps, weights_only=True)
    assert len(weights) == 10
    average = dict(weights[0])
    for step in weights[1:]:
        average = {k: 0.6 * average[k] + 0.4 * step[k] for k in average}
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    for name, value in average.items():
        if not name.startswith("net."):  # metric states
            continue
        assert torch.allclose(last["state_dict"][name], value, atol=1e-6), name
        assert torch.equal(last["current_model_state"][name], weights[-1][name])
    best = torch.load(metrics["best_checkpoint"], weights_only=True)
    model = ImageClassifier.load_from_checkpoint(metrics["best_checkpoint"], weights_only=True)
    assert all(torch.equal(v, best["state_dict"][k]) for k, v in model.state_dict().items())


def test_the_learning_rate_is_logged_at_the_steps_of_the_training_curves(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    cfg = compose_config(
        *TINY_RUN, f"data.data_dir={tiny_data_dir}", "experiment=tutorial_augmented",
        "trainer.max_epochs=2",
    )  # fmt: skip
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    rates = [event.value for event in events.Scalars("lr-Adam")]
    steps = [event.step for event in events.Scalars("lr-Adam")]
    assert steps == [event.step for event in events.Scalars("train/loss_step")]
    assert max(rates) == pytest.approx(3e-3, rel=0.05) and rates[-1] < 1e-4  # one cycle


def test_early_stopping_ends_the_run_and_metrics_say_at_which_epoch(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """Random images teach nothing: val/acc stops improving, and patience 1 ends the run."""
    cfg = compose_config(
        *TINY_RUN, f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=30",
        "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=1",
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["status"] == "completed"
    stopped = metrics["stopped_early_at_epoch"]
    assert 1 <= stopped < 29 and metrics["epochs"] == stopped + 1
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["stopped_early_at_epoch"] == stopped
    assert "stopped_early_at_epoch" not in train(compose_config(*TINY_RUN,
        f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=2"))  # fmt: skip
