"""Stopping and resuming: same folder, same settings, and exactly the same result."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from cifar_cnn.checkpoints import read_checkpoint
from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.errors import StoppedBySignal, UserError
from cifar_cnn.module import ImageClassifier
from cifar_cnn.resume import Resume
from cifar_cnn.training import train

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


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow  # train.py processes, or the full data set
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
    keys = ("val/acc_best", "test/acc", "test/loss", "epochs")
    assert [metrics_of(run)[k] for k in keys] == [metrics_of(full_run)[k] for k in keys]
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
    holds both runs' files, "cut" and "full"), metrics and weights."""
    assert (records / "cut").read_text() == (records / "full").read_text()
    keys = ("val/acc_best", "test/acc", "test/loss")
    assert [cut[key] for key in keys] == [uninterrupted[key] for key in keys]
    expected, got = weights(full_run), weights(cut_run)
    assert all(torch.equal(value, got[key]) for key, value in expected.items())


def stop_after(compose_config: Callable[..., DictConfig], step: int, *overrides: str) -> DictConfig:
    """The SIGNALLED run (5 steps an epoch), Ctrl-C'd at `step`: GracefulStop, which runs
    after the other callbacks, sees it at the same batch."""
    return compose_config(
        *SIGNALLED, *overrides, "+callbacks.interrupt._target_=tests.probes.InterruptAtStep",
        f"+callbacks.interrupt.step={step}",
    )  # fmt: skip


