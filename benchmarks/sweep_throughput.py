"""Jobs per hour of a grid sweep run a few jobs at a time on one machine: the same sweep under
hydra/launcher=shared_gpu with each number of jobs at once, one sweep after the other.

python benchmarks/sweep_throughput.py --concurrent 1,4,8 -- trainer=gpu          # on a GPU
python benchmarks/sweep_throughput.py --jobs 4 --concurrent 1,2 --epochs 1 -- trainer=cpu

The sweep is the tutorial net over learning rates and seeds (--jobs of them, in that order),
with the data of CIFAR10_DIR and the cache of CIFAR_CNN_CACHE_DIR, prepared before the first
sweep is timed; arguments after `--` go to every job. A sweep's time is the whole `train.py -m`
process, each job's start-up included. The last line printed is one JSON object: per number
of jobs at once, the wall time, jobs completed per hour, the jobs completed, their mean test
accuracy and mean `fit_time_s` (a job's training alone, which jobs side by side slow down);
and, where 1 is among --concurrent, each one's jobs per hour over one job at a time's.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATES = ("3e-3", "1e-3", "3e-4", "1e-4")


def grid(jobs: int) -> list[str]:
    """Sweep overrides giving `jobs` jobs: learning rates by seeds."""
    learning_rates = LEARNING_RATES[: min(jobs, len(LEARNING_RATES))]
    seeds = -(-jobs // len(learning_rates))
    if len(learning_rates) * seeds != jobs:
        raise SystemExit(f"--jobs {jobs}: give 1-4 jobs, or a multiple of 4")
    return [f"model.optimizer.lr={','.join(learning_rates)}",
            f"seed={','.join(str(seed) for seed in range(seeds))}"]  # fmt: skip


def run_sweep(folder: Path, concurrent: int, jobs: int, epochs: int, extra: list[str]) -> dict:
    """Runs the sweep with at most `concurrent` jobs at once in `folder`; its figures."""
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=shared_gpu",
        f"hydra.launcher.max_concurrent_jobs={concurrent}", f"trainer.max_epochs={epochs}",
        "logger.tensorboard=null", *grid(jobs), f"hydra.sweep.dir={folder}", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    # A sweep with a failed job (out of GPU memory with many at once) exits with status 1 after
    # its summary: its completed jobs still count.
    run(command, folder.parent, f"the sweep with {concurrent} at once", allowed=(0, 1))
    wall_time_s = time.perf_counter() - started
    metrics = [json.loads(path.read_text()) for path in folder.glob("*/metrics.json")]
    completed = [m for m in metrics if m["status"] == "completed"]
    if not completed:
        raise SystemExit(f"the sweep with {concurrent} at once completed no job: see {folder}")
    return {
        "max_concurrent_jobs": concurrent,
        "wall_time_s": round(wall_time_s, 1),
        "jobs_per_hour": round(len(completed) * 3600 / wall_time_s, 1),
        "completed": len(completed),
        "mean_test_acc": round(statistics.mean(m["test/acc"] for m in completed), 4),
        "mean_fit_time_s": round(statistics.mean(m["fit_time_s"] for m in completed), 1),
    }


def prepare_data(folder: Path, extra: list[str]) -> None:
    """The decoded-data cache, made once so that no timed sweep pays for it (one batch of each
    stage, on the basic launcher: the launcher's settings are left out)."""
    command = [
        sys.executable, str(ROOT / "train.py"), "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "logger.tensorboard=null",
        f"hydra.run.dir={folder}",
        *(override for override in extra if not override.startswith("hydra.launcher.")),
    ]  # fmt: skip
    run(command, folder.parent, "preparing the data")


def run(command: list[str], folder: Path, what: str, allowed: tuple[int, ...] = (0,)) -> None:
    """Runs `command` in `folder`; an exit status not `allowed` ends the benchmark with the
    command's last output."""
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode not in allowed:
        raise SystemExit(f"{what} failed:\n{(result.stdout + result.stderr)[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--concurrent", default="1,4,8", help="numbers of jobs at once")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("extra", nargs="*", help="overrides for every job, after --")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrent.split(",")]
    results: dict[str, Any] = {"jobs": args.jobs, "epochs": args.epochs, "sweeps": []}
    with tempfile.TemporaryDirectory(prefix="throughput-") as folder:
        prepare_data(Path(folder) / "prepare", args.extra)
        for number, concurrent in enumerate(levels):
            sweep = Path(folder) / f"sweep-{number}"
            figures = run_sweep(sweep, concurrent, args.jobs, args.epochs, args.extra)
            print(figures, flush=True)
            results["sweeps"].append(figures)
    one_at_a_time = next((s for s in results["sweeps"] if s["max_concurrent_jobs"] == 1), None)
    if one_at_a_time:
        results["speedup_over_one_at_a_time"] = {
            str(s["max_concurrent_jobs"]): round(
                s["jobs_per_hour"] / one_at_a_time["jobs_per_hour"], 2
            )
            for s in results["sweeps"]
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
