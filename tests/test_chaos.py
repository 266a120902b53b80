"""A search whose two workers are killed again and again, at seeded random moments, and
restarted until it is done: it ends with every trial it asked for, none lost, none doubled,
every interruption recorded, a summary that agrees with the study and checkpoints that load."""

import csv
import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from .test_search import SEARCH, search_command

pytestmark = pytest.mark.slow

SEED = 7
N_TRIALS = 8
DEADLINE_S = 300  # the whole search, kills and restarts included
MOMENTS = ["mid-epoch"] * 3 + ["mid-checkpoint-write"] * 2 + ["between trials"] * 2
CHAOS = [
    "trainer.max_epochs=2", "data.batch_size=10", "logger.tensorboard=null",  # 8 batches
    # Each batch 50 ms longer, each checkpoint 0.3 s between its write and its rename: there
    # is a middle of an epoch and of a checkpoint write to be killed in.
    "+callbacks.slow._target_=tests.probes.SlowBatches", "+callbacks.slow.seconds=0.05",
    "trainer.plugins=[{_target_:tests.probes.SlowCheckpointIO,seconds:0.3}]",
]  # fmt: skip


class Workers:
    """Two search processes; one that ends is started again until the search is done."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.command, self.cwd, self.env = command, cwd, env
        self.processes: list[subprocess.Popen | None] = [None, None]
        self.starts = 0

    def start(self, slot: int) -> None:
        log = (self.cwd / f"worker-{slot}-{self.starts}.log").open("w")
        self.processes[slot] = subprocess.Popen(
            self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.starts += 1

    def alive(self) -> dict[int, int]:
        """{pid: slot} of the running workers."""
        return {p.pid: i for i, p in enumerate(self.processes) if p and p.poll() is None}

    def stop_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def jobs(search: Path) -> dict[int, Path]:
    """{trial number: job folder} of the jobs that have started training."""
    return {
        int(folder.name): folder
        for folder in search.iterdir()
        if folder.name.isdigit() and (folder / "run_info.json").is_file()
    }


def worker_of(folder: Path) -> int | None:
    try:
        return json.loads((folder / "run_info.json").read_text())["pid"]
    except (OSError, ValueError):  # being written
        return None


def status_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "metrics.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def moment_now(search: Path, moment: str, alive: dict[int, int], done: set[int]) -> tuple:
    """(trial number, worker pid) of a job at `moment` now, or (None, None)."""
    for number, folder in sorted(jobs(search).items()):
        pid = worker_of(folder)
        if pid not in alive:
            continue
        status = status_of(folder)
        if moment == "between trials":
            if status == "completed" and number not in done:
                return number, pid  # its result written; the worker goes on to the next trial
        elif status is None and (folder / "checkpoints").is_dir():
            partials = list((folder / "checkpoints").glob(".*.ckpt.*.tmp"))
            if moment == "mid-checkpoint-write" and partials:
                return number, pid
            log = (folder / "train.log").read_text()
            in_second_epoch = "epoch 000 (1/2)" in log and "epoch 001 (2/2)" not in log
            if moment == "mid-epoch" and in_second_epoch and not partials:
                return number, pid
    return None, None


def test_a_search_survives_its_workers_being_killed_again_and_again(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    plan = [(moment, rng.choice([signal.SIGKILL, signal.SIGTERM])) for moment in MOMENTS]
    plan[:2] = [(plan[0][0], signal.SIGKILL), (plan[1][0], signal.SIGTERM)]  # both, at least
    rng.shuffle(plan)
    search = tmp_path / SEARCH
    search.mkdir(parents=True)
    storage = f"sqlite:///{search / 'optuna.db'}"
    # Made here, so that the two first workers do not both create Optuna's tables at once.
    optuna.create_study(study_name="tutorial_cnn", storage=storage, direction="maximize")
    command = search_command(tiny_data_dir, N_TRIALS, *CHAOS)
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    workers = Workers(command, tmp_path, env)
    kills: list[tuple[str, str, int]] = []  # (moment, signal, trial)
    completed_seen: set[int] = set()  # trials whose job completed, "between trials" or not
    started = time.monotonic()
    try:
        for slot in (0, 1):
            workers.start(slot)
        while True:
            assert time.monotonic() - started < DEADLINE_S, f"not done; kills so far: {kills}"
            for slot, process in enumerate(workers.processes):
                if process.poll() is None:
                    continue
                # Killed or stopped: started again, as by a scheduler (and, the search done,
                # it writes the summary again); the last of them while the search is not done.
                if process.returncode != 0 or not (workers.alive() or _done(storage)):
                    workers.start(slot)
            if not workers.alive() and len(kills) == len(plan) and _done(storage):
                break
            if len(kills) < len(plan):
                moment, signum = plan[len(kills)]
                number, pid = moment_now(search, moment, workers.alive(), completed_seen)
                if pid is not None:
                    if moment == "mid-epoch":  # an epoch of 8 batches of 50 ms and more
                        time.sleep(rng.uniform(0, 0.15))
                    slot = workers.alive()[pid]
                    os.kill(pid, signum)
                    kills.append((moment, signum.name, number))
                    workers.processes[slot].wait()
            completed_seen |= {n for n, f in jobs(search).items() if status_of(f) == "completed"}
            time.sleep(0.01)
    finally:
        workers.stop_all()
    elapsed = time.monotonic() - started

    study = optuna.load_study(study_name="tutorial_cnn", storage=storage).trials
    complete = {t.number: t for t in study if t.state == TrialState.COMPLETE}
    interrupted = {t.number for t in study if t.user_attrs.get("interrupted")}
    surplus = {t.number for t in study if t.user_attrs.get("surplus")}
    assert len(complete) == N_TRIALS
    assert all(t.number in complete or t.number in interrupted | surplus for t in study)
    assert not interrupted & surplus

    folders = jobs(search)
    job_folders = {p.name for p in search.iterdir() if p.is_dir()}
    assert all(name.isdigit() for name in job_folders)
    assert {int(name) for name in job_folders} <= {t.number for t in study} - surplus
    for number, folder in folders.items():  # each folder ran its own trial's settings
        trial = next(t for t in study if t.number == number)
        overrides = (folder / ".hydra/overrides.yaml").read_text()
        assert number not in surplus
        assert f"model.optimizer.lr={trial.params['model.optimizer.lr']}" in overrides
    assert set(complete) <= set(folders)
    for number in interrupted & set(folders):  # recorded in the study and in the folder
        assert status_of(folders[number]) in ("interrupted", "stopped"), number
    # A kill mid-training interrupts that trial; one between trials loses no result.
    for moment, _, number in kills:
        assert number in (complete if moment == "between trials" else interrupted), kills
    lost = [n for n in completed_seen if n not in complete]
    assert lost == []

    with (search / "summary.csv").open() as file:
        rows = {int(row["job"]): row for row in csv.DictReader(file)}
    assert set(rows) == set(folders)
    for number, row in rows.items():
        if number in complete:
            assert row["status"] == "completed"
            assert math.isclose(float(row["val/acc_best"]), complete[number].value)
        else:
            assert row["status"] in ("interrupted", "stopped")
    results = yaml.safe_load((search / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(t.value for t in complete.values())

    checkpoints = sorted(search.rglob("*.ckpt"))
    assert len(checkpoints) >= 2 * N_TRIALS
    for checkpoint in checkpoints:
        assert "state_dict" in torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert list(search.rglob(".*.tmp")) == []  # no half-written file left behind

    assert len(kills) >= 6 and {s for _, s, _ in kills} == {"SIGKILL", "SIGTERM"}
    print(
        f"chaos search: {len(kills)} kills survived ({kills}), {len(lost)} trials lost, "
        f"{len(interrupted)} interrupted and {len(surplus)} given back, {workers.starts} "
        f"worker starts, {elapsed:.0f} s"
    )


def _done(storage: str) -> bool:
    study = optuna.load_study(study_name="tutorial_cnn", storage=storage)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= N_TRIALS
