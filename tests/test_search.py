"""Optuna searches (conf/hparams_search/): the study lives in the search folder and a rerun of
the same command continues it toward n_trials, whatever stopped it."""

import csv
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hydra_plugins.cifar_cnn_search.resumable_optuna import (
    INTERRUPTED,
    WORKER,
    _mark_interrupted,
    _this_worker,
)

from .test_pruning import ALWAYS_PRUNE

pytestmark = pytest.mark.slow  # every test runs searches of train.py processes

ROOT = Path(__file__).resolve().parents[1]
SEARCH = Path("outputs/searches/tutorial_cnn")


def search_command(data_dir: Path, n_trials: int, *overrides: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=tutorial_cnn",
        f"hydra.sweeper.n_trials={n_trials}", f"data.data_dir={data_dir}",
        "trainer.accelerator=cpu", "trainer.max_epochs=2", *overrides,
    ]  # fmt: skip


def run_search(cwd: Path, cache_dir: Path, command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def trials(cwd: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{cwd / SEARCH / 'optuna.db'}"
    return optuna.load_study(study_name="tutorial_cnn", storage=storage).trials


def job_folders(cwd: Path) -> list[str]:
    return sorted(p.name for p in (cwd / SEARCH).iterdir() if (p / ".hydra").is_dir())


def test_a_rerun_with_more_trials_continues_the_study(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run_search(tmp_path, cache_dir, search_command(tiny_data_dir, 2))
    first_jobs = {job: (tmp_path / SEARCH / job / "metrics.json").read_text() for job in "01"}
    run_search(tmp_path, cache_dir, search_command(tiny_data_dir, 4))

    study = trials(tmp_path)
    assert [(t.number, t.state) for t in study] == [(n, TrialState.COMPLETE) for n in range(4)]
    assert len({tuple(sorted(t.params.items())) for t in study}) == 4  # no repeated suggestion
    assert job_folders(tmp_path) == ["0", "1", "2", "3"]
    for job, metrics in first_jobs.items():  # the first run's jobs are untouched
        assert (tmp_path / SEARCH / job / "metrics.json").read_text() == metrics
    for trial in study:  # job folder N ran trial N's settings
        overrides = (tmp_path / SEARCH / str(trial.number) / ".hydra/overrides.yaml").read_text()
        assert f"model.optimizer.lr={trial.params['model.optimizer.lr']}" in overrides
    summary = (tmp_path / SEARCH / "summary.md").read_text()
    assert "(4 jobs, best val/acc_best first)" in summary
    space = yaml.safe_load((tmp_path / SEARCH / "search.yaml").read_text())["space"]
    assert sorted(space) == sorted(study[0].params)  # the summary's columns, whatever was drawn
    with (tmp_path / SEARCH / "summary.csv").open() as file:
        for row in csv.DictReader(file):
            assert sorted(o.partition("=")[0] for o in row["overrides"].split()) == sorted(space)
    assert (tmp_path / SEARCH / "optimization_results.yaml").is_file()


def test_a_killed_search_finishes_its_trials_when_rerun(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    command = search_command(tiny_data_dir, 3, "trainer.max_epochs=4")
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    search = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / SEARCH / "1" / "tensorboard").exists():  # trial 1 is training
            assert search.poll() is None and time.monotonic() < deadline, "trial 1 never started"
            time.sleep(0.05)
        search.send_signal(signal.SIGKILL)
    finally:
        search.kill()
        search.wait()
    assert [t.state for t in trials(tmp_path)] == [TrialState.COMPLETE, TrialState.RUNNING]

    result = run_search(tmp_path, cache_dir, command)
    assert "Trial 1 was interrupted" in result.stdout + result.stderr
    study = trials(tmp_path)
    assert [t.state for t in study if t.state == TrialState.COMPLETE] == [TrialState.COMPLETE] * 3
    [interrupted] = [t for t in study if t.state == TrialState.FAIL]
    assert interrupted.number == 1 and interrupted.user_attrs["interrupted"]
    assert job_folders(tmp_path) == ["0", "1", "2", "3"]


@pytest.mark.parametrize("shared", [False, True])
def test_running_trials_of_dead_processes_are_freed(shared: bool, tmp_path: Path) -> None:
    """On SQLite, one worker's store, a trial left running on another machine (a search
    continued on another cluster node) is dead too; on a shared server it may be alive."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    here = _this_worker().rpartition(":")[0]
    dead, mine, elsewhere = (study.ask() for _ in range(3))
    dead.set_user_attr(WORKER, f"{here}:{2**22 + 1}")  # above Linux's largest pid
    mine.set_user_attr(WORKER, _this_worker())  # the process asking: a previous run's
    elsewhere.set_user_attr(WORKER, f"node-7:{socket.gethostname()}-boot:{os.getpid()}")
    alive = study.ask()
    alive.set_user_attr(WORKER, f"{here}:{os.getppid()}")

    _mark_interrupted(study, shared, tmp_path, "val/acc_best")

    states = [(t.state, t.user_attrs.get(INTERRUPTED)) for t in study.trials]
    freed = (TrialState.FAIL, True)
    running = (TrialState.RUNNING, None)
    assert states == [freed, freed, running if shared else freed, running]


def test_failed_trials_are_recorded_and_the_search_goes_on(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # A learning rate that makes the loss NaN: every trial fails, none stops the search.
    run_search(tmp_path, cache_dir, search_command(tiny_data_dir, 2, "model.optimizer.lr=1e12"))
    study = trials(tmp_path)
    assert [t.state for t in study] == [TrialState.FAIL, TrialState.FAIL]
    assert not any(t.user_attrs.get("interrupted") for t in study)
    assert (tmp_path / SEARCH / "summary.md").read_text().count("| failed |") == 2


def test_a_search_stopped_by_its_failure_rate_still_writes_its_summary(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    command = search_command(
        tiny_data_dir, 3, "model.optimizer.lr=1e12", "hydra.sweeper.max_failure_rate=0.0"
    )
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    assert "1 of 1 trials failed, more than hydra.sweeper.max_failure_rate=0.0" in output
    assert (tmp_path / SEARCH / "summary.md").read_text().count("| failed |") == 1


def test_a_rerun_with_another_search_space_is_refused(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run_search(tmp_path, cache_dir, search_command(tiny_data_dir, 1))
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    changed = search_command(tiny_data_dir, 2, "trainer.max_epochs=3")
    result = subprocess.run(changed, cwd=tmp_path, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    assert "fixed trainer.max_epochs: 2 before, 3 now" in output
    assert len(trials(tmp_path)) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["experiment=tutorial_augmented"],
            "model.optimizer.lr has no effect: OneCycleLR sets the learning rate itself",
        ),
        (
            ["optimized_metric=test/loss"],
            "optimized_metric=test/loss is to be minimized, but hydra.sweeper.direction="
            "maximize: set hydra.sweeper.direction=minimize",
        ),
    ],
)
def test_a_search_that_cannot_find_what_it_seeks_is_refused_before_any_trial(
    overrides: list[str], message: str, tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    command = search_command(tiny_data_dir, 2, *overrides)
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    assert message in output
    assert not (tmp_path / SEARCH).exists()  # refused before the study or any job


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1 (Debian's package), stopped at the end."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not binaries:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    bin_dir = binaries[-1].parent
    # The server refuses to run as root: as root, run it as Debian's postgres user.
    as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="cifar-cnn-pg-"))
    if as_server:
        shutil.chown(data, "postgres")
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = [*as_server, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-w", "-s"]
    subprocess.run([*as_server, str(bin_dir / "initdb"), "-D", str(data / "db"), "-A", "trust",
                    "-U", "cifar"], check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run([*server, "-o", options, "-l", str(data / "log"), "start"], check=True)
    try:
        yield f"postgresql://cifar@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*server, "-m", "fast", "stop"], check=False)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_study_on_a_database_server(
    postgres_url: str, tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # Made here, so that the two workers do not both create Optuna's tables at once.
    optuna.create_study(study_name="tutorial_cnn", storage=postgres_url, direction="maximize")
    command = search_command(tiny_data_dir, 4, f"hydra.sweeper.storage={postgres_url}")
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    study = optuna.load_study(study_name="tutorial_cnn", storage=postgres_url).trials
    completed = [t for t in study if t.state == TrialState.COMPLETE]
    # Each worker stops once n_trials have finished or are running; of two that ask for the
    # last one at the same moment, one gives its trial back.
    given_back = [t for t in study if t.user_attrs.get("surplus")]
    assert len(completed) == 4 and len(completed) + len(given_back) == len(study)
    assert len({t.user_attrs["worker"] for t in completed}) == 2  # both took trials
    assert job_folders(tmp_path) == sorted(str(t.number) for t in completed)
    assert not (tmp_path / SEARCH / "optuna.db").exists()  # the study is on the server


def test_pruned_trials_end_pruned_and_a_rerun_counts_them_as_done(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    command = search_command(
        tiny_data_dir, 3, "trainer.max_epochs=3", f"+hydra.sweeper.pruner={ALWAYS_PRUNE}"
    )
    run_search(tmp_path, cache_dir, command)
    study = trials(tmp_path)
    assert [t.state for t in study] == [TrialState.PRUNED] * 3
    for trial in study:
        metrics = json.loads((tmp_path / SEARCH / str(trial.number) / "metrics.json").read_text())
        assert (metrics["status"], metrics["pruned_at_epoch"], metrics["epochs"]) == (
            "pruned",
            1,
            2,
        )
        assert trial.intermediate_values[1] == metrics["val/acc_best"]
    summary = (tmp_path / SEARCH / "summary.md").read_text()
    assert summary.count(" | pruned | ") == 3

    result = run_search(tmp_path, cache_dir, command)
    assert "Continuing study tutorial_cnn: 3 of 3 trials done" in result.stdout + result.stderr
    assert job_folders(tmp_path) == ["0", "1", "2"]


def test_a_ddp_trial_is_pruned_in_every_process(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """The first process reports and asks; the other stops with it (or the job would hang)."""
    command = search_command(
        tiny_data_dir, 1, "trainer=ddp_cpu", "data.batch_size=10", "trainer.max_epochs=3",
        f"+hydra.sweeper.pruner={ALWAYS_PRUNE}",
    )  # fmt: skip
    run_search(tmp_path, cache_dir, command)
    [trial] = trials(tmp_path)
    assert trial.state == TrialState.PRUNED and sorted(trial.intermediate_values) == [0, 1]
    metrics = json.loads((tmp_path / SEARCH / "0" / "metrics.json").read_text())
    assert (metrics["status"], metrics["epochs"]) == ("pruned", 2)


def test_a_study_of_optuna_2_is_refused_until_upgraded_then_continues(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """tests/fixtures/optuna-2.10-study.db.gz: a 2-trial search of this project's sweeper on
    optuna 2.10 and SQLAlchemy 1.4, run as this test's command runs it (`data.data_dir`
    relative to the search's folder)."""
    assert tiny_data_dir == tmp_path / "tiny-cifar"
    database = tmp_path / SEARCH / "optuna.db"
    database.parent.mkdir(parents=True)
    with gzip.open(ROOT / "tests/fixtures/optuna-2.10-study.db.gz") as old:
        database.write_bytes(old.read())
    saved = database.read_bytes()
    command = search_command(Path("tiny-cifar"), 3, "trainer.max_epochs=1")
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    upgrade = f"optuna storage upgrade --storage sqlite:///{SEARCH / 'optuna.db'}"
    assert refused.returncode == 1
    assert "was set up by an older Optuna: upgrade it" in refused.stderr + refused.stdout
    assert upgrade in refused.stderr + refused.stdout and "Traceback" not in refused.stderr
    assert database.read_bytes() == saved  # untouched

    optuna_command = Path(sys.executable).parent / "optuna"
    subprocess.run([str(optuna_command), *upgrade.split()[1:]], cwd=tmp_path, check=True)
    run_search(tmp_path, cache_dir, command)
    study = trials(tmp_path)
    assert [t.state for t in study] == [TrialState.COMPLETE] * 3  # the old 2, and one more
    assert job_folders(tmp_path) == ["2"]  # the old trials' folders were not copied along


def test_the_dashboard_serves_a_studys_trials(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="tutorial_cnn", storage=storage, direction="maximize")
    for value in (0.5, 0.7):
        study.tell(study.ask(), value)
    pruned = study.ask()
    pruned.report(0.1, step=0)
    study.tell(pruned, state=TrialState.PRUNED)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    server = subprocess.Popen(
        [str(dashboard), storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", server)["study_summaries"]
        [summary] = [s for s in studies if s["study_name"] == "tutorial_cnn"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", server)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete", "Pruned"]
    assert [t["values"] for t in detail["best_trials"]] == [[0.7]]


def _get_json(url: str, server: subprocess.Popen) -> dict:
    """The JSON at `url`, once the server answers (it takes a moment to start)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "no dashboard"
            time.sleep(0.2)