@pytest.mark.parametrize(
    "data",
    [
        ["data.on_device=false"],  # through the DataLoader, the GPU default
        ["data.on_device=true"],
        # with a schedule, the data module's loader is set up before the checkpoint is loaded
        ["experiment=tutorial_augmented"],
        # the average's state and the policies' draws go on too
        ["callbacks=[default,ema]", "augment=[trivialaugment,cutout,mixup,cutmix]"],
    ],
)
def test_a_run_resumed_mid_epoch_ends_as_an_uninterrupted_one(
    data: list[str], compose_config: Callable[..., DictConfig], tiny_data_dir: Path,
    cache_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """The epoch goes on with its next batch, the same random flips and the same metrics."""
    run = [*data, f"data.data_dir={tiny_data_dir}", "data.flip=true"]
    record = "+callbacks.record._target_=tests.probes.RecordTraining"
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
    record = "+callbacks.record._target_=tests.probes.RecordValidations"
    cut_record = f"+callbacks.record.to={tmp_path / 'cut'}"
    stopped = compose_config(
        *SIGNALLED, *run, "+callbacks.interrupt._target_=tests.probes.InterruptAtStep",
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


@pytest.mark.slow  # train.py processes, or the full data set
def test_the_best_epoch_is_tested_and_stays_the_best_across_a_resume(
    compose_config: Callable[..., DictConfig], data_dir: Path, cache_dir: Path
) -> None:
    run = [
        f"data.data_dir={data_dir}", "trainer.accelerator=cpu", "trainer.max_epochs=2",
        "+trainer.limit_train_batches=30", "+trainer.limit_val_batches=4",
        "logger.tensorboard=null", "+callbacks.zero._target_=tests.probes.ZeroWeightsFrom",
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
            precision=cfg.trainer.precision,  # the run's: its test metrics to the last digit
            logger=False,
            enable_progress_bar=False,
        )
        [metrics] = tester.test(model, CIFAR10DataModule(data_dir, cache_dir), verbose=False)
        return metrics["test/acc"]

    best = test_accuracy(checkpoints / "epoch_000.ckpt")
    assert first["test/acc"] == pytest.approx(best, abs=1e-6)
    assert best > test_accuracy(checkpoints / "last.ckpt") + 0.05  # the last weights are worse

    longer = [*run, "trainer.max_epochs=3", f"ckpt_path={folder}"]
    resumed = train(compose_in("train", longer, folder, cache_dir))
    assert resumed["epochs"] == 3
    for key in ("val/acc_best", "best_checkpoint", "test/acc"):
        assert resumed[key] == first[key]


def test_a_resumed_run_without_validation_keeps_its_best(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path
) -> None:
    run = [*SIGNALLED, f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=1", "seed=2"]
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
    keys = ("status", "epochs", "val/acc_best", "test/acc", "test/loss")
    assert [resumed[key] for key in keys] == [uninterrupted[key] for key in keys]
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


@pytest.mark.slow  # train.py processes, or the full data set
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
            "trainer.max_epochs=2", "model.optimizer.lr=1e-3", f"ckpt_path={run}",
            cache_dir=cache_dir, cwd=tmp_path,
        )
    )  # fmt: skip
    assert code == 1
    assert (
        "it was trained with other settings (model.optimizer.lr is 0.0003 there, 0.001 now)."
        " A continued run takes the run's own settings back: leave out the overrides" in output
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
    run = ["experiment=tutorial_augmented", f"data.data_dir={tiny_data_dir}"]  # OneCycleLR
    stopped = stop_after(compose_config, 6, *run)
    with pytest.raises(StoppedBySignal):
        train(stopped)
    folder = Path(stopped.paths.output_dir)
    last = (folder / "checkpoints" / "last.ckpt").read_bytes()
    longer = [*SIGNALLED, *run, "trainer.max_epochs=4", f"ckpt_path={folder}"]
    with pytest.raises(UserError, match="trainer.max_epochs is 2 there, 4 now") as error:
        train(compose_in("train", longer, folder, cache_dir))
    assert "model.scheduler was laid out over the run's length" in str(error.value)
    assert "leave out the overrides that change it, or start a new run" in str(error.value)
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == last
    same = [*SIGNALLED, *run, f"ckpt_path={folder}"]
    assert train(compose_in("train", same, folder, cache_dir))["status"] == "completed"
    with pytest.raises(UserError, match="reached trainer.max_epochs=2: its learning-rate sched"):
        train(compose_in("train", same, folder, cache_dir))  # not "raise it to train on"


def test_a_resume_compares_what_the_run_learns_from_not_where_or_how_fast(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    datamodule = CIFAR10DataModule(tiny_data_dir, tmp_path / "cache", batch_size=16)
    net = {"_target_": "cifar_cnn.nets.TutorialCNN"}
    model = ImageClassifier(net=net, optimizer=ADAM)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=False)
    resume = Resume(str(run))

    resume.check_same_settings(datamodule, model)
    other = CIFAR10DataModule(tiny_data_dir, tmp_path / "cache", batch_size=16, flip=True)
    with pytest.raises(UserError, match="data.flip is False there, True now"):
        resume.check_same_settings(other, model)
    # Settings that change what a run learns, unlike data_dir, eval_batch_size or on_device.
    for name, value in (("batch_size", 32), ("split_seed", 1), ("val_fraction", 0.3),
                        ("shuffle_seed", 5)):  # fmt: skip
        other = CIFAR10DataModule(
            tiny_data_dir, tmp_path / "cache", **{"batch_size": 16, name: value}
        )
        with pytest.raises(UserError, match=f"data.{name} is .* there, {value} now"):
            resume.check_same_settings(other, model)
    elsewhere = CIFAR10DataModule(tiny_data_dir.parent, tmp_path / "other-cache", batch_size=16,
                                  eval_batch_size=7, on_device=True)  # fmt: skip
    compiled = ImageClassifier(net=net, optimizer=ADAM, compile=True)
    resume.check_same_settings(elsewhere, compiled)

    # An optimizer argument the run's config left out (Adam's `fused`).
    fused = ImageClassifier(net=net, optimizer=ADAM | {"fused": True})
    with pytest.raises(UserError) as refused:
        resume.check_same_settings(datamodule, fused)
    assert (
        "(model.optimizer.fused is None there, True now). A continued run takes the run's own "
        "settings back: leave out the overrides that change them" in str(refused.value)
    )


@pytest.mark.slow  # train.py processes
def test_a_killed_run_continued_by_its_folder_alone_trains_to_its_own_length(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Started with trainer.max_epochs=12 and killed in its third epoch, the run continued
    with `ckpt_path=` alone trains to epoch 12 (not the default 10), as an uninterrupted run."""
    run = [
        f"data.data_dir={tiny_data_dir}", "data.batch_size=16", "trainer.accelerator=cpu",
        "trainer.max_epochs=12", "logger.tensorboard=null",
    ]  # 5 steps an epoch  # fmt: skip
    full = train_py(*run, f"paths.log_dir={tmp_path / 'full'}", cache_dir=cache_dir, cwd=tmp_path)
    assert finish(full)[0] == 0
    [full_run] = (tmp_path / "full" / "runs").iterdir()
    kill = ["+callbacks.kill._target_=tests.probes.KillAtStep", "+callbacks.kill.step=12"]
    cut = train_py(*run, *kill, f"paths.log_dir={tmp_path / 'cut'}", cache_dir=cache_dir,
                   cwd=tmp_path)  # fmt: skip
    assert finish(cut)[0] == -signal.SIGKILL
    [cut_run] = (tmp_path / "cut" / "runs").iterdir()
    assert torch.load(cut_run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1

    code, output = finish(train_py(f"ckpt_path={cut_run}", cache_dir=cache_dir, cwd=tmp_path))
    assert code == 0, output
    assert "epoch 002 (3/12)" in output and "epoch 011 (12/12)" in output
    assert "Continuing with" not in output  # no setting changed
    assert metrics_of(cut_run)["epochs"] == metrics_of(full_run)["epochs"] == 12
    expected, resumed = weights(full_run), weights(cut_run)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)

    # A checkpoint without its record of the config: Hydra's record of the run's start.
    config, choices = Resume(str(cut_run)).recorded()
    saved = torch.load(cut_run / "checkpoints" / "last.ckpt", weights_only=True)
    del saved["run_config"]
    torch.save(saved, cut_run / "checkpoints" / "last.ckpt")
    started, started_choices = Resume(str(cut_run)).recorded()
    assert started_choices == choices
    assert started.pop("callbacks").pop("kill") and config.pop("callbacks").pop("kill")
    for setting in ("paths", "ckpt_path"):  # this machine's places, and the continuation's
        del started[setting], config[setting]
    assert started == config


def test_a_continued_run_takes_its_own_settings_back(
    compose_config: Callable[..., DictConfig],
    tiny_data_dir: Path,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = [*SIGNALLED, f"data.data_dir={tiny_data_dir}", "trainer.max_epochs=1",
           "model.optimizer.lr=3e-4", "+trainer.limit_val_batches=1",
           "~callbacks.epoch_summary"]  # fmt: skip
    cfg = compose_config(*run)
    train(cfg)
    folder = Path(cfg.paths.output_dir)

    def continued(*overrides: str) -> DictConfig:
        return compose_in("train", [f"ckpt_path={folder}", *overrides], folder, cache_dir)

    # The run's own `+key=` given again, and a group at the run's own option, change nothing.
    with caplog.at_level(logging.INFO, logger="cifar_cnn.resume"):
        longer = continued(
            "trainer.max_epochs=3", "+trainer.limit_val_batches=1", "model=tutorial_cnn"
        )
    assert [r.getMessage() for r in caplog.records if "Continuing" in r.getMessage()] == [
        "Continuing with trainer.max_epochs 1 -> 3"
    ]
    assert longer.model.optimizer.lr == 3e-4 and longer.data.batch_size == 16
    assert longer.logger.tensorboard is None and longer.trainer.limit_val_batches == 1
    assert "epoch_summary" not in longer.callbacks
    assert train(longer)["epochs"] == 3
    # Its checkpoint now records 3 epochs: not the default 10, nor the first start's 1.
    with pytest.raises(UserError, match="has already reached trainer.max_epochs=3: raise it"):
        train(continued())

    with pytest.raises(UserError, match="data.batch_size is 16 there, 32 now"):
        train(continued("trainer.max_epochs=4", "data.batch_size=32"))
    with pytest.raises(UserError, match="with data=cifar10_on_device: the run was composed "
                       "with data=cifar10, and a continued run keeps"):  # fmt: skip
        continued("data=cifar10_on_device")
    with pytest.raises(UserError, match="debug=fast_dev_run: the run was composed with debug=null"):
        continued("debug=fast_dev_run")
    with pytest.raises(UserError, match=r"augment=\[cutout\]: the run was composed with augment"):
        continued("augment=[cutout]")  # several options of a group: Hydra records no choice
    with pytest.raises(UserError, match="fast_dev_run .* does not go with ckpt_path"):
        train(continued("+trainer.fast_dev_run=true"))
    # A setting of today's config that the run has not (it deleted this one): Hydra's message.
    with pytest.raises(UserError, match=f"cannot continue {folder}: Could not override 'callbacks"):
        continued("callbacks.epoch_summary._target_=cifar_cnn.callbacks.EpochSummary")


def test_a_run_stopped_before_its_first_checkpoint_has_nothing_to_continue(
    tmp_path: Path,
) -> None:
    run = tmp_path / "runs" / "2026-01-01_00-00-00_1"
    (run / ".hydra").mkdir(parents=True)
    with pytest.raises(UserError, match="stopped before its first epoch ended; there is nothing"):
        Resume(str(run))
    with pytest.raises(UserError, match="ckpt_path takes a run folder"):
        Resume(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("longer", ["trainer.max_epochs=3", "++trainer.max_steps=20"])
def test_a_finished_scheduled_run_is_not_trained_on_past_its_schedule(
    longer: str, compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path
) -> None:
    """OneCycleLR raises one step past the length it was laid out over: continuing a finished
    run to a longer length is refused before any step, naming the setting that changes it."""
    run = [*SIGNALLED, "experiment=tutorial_augmented", f"data.data_dir={tiny_data_dir}",
           "trainer.max_epochs=1"]  # fmt: skip
    finished = compose_config(*run)
    assert train(finished)["status"] == "completed"
    folder = Path(finished.paths.output_dir)
    saved = {p.name: p.read_bytes() for p in (folder / "checkpoints").iterdir()}
    metrics = (folder / "metrics.json").read_text()

    with pytest.raises(UserError) as error:
        train(compose_in("train", [*run, longer, f"ckpt_path={folder}"], folder, cache_dir))
    message = str(error.value)
    assert "model.scheduler was laid out over the run's length" in message
    assert longer.lstrip("+").partition("=")[0] in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in (folder / "checkpoints").iterdir()} == saved
    assert (folder / "metrics.json").read_text() == metrics
