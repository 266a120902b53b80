"""A search trial's job reports to its trial each epoch and stops cleanly when pruned."""

import json
from collections.abc import Callable
from pathlib import Path

import optuna
from omegaconf import DictConfig

from cifar_cnn.training import train

# Prunes every trial from its second epoch on (no accuracy reaches 1.1).
ALWAYS_PRUNE = "{_target_:optuna.pruners.ThresholdPruner,lower:1.1,n_warmup_steps:1}"


def test_a_pruned_trial_stops_after_its_epoch_and_says_so(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="tutorial_cnn", storage=storage, direction="maximize")
    trial = study.ask()
    cfg = compose_config(
        "hparams_search=tutorial_cnn", f"hydra.sweeper.storage={storage}",
        f"+hydra.sweeper.pruner={ALWAYS_PRUNE}", f"data.data_dir={tiny_data_dir}",
        "data.batch_size=16", "trainer.accelerator=cpu", "trainer.max_epochs=4",
        "logger.tensorboard=null",
        "+callbacks.trial_pruning._target_=cifar_cnn.pruning.TrialPruning",
        f"+callbacks.trial_pruning.trial={trial.number}",
        "+callbacks.trial_pruning.monitor=${optimized_metric}",
    )  # fmt: skip
    metrics = train(cfg)

    assert metrics["status"] == "pruned" and metrics["pruned_at_epoch"] == 1
    assert metrics["epochs"] == 2 and metrics["test/acc"] is not None  # its best was tested
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text()) == metrics
    [reported] = optuna.load_study(study_name="tutorial_cnn", storage=storage).trials
    assert sorted(reported.intermediate_values) == [0, 1]  # val/acc_best after each epoch
    assert reported.intermediate_values[1] == metrics["val/acc_best"]
    assert reported.user_attrs["pruned_at_epoch"] == 1
    assert reported.state == optuna.trial.TrialState.RUNNING  # the sweeper tells its end
