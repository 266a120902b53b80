"""What pruning saves a search: the same Optuna search run twice, one after the other,
without a pruner and with one, each a `train.py -m` process in a folder of its own.

python benchmarks/search_pruning.py --trials 16 --epochs 3                  # median pruner
python benchmarks/search_pruning.py --trials 16 --epochs 3 --pruner hyperband
python benchmarks/search_pruning.py --trials 4 --epochs 1 -- +trainer.limit_train_batches=5

The searches use conf/hparams_search/tutorial_cnn.yaml (its seeded TPE sampler), the data of
CIFAR10_DIR and the cache of CIFAR_CNN_CACHE_DIR; arguments after `--` go to both. The last
line printed is one JSON object: per search the wall time, the trials completed and pruned,
and the best validation accuracy.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

ROOT = Path(__file__).resolve().parents[1]


def run_search(
    folder: Path, trials: int, epochs: int, pruner: str | None, extra: list[str]
) -> dict:
    """Runs one search in `folder`; returns its figures."""
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=tutorial_cnn",
        f"hydra.sweeper.n_trials={trials}", f"trainer.max_epochs={epochs}",
        *([f"hydra/sweeper/pruner={pruner}"] if pruner else []), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, capture_output=True)
    wall_time_s = time.perf_counter() - started
    storage = f"sqlite:///{folder / 'outputs/searches/tutorial_cnn/optuna.db'}"
    study = optuna.load_study(study_name="tutorial_cnn", storage=storage)
    states = [trial.state for trial in study.trials]
    return {
        "pruner": pruner or "none",
        "wall_time_s": round(wall_time_s, 1),
        "complete": states.count(optuna.trial.TrialState.COMPLETE),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "failed": states.count(optuna.trial.TrialState.FAIL),
        "epochs_trained": sum(
            json.loads(
                (folder / f"outputs/searches/tutorial_cnn/{t.number}/metrics.json").read_text()
            )["epochs"]
            for t in study.trials
        ),  # fmt: skip
        "best_val_acc": round(study.best_value, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pruner", default="median", choices=["median", "hyperband"])
    parser.add_argument("extra", nargs="*", help="overrides for both searches, after --")
    args = parser.parse_args()
    results: dict[str, Any] = {"trials": args.trials, "epochs": args.epochs}
    for pruner in (None, args.pruner):
        with tempfile.TemporaryDirectory(prefix="search-") as folder:
            figures = run_search(Path(folder), args.trials, args.epochs, pruner, args.extra)
        print(figures, flush=True)
        results[figures["pruner"]] = figures
    none, pruned = results["none"]["wall_time_s"], results[args.pruner]["wall_time_s"]
    results["wall_time_saved"] = round(1 - pruned / none, 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
