"""A search's parallel workers: exactly n_trials, and the trials of dead workers ended as
their jobs ended (the whole search under kills: test_chaos.py)."""

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hydra_plugins.cifar_cnn_search.resumable_optuna import (
    INTERRUPTED,
    SURPLUS,
    WORKER,
    _counted,
    _mark_interrupted,
    _this_worker,
    _within_budget,
)


def test_of_two_workers_taking_the_last_trial_the_later_trial_is_given_back(
    tmp_path: Path,
) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.tell(study.ask(), 1.0)
    first, second = study.ask(), study.ask()  # both workers saw 1 of 2 trials done
    assert _within_budget(study, [second], n_trials=2) == []
    assert _within_budget(study, [first], n_trials=2) == [first]
    states = [(t.state, t.user_attrs.get(SURPLUS)) for t in study.trials]
    assert states == [(TrialState.COMPLETE, None), (TrialState.RUNNING, None),
                      (TrialState.FAIL, True)]  # fmt: skip
    assert len(_counted(study)) == 2


def test_a_dead_workers_trial_is_told_its_jobs_result_or_marked_interrupted(
    tmp_path: Path,
) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    dead = f"{_this_worker().rpartition(':')[0]}:{2**22 + 1}"  # above Linux's largest pid
    records = {0: {"status": "completed", "val/acc_best": 0.5}, 1: {"status": "pruned",
               "val/acc_best": 0.1}, 2: None, 3: {"status": "stopped"}}  # fmt: skip
    for number, record in records.items():
        study.ask().set_user_attr(WORKER, dead)
        folder = tmp_path / str(number)
        (folder / ".hydra").mkdir(parents=True)
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / f".last.ckpt.{2**22 + 1}.tmp").write_bytes(b"half")
        if record:
            (folder / "metrics.json").write_text(json.dumps(record))
    study.ask()  # just asked by a live worker, not yet recorded as its: left running

    _mark_interrupted(study, False, tmp_path, "val/acc_best")

    ended = [(t.state, t.value, t.user_attrs.get(INTERRUPTED)) for t in study.trials]
    assert ended == [
        (TrialState.COMPLETE, 0.5, None), (TrialState.PRUNED, None, None),
        (TrialState.FAIL, None, True), (TrialState.FAIL, None, True),
        (TrialState.RUNNING, None, None),
    ]  # fmt: skip
    status = [json.loads((tmp_path / f"{n}/metrics.json").read_text())["status"] for n in records]
    assert status == ["completed", "pruned", "interrupted", "stopped"]
    assert [list((tmp_path / f"{n}/checkpoints").iterdir()) for n in (2, 3)] == [[], []]
