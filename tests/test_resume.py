"""Resuming killed runs: same folder, same settings, and exactly the same result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from cifar_cnn.callbacks import StoppedBySignal
from cifar_cnn.checkpoints import read_checkpoint
from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.errors import UserError
from cifar_cnn.module import ImageClassifier
from cifar_cnn.training import _check_same_settings, train

from .conftest import compose_in

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "trainer.accelerator=cpu", "trainer.max_epochs=3", "+trainer.limit_train_batches=30",
    "+trainer.limit_val_batches=2", "trainer.log_every_n_steps=5", "model.optimizer.lr=3e-4",
]  # fmt: skip


def train_py(*args: str, cache_dir: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


class InterruptAtStep(L.Callback):
    """Sends this process SIGINT (Ctrl-C) once training reaches `step`, at the batch `batch` of
    the epoch if given (the batches of an accumulation window share a step)."""

    def __init__(self, step: int, batch: int | None = None) -> None:
        self.step = step
        self.batch = batch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if trainer.global_step == self.step and self.batch in (None, batch_idx):
            self.step = None  # once
            signal.raise_signal(signal.SIGINT)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def figures_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_a_killed_run_resumes_in_its_folder_to_exactly_the_same_result(
    data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    data = f"data.data_dir={data_dir}"
    full = train_py(
        *SHORT, data, f"paths.log_dir={tmp_path / 'full'}", cache_dir=cache_dir, cwd=tmp_path
    )
    assert finish(full)[0] == 0
    [full_run] = (tmp_path / "full" / "runs").iterdir()

    cut = train_py(
        *SHORT, data, f"paths.log_dir={tmp_path / 'cut'}", cache_dir=cache_dir, cwd=tmp_path
    )
    for line in cut.stdout:
        if "epoch 001 (2/3)" in line:
            break
    [run] = (tmp_path / "cut" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 60
    while torch.load(last, weights_only=True)["epoch"] != 1:  # saved just after that line
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)  # during the third epoch
    assert finish(cut)[0] == -signal.SIGKILL

    code, output = finish(
        train_py(*SHORT, data, f"ckpt_path={run}", cache_dir=cache_dir, cwd=tmp_path)
    )
    assert code == 0, output
    assert "epoch 002 (3/3)" in output and "epoch 000" not in output
    assert "is not empty" not in output  # Lightning's warning: the folder's own checkpoints
    assert [p.name for p in (tmp_path / "cut" / "runs").iterdir()] == [run.name]  # no new folder

    expected, resumed = weights(full_run), weights(run)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    figures = ("val/acc_best", "test/acc", "test/loss", "epochs")
    assert [figures_of(run)[k] for k in figures] == [figures_of(full_run)[k] for k in figures]
    assert (run / ".hydra" / "overrides.yaml").read_text().count("ckpt_path") == 0
    assert len(list((run / ".hydra").glob("resumed_*/overrides.yaml"))) == 1


SIGNALLED = [
    "data.batch_size=16", "trainer.accelerator=cpu", "trainer.max_epochs=2",
    "logger.tensorboard=null",
]  # 5 steps an epoch  # fmt: skip


def assert_resumed_as_uninterrupted(
    cut: dict, uninterrupted: dict, cut_run: Path, full_run: Path, records: Path
) -> None:
    """The stopped and resumed run ends as the uninterrupted one: the same record (`records`
    holds both runs' files, "cut" and "full"), figures and weights."""
    assert (records / "cut").read_text() == (records / "full").read_text()
    figures = ("val/acc_best", "test/acc", "test/loss")
    assert [cut[key] for key in figures] == [uninterrupted[key] for key in figures]
    expected, got = weights(full_run), weights(cut_run)
    assert all(torch.equal(value, got[key]) for key, value in expected.items())


def stop_after(compose_config: Callable[..., DictConfig], step: int, *overrides: str) -> DictConfig:
    """The SIGNALLED run (5 steps an epoch), Ctrl-C'd at `step`: GracefulStop, which runs
    after the other callbacks, sees it at the same batch."""
    return compose_config(
        *SIGNALLED, *overrides, f"+callbacks.interrupt._target_={__name__}.InterruptAtStep",
        f"+callbacks.interrupt.step={step}",
    )  # fmt: skip


class RecordTraining(L.Callback):
    """Appends each step's number and batch labels, and each epoch's training figures, to the
    file `to`."""

    def __init__(self, to: str) -> None:
        self.to = Path(to)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._write(f"{trainer.global_step} {batch[1].tolist()}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self._write(f"{metrics['train/loss_epoch'].item()} {metrics['train/acc_epoch'].item()}")

    def _write(self, line: str) -> None:
        with self.to.open("a") as record:
            record.write(line + "\n")


@pytest.mark.parametrize(
    "data", ["data=cifar10", "data=cifar10_gpu", "experiment=seed_augmented"]
)  # with a schedule, the data module's loader is set up before the checkpoint is loaded
def test_a_run_resumed_mid_epoch_ends_as_an_uninterrupted_one(
    data: str, compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The epoch goes on with its next batch, the same random flips and the same figures."""
    run = [data, f"data.data_dir={tiny_data_dir}", "data.flip=true"]
    record = f"+callbacks.record._target_={__name__}.RecordTraining"
    cut_record = f"+callbacks.record.to={tmp_path / 'cut'}"
    stopped = stop_after(compose_config, 7, *run, record, cut_record)
    with pytest.raises(StoppedBySignal, match="at step 7 \\(epoch 1\\)"):
        train(stopped)
    folder = Path(stopped.paths.output_dir)
    resumed = [*SIGNALLED, *run, record, cut_record]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="You're resuming from a checkpoint that ended")
        cut = train(compose_in("train", [*resumed, f"ckpt_path={folder}"], folder, cache_dir))
    full = compose_config(*SIGNALLED, *run, record, f"+callbacks.record.to={tmp_path / 'full'}")
    uninterrupted = train(full)
    assert_resumed_as_uninterrupted(cut, uninterrupted, folder, Path(full.paths.output_dir),
                                    tmp_path)  # fmt: skip


class RecordValidations(L.Callback):
    """Appends the step of each validation (not the sanity check) to the file `to`."""

    def __init__(self, to: str) -> None:
        self.to = Path(to)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            with self.to.open("a") as record:
                record.write(f"{trainer.global_step}\n")


@pytest.mark.parametrize(
    "signal_at",
    [
        ["+trainer.accumulate_grad_batches=2", "+callbacks.interrupt.step=4",
         "+callbacks.interrupt.batch=2"],
        ["+trainer.val_check_interval=0.4", "+callbacks.interrupt.step=7"],
    ],
)  # fmt: skip
def test_a_signal_in_an_accumulation_window_or_before_a_validation_resumes_exactly(
    signal_at: list[str], compose_config: Callable[..., DictConfig], tiny_data_dir: Path,
    cache_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """The stop waits for the window's step (checkpoints keep no gradients), or for the batch
    after a mid-epoch validation (Lightning skips it on resume). 5 batches an epoch; the
    signal comes in epoch 1, in the middle of a window (steps 3, 4, 4, 5, 6), or at a batch
    that a validation follows (val_check_batch 2: after its 2nd and 4th batches)."""
    setting, *interrupt = signal_at
    run = [f"data.data_dir={tiny_data_dir}", setting]
    record = f"+callbacks.record._target_={__name__}.RecordValidations"
    cut_record = f"+callbacks.record.to={tmp_path / 'cut'}"
    stopped = compose_config(
        *SIGNALLED, *run, f"+callbacks.interrupt._target_={__name__}.InterruptAtStep",
        *interrupt, record, cut_record,
    )  # fmt: skip
    with pytest.raises(StoppedBySignal):
        train(stopped)
    folder = Path(stopped.paths.output_dir)
    resumed = [*SIGNALLED, *run, record, cut_record]
    cut = train(compose_in("train", [*resumed, f"ckpt_path={folder}"], folder, cache_dir))
    full = compose_config(*SIGNALLED, *run, record, f"+callbacks.record.to={tmp_path / 'full'}")
    uninterrupted = train(full)
    assert_resumed_as_uninterrupted(cut, uninterrupted, folder, Path(full.paths.output_dir),
                                    tmp_path)  # fmt: skip


class ZeroWeightsFrom(L.Callback):
    """Zeroes the net's weights as epoch `epoch` starts: its dead ReLUs learn nothing after,
    and it predicts one class, so that an earlier epoch stays the best."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for parameter in pl_module.net.parameters():
                    parameter.zero_()


def test_the_best_epoch_is_tested_and_stays_the_best_across_a_resume(
    compose_config: Callable[..., DictConfig], data_dir: Path, cache_dir: Path
) -> None:
    run = [
        f"data.data_dir={data_dir}", "trainer.accelerator=cpu", "trainer.max_epochs=2",
        "+trainer.limit_train_batches=30", "+trainer.limit_val_batches=4",
        "logger.tensorboard=null", f"+callbacks.zero._target_={__name__}.ZeroWeightsFrom",
        "+callbacks.zero.epoch=1",
    ]  # fmt: skip
    cfg = compose_config(*run)
    first = train(cfg)
    folder = Path(cfg.paths.output_dir)
    checkpoints = folder / "checkpoints"
    assert first["best_checkpoint"] == str(checkpoints / "epoch_000.ckpt")

    def test_accuracy(checkpoint: Path) -> float:
        model = ImageClassifier.load_from_checkpoint(checkpoint, weights_only=True)
        tester = L.Trainer(
            accelerator="cpu",
            precision=cfg.trainer.precision,  # the run's: its test figures to the last digit
            logger=False,
            enable_progress_bar=False,
        )
        [figures] = tester.test(model, CIFAR10DataModule(data_dir, cache_dir), verbose=False)
        return figures["test/acc"]

    best = test_accuracy(checkpoints / "epoch_000.ckpt")
    assert first["test/acc"] == pytest.approx(best, abs=1e-6)
    assert best > test_accuracy(checkpoints / "last.ckpt") + 0.05  # the last weights are worse

    longer = [*run, "trainer.max_epochs=3", f"ckpt_path={folder}"]
    resumed = train(compose_in("train", longer, folder, cache_dir))
    assert resumed["epochs"] == 3
    for figure in ("val/acc_best", "best_checkpoint", "test/acc"):
        assert resumed[figure] == first[figure]


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_a_resumed_run_without_validation_keeps_its_best(
    precision: str, compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path
) -> None:
    """bf16-true converts the module after Lightning restored the best: not rounded by it.
    (seed=2: the first epoch's best is 0.05, which bf16 rounds to 0.050048828125.)"""
    run = [
        *SIGNALLED, f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=1",
        f"trainer.precision={precision}", "seed=2",
    ]  # fmt: skip
    cfg = compose_config(*run)
    first = train(cfg)
    folder = Path(cfg.paths.output_dir)
    on = [*run, "trainer.max_epochs=2", "+trainer.check_val_every_n_epoch=5", f"ckpt_path={folder}"]
    resumed = train(compose_in("train", on, folder, cache_dir))
    assert resumed["epochs"] == 2 and first["val/acc_best"] is not None
    assert resumed["val/acc_best"] == first["val/acc_best"]


@pytest.mark.parametrize("on_resume", [[], ["trainer.precision=bf16-mixed"]])
def test_a_resumed_run_keeps_the_precision_it_trained_in_unless_told_otherwise(
    on_resume: list[str],
    monkeypatch: pytest.MonkeyPatch,
    compose_config: Callable[..., DictConfig],
    tiny_data_dir: Path,
    cache_dir: Path,
) -> None:
    """The default precision depends on the machine: a run moved to one with bf16 instructions
    goes on in float32, as it started."""
    run = [*SIGNALLED, f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=1"]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = compose_config(*run)
    train(cfg)
    folder = Path(cfg.paths.output_dir)
    last = folder / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["precision"] == "32-true"

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # another CPU
    on = [*run, "trainer.max_epochs=2", f"ckpt_path={folder}", *on_resume]
    assert train(compose_in("train", on, folder, cache_dir))["epochs"] == 2
    assert read_checkpoint(last)["precision"] == ("bf16-mixed" if on_resume else "32-true")


def test_a_signal_in_an_epochs_last_batch_stops_after_its_validation_and_resumes_exactly(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path
) -> None:
    """Saved at the last batch, Lightning would count the epoch as done and skip its
    validation on resume; GracefulStop lets the epoch end first."""
    data = f"data.data_dir={tiny_data_dir}"
    stopped = stop_after(compose_config, 5, data)
    with pytest.raises(StoppedBySignal, match="at the end of epoch 0 \\(step 5\\); saved "):
        train(stopped)
    run = Path(stopped.paths.output_dir)
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"epoch_000.ckpt", "last.ckpt"}

    # In the run's own folder, as train.py resumes: ModelCheckpoint keeps its best there.
    resumed = train(compose_in("train", [*SIGNALLED, data, f"ckpt_path={run}"], run, cache_dir))
    full = compose_config(*SIGNALLED, data)
    uninterrupted = train(full)
    figures = ("status", "epochs", "val/acc_best", "test/acc", "test/loss")
    assert [resumed[key] for key in figures] == [uninterrupted[key] for key in figures]
    expected, got = weights(Path(full.paths.output_dir)), weights(run)
    assert expected.keys() == got.keys()
    assert all(torch.equal(value, got[key]) for key, value in expected.items())


def test_short_of_min_epochs_a_signal_stops_at_the_first_epoch_end_that_may_stop(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """Lightning ignores should_stop before min_epochs (with longer epochs, the next batch
    that is not an epoch's last stops)."""
    # One step an epoch; this max_epochs comes after SIGNALLED's, and the later one counts.
    stopped = stop_after(
        compose_config, 1, f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=5",
        "+trainer.min_epochs=3", "+trainer.limit_train_batches=1",
    )  # fmt: skip
    with pytest.raises(StoppedBySignal, match="at the end of epoch 2 \\(step 3\\); saved "):
        train(stopped)
    last = torch.load(Path(stopped.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3


def test_a_signal_in_the_last_batch_ends_training_with_complete_checkpoints(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    stopped = stop_after(compose_config, 10, f"data.data_dir={tiny_data_dir}")
    with pytest.raises(StoppedBySignal, match="at the end of training; its checkpoints are "):
        train(stopped)
    last = torch.load(Path(stopped.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 10)


def test_a_moved_run_folder_resumes_with_its_best_checkpoint(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # No epoch beats the first; the max_epochs below come after SIGNALLED's and count.
    overrides = [*SIGNALLED, f"data.data_dir={tiny_data_dir}", "model.optimizer.lr=1e-12"]
    first = compose_config(*overrides, "trainer.max_epochs=1")
    train(first)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(first.paths.output_dir, moved)

    resumed = [*overrides, "trainer.max_epochs=3", f"ckpt_path={moved}"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The dirpath has changed")
        metrics = train(compose_in("train", resumed, moved, cache_dir))
    checkpoints = moved / "checkpoints"
    assert metrics["best_checkpoint"] == str(checkpoints / "epoch_000.ckpt")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]


def test_resuming_on_data_that_splits_otherwise_is_refused(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    overrides = [*SIGNALLED, f"data.data_dir={tiny_data_dir}"]
    first = compose_config(*overrides, "trainer.max_epochs=1")
    train(first)
    run = Path(first.paths.output_dir)
    last = run / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    assert len(read_checkpoint(last)["CIFAR10DataModule"]["validation_digest"]) == 16
    other = tmp_path / "one-image-less"
    shutil.copytree(tiny_data_dir, other)
    (other / "train" / "airplane" / "0000.jpg").unlink()  # 99 images: another split

    resumed = [*overrides, "trainer.max_epochs=2", f"ckpt_path={run}"]
    elsewhere = [*resumed, f"data.data_dir={other}"]
    with pytest.raises(UserError, match=f"the data in {other} gives other validation images"):
        train(compose_in("train", elsewhere, run, cache_dir))
    assert last.read_bytes() == saved
    copy = tmp_path / "a-copy"  # the same files elsewhere: the same split
    shutil.copytree(tiny_data_dir, copy)
    elsewhere = [*resumed, f"data.data_dir={copy}"]
    assert train(compose_in("train", elsewhere, run, cache_dir))["status"] == "completed"


def test_resuming_with_other_settings_is_refused(
    data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    data = f"data.data_dir={data_dir}"
    first = train_py(
        *SHORT,
        "trainer.max_epochs=1",
        data,
        f"paths.log_dir={tmp_path}",
        cache_dir=cache_dir,
        cwd=tmp_path,
    )
    assert finish(first)[0] == 0
    [run] = (tmp_path / "runs").iterdir()
    records = {name: (run / name).read_text() for name in ("metrics.json", "run_info.json")}
    code, output = finish(
        train_py(
            data, "trainer.max_epochs=2", f"ckpt_path={run}", cache_dir=cache_dir, cwd=tmp_path
        )
    )
    assert code == 1
    assert (
        "it was trained with other settings (model.optimizer.lr is 0.0003 there, 0.001 now)."
        " Resume with: ++model.optimizer.lr=0.0003 (the run's overrides: " in output
    )
    assert "Traceback" not in output
    # The same settings, but the run has reached its max_epochs: Lightning would do nothing.
    code, output = finish(
        train_py(*SHORT, "trainer.max_epochs=1", data, f"ckpt_path={run}", cache_dir=cache_dir,
                 cwd=tmp_path)
    )  # fmt: skip
    assert code == 1
    assert f"{run} has already reached trainer.max_epochs=1: raise it to train on" in output
    assert "Traceback" not in output
    # Refused resumes leave the run's record as it was.
    assert records == {name: (run / name).read_text() for name in records}


def test_a_scheduled_run_resumes_only_with_the_length_its_schedule_was_laid_out_over(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path
) -> None:
    run = ["experiment=seed_augmented", f"data.data_dir={tiny_data_dir}"]  # OneCycleLR
    stopped = stop_after(compose_config, 6, *run)
    with pytest.raises(StoppedBySignal):
        train(stopped)
    folder = Path(stopped.paths.output_dir)
    last = (folder / "checkpoints" / "last.ckpt").read_bytes()
    longer = [*SIGNALLED, *run, "trainer.max_epochs=4", f"ckpt_path={folder}"]
    with pytest.raises(UserError, match="max_epochs is 2 there, 4 now.*with ") as error:
        train(compose_in("train", longer, folder, cache_dir))
    assert "model.scheduler was laid out over the run's length" in str(error.value)
    assert "resume with ++trainer.max_epochs=2, or start a new run" in str(error.value)
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == last
    same = [*SIGNALLED, *run, f"ckpt_path={folder}"]
    assert train(compose_in("train", same, folder, cache_dir))["status"] == "completed"
    with pytest.raises(UserError, match="reached trainer.max_epochs=2: its learning-rate sched"):
        train(compose_in("train", same, folder, cache_dir))  # not "raise it to train on"


def test_checkpoints_from_before_a_setting_existed_resume_with_its_default(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    datamodule = CIFAR10DataModule(tiny_data_dir, tmp_path / "cache", batch_size=16)
    model = ImageClassifier(net={"_target_": "cifar_cnn.nets.SeedCNN"}, optimizer=ADAM)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path, weights_only=False)
    old = torch.load(path, weights_only=True)
    del old["hyper_parameters"]["scheduler"], old["datamodule_hyper_parameters"]["flip"]
    torch.save(old, path)
    saved = read_checkpoint(path)

    _check_same_settings(saved, path, datamodule, model)  # the missing keys had their defaults
    other = CIFAR10DataModule(tiny_data_dir, tmp_path / "cache", batch_size=16, flip=True)
    with pytest.raises(UserError, match="data.flip is False there, True now"):
        _check_same_settings(saved, path, other, model)
    # Settings that change what a run learns, unlike data_dir, eval_batch_size or on_device.
    for name, value in (("batch_size", 32), ("split_seed", 1), ("val_fraction", 0.3),
                        ("shuffle_seed", 5)):  # fmt: skip
        other = CIFAR10DataModule(
            tiny_data_dir, tmp_path / "cache", **{"batch_size": 16, name: value}
        )
        with pytest.raises(UserError, match=f"data.{name} is .* there, {value} now"):
            _check_same_settings(saved, path, other, model)
    elsewhere = CIFAR10DataModule(tiny_data_dir.parent, tmp_path / "other-cache", batch_size=16,
                                  eval_batch_size=7, on_device=True)  # fmt: skip
    compiled = ImageClassifier(
        net={"_target_": "cifar_cnn.nets.SeedCNN"}, optimizer=ADAM, compile=True
    )
    _check_same_settings(saved, path, elsewhere, compiled)

    # An argument the checkpoint's optimizer left out had its default (Adam's `fused`: None).
    net = {"_target_": "cifar_cnn.nets.SeedCNN"}
    unfused = ImageClassifier(net=net, optimizer=ADAM | {"fused": None})
    _check_same_settings(saved, path, datamodule, unfused)
    fused = ImageClassifier(net=net, optimizer=ADAM | {"fused": True})
    with pytest.raises(UserError) as refused:
        _check_same_settings(saved, path, datamodule, fused)
    assert "(model.optimizer.fused is None there, True now). Resume with: " in str(refused.value)
    assert "Resume with: '~model.optimizer.fused' (the run's overrides: " in str(refused.value)
