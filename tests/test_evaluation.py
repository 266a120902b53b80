"""eval.py's code path on a really trained (briefly) run, with the real test set."""

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_cnn.data import CLASSES, CIFAR10DataModule
from cifar_cnn.errors import UserError
from cifar_cnn.evaluation import evaluate, plot_errors
from cifar_cnn.training import train

from .conftest import compose_in

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=30",
    "+trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=10",
    "data.split_seed=3",
]


@pytest.fixture(scope="module")
def trained_run(
    data_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """A run folder whose checkpoint was tested on the full test set during training."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_in("train", [*SHORT_RUN, f"data.data_dir={data_dir}"], run_dir, cache_dir)
    return run_dir, train(cfg)


def run_eval(run_dir: Path, data_dir: Path, cache_dir: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_in(
        "eval", [f"ckpt_path={run_dir}", f"data.data_dir={data_dir}", *overrides], out, cache_dir
    )
    return evaluate(cfg)


def test_eval_reproduces_the_training_run_and_writes_its_report(
    trained_run: tuple[Path, dict],
    data_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_dir, trained = trained_run
    with caplog.at_level(logging.INFO, logger="cifar_cnn.evaluation"):
        report = run_eval(run_dir, data_dir, cache_dir, tmp_path)
    assert f"Writing to {tmp_path}" in caplog.text

    assert report["checkpoint"] == trained["best_checkpoint"]
    assert report["accuracy"] == pytest.approx(trained["test/acc"], abs=1e-4)
    assert report["loss"] == pytest.approx(trained["test/loss"], abs=1e-4)
    assert json.loads((tmp_path / "metrics.json").read_text()) == report

    matrix = torch.tensor(report["confusion_matrix"])
    assert matrix.sum(dim=1).tolist() == [1000] * 10  # rows: the true classes of the test set
    assert report["accuracy"] == pytest.approx(matrix.trace().item() / 10_000)
    for label, name in enumerate(CLASSES):
        row = report["per_class"][name]
        hits = matrix[label, label].item()
        assert row["support"] == 1000
        assert row["recall"] == pytest.approx(hits / 1000)
        assert row["accuracy"] == pytest.approx(hits / 1000)
        assert row["precision"] == pytest.approx(hits / max(1, matrix[:, label].sum().item()))
    for metric in ("precision", "recall", "f1", "accuracy"):
        mean = sum(row[metric] for row in report["per_class"].values()) / 10
        assert report["macro"][metric] == pytest.approx(mean)

    for name in ("confusion_matrix", "errors"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG" and min(image.size) > 300
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"test/confusion_matrix", "test/errors"} <= set(events.Tags()["images"])


def test_eval_on_val_uses_the_split_the_checkpoint_was_trained_with(
    trained_run: tuple[Path, dict], data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run_dir, _ = trained_run
    report = run_eval(run_dir, data_dir, cache_dir, tmp_path, "split=val")
    support = [row["support"] for row in report["per_class"].values()]

    def val_counts(split_seed: int) -> list[int]:
        datamodule = CIFAR10DataModule(data_dir, cache_dir, split_seed=split_seed)
        datamodule.prepare_data()
        datamodule.setup()
        return torch.bincount(datamodule.data_val.labels).tolist()

    assert support == val_counts(3) != val_counts(0)


def test_eval_on_val_warns_when_the_data_gives_other_validation_images(
    trained_run: tuple[Path, dict],
    data_dir: Path,
    tiny_data_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_dir, _ = trained_run
    with caplog.at_level(logging.WARNING, logger="cifar_cnn.evaluation"):
        run_eval(run_dir, data_dir, cache_dir, tmp_path / "same", "split=val")
        assert "validation images" not in caplog.text
        run_eval(run_dir, tiny_data_dir, cache_dir, tmp_path / "other", "split=val")
    assert f"the data in {tiny_data_dir} gives other validation images than the run's" in (
        caplog.text
    )


def test_the_errors_figure_shows_the_most_confident_mistakes_first() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4])
    logits = torch.zeros(5, 10)
    logits[0, 5], logits[1, 1], logits[2, 7], logits[3, 9] = 2.0, 9.0, 6.0, 4.0  # 1 is right
    figure = plot_errors(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), labels, logits, count=2)
    titles = [axes.get_title().split("\n")[0] for axes in figure.axes if axes.get_title()]
    assert titles == ["bird → horse", "cat → truck"]  # 6.0, then 4.0; not 2.0 nor the right one


# FastCNN normalises its [0, 1] inputs first: rounding them to bf16 before (Fabric's
# bf16-mixed does, the Trainer's does not) changed eval's metrics.
SMALL_FAST_NET = ["model=fast_cnn", "model.net.widths=[8,16,16]"]


@pytest.mark.parametrize(
    ("precision", "net"),
    [("bf16-mixed", []), ("bf16-mixed", SMALL_FAST_NET)],
    ids=["bf16-mixed", "fast-net-bf16-mixed"],
)
def test_runs_train_and_evaluate_in_their_precision(
    precision: str, net: list[str], tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [
        *SHORT_RUN,
        *net,
        f"trainer.precision={precision}",
        f"data.data_dir={tiny_data_dir}",
    ]
    trained = train(compose_in("train", overrides, run_dir, cache_dir))

    own = run_eval(run_dir, tiny_data_dir, cache_dir, tmp_path / "own")
    assert own["accuracy"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert own["loss"] == pytest.approx(trained["test/loss"], abs=1e-6)
    if precision.startswith("bf16"):
        in_float32 = run_eval(
            run_dir, tiny_data_dir, cache_dir, tmp_path / "fp32", "precision=32-true"
        )
        assert abs(in_float32["loss"] - trained["test/loss"]) > 1e-5  # bf16's rounding shows


def test_eval_leaves_out_the_trainer_device_report(
    trained_run: tuple[Path, dict],
    data_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """eval.py builds a Trainer for its precision plugin; the Trainer's lines about GPUs (and
    its advice to set Trainer(accelerator='gpu')) are not eval.py's to print."""
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_eval(run_dir=trained_run[0], data_dir=data_dir, cache_dir=cache_dir, out=tmp_path)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    messages = [record.getMessage() for record in records] + [str(w.message) for w in caught]
    assert not [message for message in messages if "GPU available" in message], messages


