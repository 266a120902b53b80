"""Sweep summaries: one table of every job of a Hydra multirun, written when the sweep ends.

Rebuild it for any sweep folder with `python -m cifar_cnn.sweep_summary outputs/multiruns/<sweep>`.
"""

import csv
import io
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from cifar_cnn.files import FINISHED, read_record, written_then_renamed

log = logging.getLogger(__name__)

METRIC = "val/acc_best"
SEARCH_RECORD = "search.yaml"  # a search's space and fixed overrides (hparams_search)
COLUMNS = ("job", "overrides", "val/acc_best", "test/acc", "epochs", "fit_time_s", "wall_time_s",
           "status", "best_checkpoint")  # fmt: skip


class SweepSummary(Callback):
    """Hydra callback: summary.csv, summary.md and summary.png in the sweep folder.

    With `fail_on_incomplete_jobs`, a sweep in which a job did not complete exits with 1.
    """

    def __init__(self, fail_on_incomplete_jobs: bool = True) -> None:
        self.fail_on_incomplete_jobs = fail_on_incomplete_jobs

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep folder (`hydra.sweep.dir`) holds one sweep: the same command again goes on
        with it (its completed jobs keep their metrics, the others continue from their last
        checkpoints); another sweep there would mix its jobs with the first's, and Hydra
        would rewrite their records."""
        earlier = Path(config.hydra.sweep.dir) / "multirun.yaml"
        if not earlier.is_file():
            return
        before = set(OmegaConf.load(earlier).hydra.overrides.task)
        now = set(config.hydra.overrides.task)
        if before != now:
            log.error(
                "%s holds another sweep (there: %s; here: %s): sweep into a new folder, or "
                "give that sweep's overrides to go on with it",
                earlier.parent, " ".join(sorted(before - now)) or "-",
                " ".join(sorted(now - before)) or "-",
            )  # fmt: skip
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_summary(Path(config.hydra.sweep.dir))
        failed = [row["job"] for row in rows if row["status"] not in FINISHED]
        if failed:
            log.error(
                "%d of %d jobs did not complete: %s", len(failed), len(rows), ", ".join(failed)
            )
            if self.fail_on_incomplete_jobs:  # every job ran; the exit status says some failed
                sys.exit(1)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Reads every job folder of `sweep_dir`; writes and returns the rows, best first."""
    jobs = sorted(
        (path for path in sweep_dir.iterdir() if (path / ".hydra" / "overrides.yaml").is_file()),
        key=lambda path: (len(path.name), path.name),
    )
    if not jobs:
        raise FileNotFoundError(f"no job folders (with .hydra/overrides.yaml) in {sweep_dir}")
    overrides = {
        job.name: yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) for job in jobs
    }
    swept_keys = _swept_keys(sweep_dir)
    shared = set.intersection(
        *(
            {value for value in values if _key(value) not in swept_keys}
            for values in overrides.values()
        )
    )
    rows = []
    for job in jobs:
        metrics = _job_metrics(job / "metrics.json")
        swept = [value for value in overrides[job.name] if value not in shared]
        rows.append(
            {column: metrics.get(column, "") for column in COLUMNS}
            | {
                "job": job.name,
                "overrides": " ".join(swept),
                "status": metrics.get("status", "unfinished"),
            }  # fmt: skip
        )
    rows.sort(key=lambda row: (row["status"] != "completed", -_number(row[METRIC])))

    # Written then renamed: a search's parallel workers each write the summary as they end.
    with written_then_renamed(sweep_dir / "summary.csv") as partial:
        partial.write_text(_csv(rows))
    with written_then_renamed(sweep_dir / "summary.md") as partial:
        partial.write_text(_markdown(rows, sorted(shared), sweep_dir.resolve()))
    with written_then_renamed(sweep_dir / "summary.png") as partial:
        _plot(rows, overrides).savefig(partial, dpi=100, format="png")
    log.info("Sweep summary: %s", sweep_dir / "summary.md")
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _swept_keys(sweep_dir: Path) -> set[str]:
    """The keys the sweep varies: a sweep's (multirun.yaml: its command's `lr=1e-3,3e-4`,
    `choice(...)`, ..., and `hydra.sweeper.params`) or a search's space (search.yaml). Not the
    keys whose values differ between the jobs that ran: one job, or a search's trials that drew
    the same value, vary a key too. Neither file: none, and the overrides that every job has
    count as shared."""
    hydra = _yaml_mapping(sweep_dir / "multirun.yaml").get("hydra") or {}
    task = (hydra.get("overrides") or {}).get("task") or []
    try:
        parsed = OverridesParser.create().parse_overrides(task)
    except OverrideParseException:
        parsed = []
    keys = {override.get_key_element() for override in parsed if override.is_sweep_override()}
    keys |= set((hydra.get("sweeper") or {}).get("params") or {})
    return keys | set(_yaml_mapping(sweep_dir / SEARCH_RECORD).get("space") or {})


