"""Whole training runs: what a run folder holds, reproducibility, train.py's messages."""

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.module import ImageClassifier
from cifar_cnn.runtime import NVML_CHECK
from cifar_cnn.training import train

ROOT = Path(__file__).resolve().parents[1]


METRICS = ("val/acc_best", "test/acc", "test/loss")


FEW_BATCHES = (
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=5",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
)


def run_train_py(*overrides: str, cache_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_smoke_run_writes_checkpoints_events_and_metrics(
    compose_config: Callable[..., DictConfig], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_config(*FEW_BATCHES, f"data.data_dir={data_dir}")
    monkeypatch.setenv(NVML_CHECK, "1")  # as importing Lightning sets it
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    assert os.environ[NVML_CHECK] == ("1" if torch.cuda.device_count() else "0")

    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    info = json.loads((run_dir / "run_info.json").read_text())
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert info["git"]["commit"] == head.stdout.strip() and isinstance(info["git"]["dirty"], bool)
    assert info["seed"] == 42 and info["packages"]["torch"] == torch.__version__.split("+")[0]
    assert set(METRICS) <= metrics.keys() and metrics["epochs"] == 2
    assert 0 < metrics["fit_time_s"] <= metrics["wall_time_s"]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and Path(metrics["best_checkpoint"]).name in checkpoints

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    curves = {"train/loss_step", "train/loss_epoch", "train/acc_step", "train/acc_epoch"}
    curves |= {"val/loss", "val/acc", "val/acc_best", "test/acc", "test/loss"}
    assert curves <= set(events.Tags()["scalars"])
    assert [point.step for point in events.Scalars("val/acc")] == [4, 9]  # 5 steps an epoch
    assert events.Scalars("val/acc_best")[-1].value == pytest.approx(metrics["val/acc_best"])
    # HPARAMS: the run's settings, and its final metrics as one point each.
    session = HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert session.hparams["model/optimizer/lr"].number_value == pytest.approx(1e-3)
    assert session.hparams["data/batch_size"].number_value == 64
    [final] = events.Scalars("hp/test_acc")
    assert final.value == pytest.approx(metrics["test/acc"])


def test_last_ckpt_is_the_latest_epoch_when_an_earlier_one_was_best(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """Lightning 2.6 writes ModelCheckpoint's save_last copy only when a best checkpoint is
    written; a run resumed from that would go back to its best epoch."""
    cfg = compose_config(
        f"data.data_dir={tiny_data_dir}", "data.batch_size=16", "trainer.accelerator=cpu",
        "trainer.max_epochs=3", "logger.tensorboard=null",
        "model.optimizer.lr=1e-12",  # the weights barely move: no epoch beats the first
    )  # fmt: skip
    metrics = train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert metrics["best_checkpoint"] == str(checkpoints / "epoch_000.ckpt")
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 15)  # 5 steps an epoch


def test_a_run_without_validation_records_no_best_and_valid_json(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    cfg = compose_config(
        f"data.data_dir={tiny_data_dir}", "data.batch_size=16", "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "+trainer.limit_val_batches=0",
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["val/acc_best"] is None and metrics["best_checkpoint"] == ""
    text = (Path(cfg.paths.output_dir) / "metrics.json").read_text()

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse) == metrics  # no -Infinity, no NaN
    assert 0 <= metrics["test/acc"] <= 1


def test_best_checkpoint_reproduces_the_reported_test_accuracy(
    compose_config: Callable[..., DictConfig], data_dir: Path, cache_dir: Path
) -> None:
    cfg = compose_config(*FEW_BATCHES, f"data.data_dir={data_dir}")
    metrics = train(cfg)
    model = ImageClassifier.load_from_checkpoint(
        metrics["best_checkpoint"], map_location="cpu", weights_only=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        precision=cfg.trainer.precision,  # the run's
        limit_test_batches=2,
        logger=False,
        enable_progress_bar=False,
    )
    [retested] = trainer.test(model, CIFAR10DataModule(data_dir, cache_dir), verbose=False)
    assert retested["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_same_seed_same_metrics(compose_config: Callable[..., DictConfig], data_dir: Path) -> None:
    first = train(compose_config(*FEW_BATCHES, f"data.data_dir={data_dir}"))
    second = train(compose_config(*FEW_BATCHES, f"data.data_dir={data_dir}"))
    assert {k: first[k] for k in METRICS} == {k: second[k] for k in METRICS}


def test_both_data_paths_train_to_the_same_weights(
    compose_config: Callable[..., DictConfig], data_dir: Path
) -> None:
    """The same batches, and the same random draws for augmentation and dropout."""
    common = (*FEW_BATCHES, f"data.data_dir={data_dir}", "data.flip=true")
    runs = [compose_config(*common, f"data.on_device={flag}") for flag in ("false", "true")]
    results = [train(cfg) for cfg in runs]
    assert {k: results[0][k] for k in METRICS} == {k: results[1][k] for k in METRICS}
    first, second = (
        torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["state_dict"]
        for cfg in runs
    )
    assert all(torch.equal(value, second[key]) for key, value in first.items())


@pytest.mark.slow  # starts train.py processes
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_train_py_runs_quietly_and_saves_its_config(
    precision: str, data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Quiet in both defaults: bf16-mixed made Lightning's model summary warn before."""
    run_dir = tmp_path / "run"
    result = run_train_py(
        *FEW_BATCHES, f"data.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
        f"trainer.precision={precision}", cache_dir=cache_dir, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower() and "Traceback" not in output
    assert not re.search(r"\.py:\d+: ", output)  # Lightning prints warnings as file:line: text
    assert f"precision: {precision}" in (run_dir / "train.log").read_text()
    # Not a terminal: no progress bars, one line per epoch, in train.log too.
    assert "it/s" not in output
    for epoch in ("epoch 000 (1/2)  train/loss_epoch", "epoch 001 (2/2)  train/loss_epoch"):
        assert output.count(epoch) == 1
        assert epoch in (run_dir / "train.log").read_text()
    assert "Test accuracy" in output and f"Run folder {run_dir}" in output
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.slow  # starts train.py processes
def test_fast_dev_run_saves_no_checkpoints_or_logs(
    data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_train_py(
        "debug=fast_dev_run", f"data.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
        cache_dir=cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "tensorboard").exists()


@pytest.mark.slow  # starts train.py processes
def test_train_py_without_data_says_what_to_do(cache_dir: Path, tmp_path: Path) -> None:
    result = run_train_py(
        f"data.data_dir={tmp_path / 'no-data'}", "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}", cache_dir=cache_dir, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"no CIFAR-10 data in {tmp_path / 'no-data'}" in output and "CIFAR10_DIR" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_one_epoch_on_the_full_data_learns(
    compose_config: Callable[..., DictConfig], data_dir: Path
) -> None:
    metrics = train(compose_config("trainer.max_epochs=1", f"data.data_dir={data_dir}"))
    assert metrics["test/acc"] >= 0.45


@pytest.mark.slow  # starts train.py processes
def test_runs_started_together_get_their_own_folders(
    data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    command = [
        sys.executable, str(ROOT / "train.py"), *FEW_BATCHES, "trainer.max_epochs=1",
        f"data.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'outputs'}",
    ]  # fmt: skip
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    folders = sorted((tmp_path / "outputs" / "runs").iterdir())
    # <date>_<time>_<pid>: apart even when both start in the same second
    assert sorted(int(folder.name.rsplit("_", 1)[1]) for folder in folders) == sorted(
        run.pid for run in runs
    )
    assert all(len(list(folder.glob("checkpoints/*.ckpt"))) == 2 for folder in folders)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=resnet9000", "Could not find 'model/resnet9000'"),
        ("data.batch_sise=32", "Key 'batch_sise' is not in struct"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed"),
    ],
)
@pytest.mark.slow  # starts train.py processes
def test_bad_settings_on_the_command_line_are_named(
    override: str, expected: str, cache_dir: Path, tmp_path: Path
) -> None:
    result = run_train_py(
        override, f"hydra.run.dir={tmp_path / 'run'}", cache_dir=cache_dir, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert expected in output and "Traceback" not in output


def test_an_epoch_without_validation_shows_no_validation_metrics(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    cfg = compose_config(
        f"data.data_dir={tiny_data_dir}", "data.batch_size=16", "trainer.accelerator=cpu",
        "trainer.max_epochs=3", "+trainer.check_val_every_n_epoch=2", "logger.tensorboard=null",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="cifar_cnn.callbacks"):
        train(cfg)
    lines = {line[:9]: line for line in caplog.messages if line.startswith("epoch 00")}
    assert "val/acc" not in lines["epoch 000"] and "val/acc" in lines["epoch 001"]
    assert "val/acc" not in lines["epoch 002"]  # not epoch 001's metrics again


@pytest.mark.slow  # starts train.py; ResNet-18 steps take seconds on a CPU
def test_the_resnet18_recipe_runs_end_to_end_on_a_short_cpu_schedule(
    data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """experiment=resnet18 with the short schedule its docs give: three steps, one (small)
    batch of validation and test, quietly; the learning-rate curve and the average are in the
    run."""
    run_dir = tmp_path / "run"
    result = run_train_py(
        "experiment=resnet18", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "data.eval_batch_size=32",
        f"data.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}", cache_dir=cache_dir, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower() and "Traceback" not in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    assert "current_model_state" in checkpoint  # the EMA's
    assert set(checkpoint["datamodule_hyper_parameters"]["augment"]) == {"trivialaugment", "cutout"}
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("lr-SGD")) == 3
