"""The summary of a sweep's jobs."""

import json
from pathlib import Path

import pytest

from cifar_cnn.sweep_summary import write_summary


def fake_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def test_summary_sorts_best_first_and_groups_seeds(tmp_path: Path) -> None:
    for i, (lr, seed, acc) in enumerate(
        [(1e-3, 1, 0.60), (1e-3, 2, 0.64), (3e-4, 1, 0.70), (3e-4, 2, 0.66)]
    ):
        metrics = {"status": "completed", "val/acc_best": acc, "test/acc": acc - 0.01}
        if lr == 3e-4:  # the lr=1e-3 jobs stand for runs from before fit_time_s was recorded
            metrics["fit_time_s"] = 10.0 + 2 * seed
        fake_job(
            tmp_path,
            str(i),
            [f"model.optimizer.lr={lr}", f"seed={seed}", "data.batch_size=64"],
            metrics,
        )
    fake_job(tmp_path, "4", ["model.optimizer.lr=1.0", "seed=1", "data.batch_size=64"], None)
    alone = {"status": "completed", "val/acc_best": 0.5, "test/acc": 0.5}  # one seed: no group
    fake_job(tmp_path, "5", ["model.optimizer.lr=0.1", "seed=1", "data.batch_size=64"], alone)

    rows = write_summary(tmp_path)
    assert [row["job"] for row in rows] == ["2", "3", "1", "0", "5", "4"]
    assert rows[-1]["status"] == "unfinished"
    summary = (tmp_path / "summary.md").read_text()
    assert "Every job: `data.batch_size=64`" in summary
    header = "| overrides | jobs | val/acc_best | test/acc | fit_time_s |\n" + "|" + " --- |" * 5
    assert header in summary
    assert (
        "| model.optimizer.lr=0.0003 | 2 | 0.6800 ± 0.0283 | 0.6700 ± 0.0283 | 13.0 ± 1.4 |"
        in summary
    )
    assert "| model.optimizer.lr=0.001 | 2 | 0.6200 ± 0.0283 | 0.6100 ± 0.0283 |  |" in summary
    assert "| model.optimizer.lr=0.1 |" not in summary


@pytest.mark.parametrize("search", [False, True])
def test_summary_names_the_swept_settings_even_where_the_jobs_agree_on_them(
    search: bool, tmp_path: Path
) -> None:
    """One job of a two-job sweep ran; or a search's two trials drew the same batch size."""
    if search:  # as the search writes it (hparams_search)
        space = {"model.optimizer.lr": "{...}", "data.batch_size": "{...}"}
        record = {"space": space, "fixed": {"trainer.max_epochs": "2"}}
        (tmp_path / "search.yaml").write_text(json.dumps(record))  # JSON is YAML
    else:  # as Hydra writes it, unresolved
        task = ["model.optimizer.lr=1e-3,3e-4", "trainer.max_epochs=2", "tag=${now:%H}"]
        multirun = {"hydra": {"overrides": {"task": task}}}
        (tmp_path / "multirun.yaml").write_text(json.dumps(multirun))
    completed = {"status": "completed", "val/acc_best": 0.5, "test/acc": 0.5}
    jobs = ["0", "1"] if search else ["0"]
    for job in jobs:
        more = ["data.batch_size=64"] if search else ["tag=12"]
        fake_job(tmp_path, job, ["model.optimizer.lr=0.001", "trainer.max_epochs=2", *more],
                 completed)  # fmt: skip

    rows = write_summary(tmp_path)
    swept = "model.optimizer.lr=0.001" + (" data.batch_size=64" if search else "")
    assert [row["overrides"] for row in rows] == [swept] * len(jobs)
    shared = ("" if search else "tag=12 ") + "trainer.max_epochs=2"  # sorted
    assert f"Every job: `{shared}`" in (tmp_path / "summary.md").read_text()


def test_summary_of_a_folder_without_jobs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no job folders"):
        write_summary(tmp_path)