@pytest.mark.parametrize("precision", ["fp8", "bf16-true"])
def test_an_unsupported_eval_precision_is_named(
    precision: str, trained_run: tuple[Path, dict], data_dir: Path, cache_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    run_dir, _ = trained_run
    allowed = "it must be one of 32-true, bf16-mixed, 16-mixed"
    with pytest.raises(UserError, match=f"precision='{precision}' is not allowed: {allowed}"):
        run_eval(run_dir, data_dir, cache_dir, tmp_path, f"precision={precision}")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("device=gpu", "device=gpu is not allowed: use auto, cpu, cuda or cuda:<index>"),
        ("device=xpu:0", "device=xpu:0 is not allowed"),
        ("num_errors=-1", "num_errors=-1 is not allowed"),
        (
            "num_errors=1000",
            r"num_errors=1000 is not allowed: it must be a whole number in \[0, 256\]",
        ),
        ("num_errors=true", "num_errors=True is not allowed"),
        ("data.eval_batch_size=0", "data.eval_batch_size=0 is not allowed"),
    ],
)
def test_bad_eval_settings_are_named_before_anything_loads(
    setting: str, message: str, tmp_path: Path, cache_dir: Path
) -> None:
    cfg = compose_in("eval", [f"ckpt_path={tmp_path / 'nowhere'}", setting], tmp_path, cache_dir)
    with pytest.raises(UserError, match=message):
        evaluate(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_named(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_in("eval", [f"ckpt_path={tmp_path}", "device=cuda"], tmp_path, cache_dir)
    with pytest.raises(UserError, match="device=cuda, but this machine has no GPU"):
        evaluate(cfg)


@pytest.mark.slow  # starts eval.py processes
def test_eval_py_predicts_image_files_and_explains_bad_checkpoints(
    trained_run: tuple[Path, dict], data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run_dir, _ = trained_run
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), "red").save(photos / "red.png")

    def eval_py(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "eval.py"), f"data.data_dir={data_dir}", *overrides]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    result = eval_py(f"ckpt_path={run_dir}", f"predict={photos}", f"hydra.run.dir={tmp_path}/p")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "p" / "predictions.csv").read_text().count("\n") == 2
    (tmp_path / "2024").mkdir()  # a name Hydra reads as a number
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "2024" / "blue.png")
    result = eval_py(f"ckpt_path={run_dir}", "predict=2024", f"hydra.run.dir={tmp_path}/y")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2024/blue.png" in (tmp_path / "y" / "predictions.csv").read_text()

    missing = tmp_path / "nowhere.ckpt"
    result = eval_py(f"ckpt_path={missing}", f"hydra.run.dir={tmp_path}/m")
    assert result.returncode == 1
    assert f"checkpoint {missing} does not exist" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