def _yaml_mapping(path: Path) -> dict[str, Any]:
    """The file's YAML, read as is (not resolved: `${now:...}` needs Hydra); {} if none."""
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def _key(override: str) -> str:
    return override.partition("=")[0]


def _job_metrics(path: Path) -> dict[str, Any]:
    record = read_record(path)
    if record is None:
        return {"status": "unreadable metrics.json"} if path.is_file() else {}
    return record


def _markdown(rows: list[dict[str, Any]], shared: list[str], sweep_dir: Path) -> str:
    lines = [f"# Sweep summary ({len(rows)} jobs, best {METRIC} first)", ""]
    if shared:
        lines += ["Every job: `" + " ".join(shared) + "`", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += [
        "| " + " | ".join(_cell(column, row[column], sweep_dir) for column in COLUMNS) + " |"
        for row in rows
    ]
    groups = _seed_groups(rows)
    if groups:
        columns = (METRIC, "test/acc", "fit_time_s")
        lines += ["", "## Over seeds (mean ± std)", ""]
        lines += ["| overrides | jobs | " + " | ".join(columns) + " |"]
        lines += ["|" + " --- |" * (2 + len(columns))]
        for key, members in groups.items():
            cells = [_mean_std(column, [row[column] for row in members]) for column in columns]
            lines.append(f"| {key or '(defaults)'} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seed_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Completed jobs that differ only in `seed=`, grouped by their other overrides."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "completed" and "seed=" in row["overrides"]:
            key = " ".join(o for o in row["overrides"].split() if not o.startswith("seed="))
            groups.setdefault(key, []).append(row)
    return {key: members for key, members in groups.items() if len(members) > 1}


def _plot(rows: list[dict[str, Any]], overrides: dict[str, list[str]]) -> Figure:
    """The metric against each swept hyperparameter, one panel each."""
    swept = sorted({o.split("=")[0] for row in rows for o in row["overrides"].split()})
    figure = Figure(figsize=(4 * max(1, len(swept)), 3.5), layout="constrained")
    for axes, key in zip(
        figure.subplots(1, max(1, len(swept)), squeeze=False)[0], swept or [""], strict=True
    ):
        points = [
            (value, _number(row[METRIC]))
            for row in rows
            for value in (_value_of(key, overrides[row["job"]]),)
            if value is not None and row["status"] == "completed"
        ]
        numeric = all(isinstance(value, float) for value, _ in points)
        if numeric and points and min(v for v, _ in points) > 0 and "lr" in key:
            axes.set_xscale("log")
        axes.scatter([str(v) if not numeric else v for v, _ in points], [m for _, m in points])
        axes.set_xlabel(key or "job")
        axes.set_ylabel(METRIC)
    return figure


def _value_of(key: str, overrides: list[str]) -> float | str | None:
    for override in overrides:
        name, _, value = override.partition("=")
        if name == key:
            try:
                return float(value)
            except ValueError:
                return value
    return None


def _number(value: Any) -> float:
    return value if isinstance(value, int | float) and not math.isnan(value) else -math.inf


def _mean_std(column: str, values: list[Any]) -> str:
    """Mean ± std, as `_cell` writes the column; empty where a job lacks it."""
    if not all(isinstance(value, int | float) for value in values):
        return ""
    decimals = _decimals(column)
    return f"{statistics.mean(values):.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def _decimals(column: str) -> int:
    """Seconds to 1 decimal, metrics to 4."""
    return 1 if column.endswith("_time_s") else 4


def _cell(column: str, value: Any, sweep_dir: Path) -> str:
    """Metrics to 4 decimals, seconds to 1, checkpoints relative to the sweep folder."""
    if column == "best_checkpoint" and value and Path(value).is_relative_to(sweep_dir):
        return str(Path(value).relative_to(sweep_dir))
    if isinstance(value, float):
        return f"{value:.{_decimals(column)}f}"
    return "" if value is None else str(value)  # None: a run without validation, say


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cifar_cnn.sweep_summary <sweep folder>")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_summary(Path(sys.argv[1]))
