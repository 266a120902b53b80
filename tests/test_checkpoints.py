import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from cifar_cnn.checkpoints import AtomicCheckpointIO, load_checkpoint, resolve_checkpoint
from cifar_cnn.errors import UserError
from cifar_cnn.module import ImageClassifier
from cifar_cnn.training import train

from .conftest import file_size_limit, limit_file_size

ROOT = Path(__file__).resolve().parents[1]

NET = {"_target_": "cifar_cnn.nets.TutorialCNN", "hidden_units": 16}
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint as a Trainer writes it, of an untrained classifier."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    module = ImageClassifier(NET, ADAM)
    module.trainer = trainer  # as fit() attaches it
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path, weights_only=False)
    return path


def test_load_checkpoint_gives_the_saved_model(checkpoint: Path) -> None:
    loaded = load_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert not loaded.model.training
    for key, value in saved["state_dict"].items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert loaded.precision == saved["precision"] == "32-true"  # the trainer's


def test_the_recorded_precision_is_the_runs_and_a_checkpoint_without_it_is_refused(
    checkpoint: Path, tmp_path: Path
) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["precision"] = "bf16-mixed"
    torch.save(content, tmp_path / "bf16.ckpt")
    assert load_checkpoint(tmp_path / "bf16.ckpt").precision == "bf16-mixed"
    content.pop("precision")
    torch.save(content, tmp_path / "unrecorded.ckpt")
    with pytest.raises(UserError, match="unrecorded.ckpt is not a checkpoint of cifar_cnn's"):
        load_checkpoint(tmp_path / "unrecorded.ckpt")


def test_run_folder_resolves_to_its_best_checkpoint(tmp_path: Path, checkpoint: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("epoch_001.ckpt", "last.ckpt"):  # what a run killed in its second epoch leaves
        (folder / name).write_bytes(checkpoint.read_bytes())
    assert resolve_checkpoint(tmp_path / "run") == folder / "epoch_001.ckpt"  # its only best
    (folder / "epoch_004.ckpt").write_bytes(checkpoint.read_bytes())
    assert resolve_checkpoint(tmp_path / "run") == folder / "last.ckpt"  # two candidates
    (tmp_path / "run" / "metrics.json").write_text('{"status": "comp')  # cut short: no record
    assert resolve_checkpoint(tmp_path / "run") == folder / "last.ckpt"
    (folder / "last.ckpt").unlink()
    with pytest.raises(UserError, match="several checkpoints .* epoch_001.ckpt, epoch_004.ckpt"):
        resolve_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_text(
        json.dumps({"best_checkpoint": "/elsewhere/checkpoints/epoch_004.ckpt"})
    )
    assert resolve_checkpoint(tmp_path / "run") == folder / "epoch_004.ckpt"
    assert resolve_checkpoint(folder / "epoch_001.ckpt") == folder / "epoch_001.ckpt"

    # A run without our checkpoint callbacks: Lightning's own saves under the logger's folder.
    lightnings = tmp_path / "bare" / "tensorboard" / "checkpoints" / "epoch=0-step=3.ckpt"
    lightnings.parent.mkdir(parents=True)
    lightnings.write_bytes(checkpoint.read_bytes())
    (tmp_path / "bare" / "metrics.json").write_text(
        json.dumps({"best_checkpoint": str(lightnings)})
    )
    assert resolve_checkpoint(tmp_path / "bare") == lightnings


def test_missing_and_empty_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"checkpoint {tmp_path / 'gone.ckpt'} does not exist"):
        resolve_checkpoint(tmp_path / "gone.ckpt")
    with pytest.raises(UserError, match=f"no checkpoint in {tmp_path}"):
        resolve_checkpoint(tmp_path)


def test_files_that_are_not_our_checkpoints_are_named(tmp_path: Path, checkpoint: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {}}, other)
    config = tmp_path / "config.yaml"  # the unpickler's KeyError / IndexError on such files
    config.write_text("seed: 42\n")
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    for path in (text, truncated, config, empty):
        with pytest.raises(UserError, match=f"{path} is not a checkpoint file: torch.save"):
            load_checkpoint(path)
    with pytest.raises(UserError, match=f"{other} is not a checkpoint of cifar_cnn's"):
        load_checkpoint(other)


def test_a_checkpoint_with_damaged_bytes_is_named_not_loaded(
    tmp_path: Path, checkpoint: Path
) -> None:
    content = bytearray(checkpoint.read_bytes())
    middle = len(content) // 2  # in the weights or the optimizer's state
    content[middle : middle + 64] = bytes(b ^ 0xFF for b in content[middle : middle + 64])
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(content)
    with pytest.raises(UserError, match=f"{damaged} is damaged: its part .* fails its checksum"):
        load_checkpoint(damaged)


def test_weights_that_do_not_fit_their_net_are_named(tmp_path: Path, checkpoint: Path) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["net"]["hidden_units"] = 32
    mismatched = tmp_path / "mismatched.ckpt"
    torch.save(content, mismatched)
    with pytest.raises(UserError, match=f"{mismatched} does not load as the model it describes"):
        load_checkpoint(mismatched)


def test_checkpoints_that_would_run_code_are_refused(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"hyper_parameters": {"net": NET, "optimizer": ADAM}, "hook": print}, unsafe)
    with pytest.raises(UserError, match="is not a readable checkpoint") as error:
        load_checkpoint(unsafe)
    # Why (the refused function), not torch's advice to load the file unsafely.
    assert "Unsupported global" in str(error.value) and "weights_only" not in str(error.value)


def test_checkpoints_naming_functions_to_build_are_refused(
    tmp_path: Path, checkpoint: Path
) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["net"] = {"_target_": "os.system", "command": "touch pwned"}
    hostile = tmp_path / "hostile.ckpt"
    torch.save(content, hostile)
    with pytest.raises(UserError, match="_target_ os.system is not a Module class"):
        load_checkpoint(hostile)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("target", ["cifar_cnn.nets.RemovedNet", "no_such_package.Net"])
def test_a_checkpoint_naming_a_class_that_does_not_exist_is_named(
    target: str, tmp_path: Path, checkpoint: Path
) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["net"] = {"_target_": target}
    torch.save(content, tmp_path / "gone.ckpt")
    with pytest.raises(UserError, match=f"gone.ckpt does not load .*_target_ {target} names noth"):
        load_checkpoint(tmp_path / "gone.ckpt")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(content, path)
    before = path.read_bytes()

    def killed_while_writing(checkpoint: dict, filepath: str) -> None:
        Path(filepath).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint(content, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    load_checkpoint(path)


def test_a_checkpoint_write_on_a_full_disk_stops_and_keeps_the_previous_one(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    previous = folder / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(10)}, previous)
    saved = previous.read_bytes()
    with file_size_limit(100_000), pytest.raises(UserError) as error:
        AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(100_000)}, previous)
    assert str(error.value) == (
        f"cannot write checkpoint {previous} (File too large: the file size limit (ulimit -f) "
        "is reached); the run's earlier checkpoints are kept whole: free space, then continue "
        f"it with python train.py ckpt_path={tmp_path / 'run'}"
    )
    assert previous.read_bytes() == saved and list(folder.iterdir()) == [previous]


@pytest.mark.slow  # a train.py process
def test_a_run_that_fills_the_disk_stops_with_a_message_and_continues_after(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path
) -> None:
    settings = [f"data.data_dir={tiny_data_dir}", "trainer.accelerator=cpu",
                "logger.tensorboard=null", "data.batch_size=20"]  # fmt: skip
    first = compose_config(*settings, "trainer.max_epochs=1")
    train(first)
    run = Path(first.paths.output_dir)
    last = run / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    on = [sys.executable, str(ROOT / "train.py"), *settings, "trainer.max_epochs=2",
          f"ckpt_path={run}"]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    full = subprocess.run(on, cwd=run.parent, env=env, capture_output=True, text=True,
                          preexec_fn=limit_file_size(len(saved) // 2), timeout=300)  # fmt: skip
    output = full.stdout + full.stderr
    assert full.returncode == 1 and "Traceback" not in output, output
    assert f"cannot write checkpoint {run / 'checkpoints'}" in output
    assert "the run's earlier checkpoints are kept whole" in output
    assert last.read_bytes() == saved
    assert not list((run / "checkpoints").glob(".*.tmp"))

    space = subprocess.run(on, cwd=run.parent, env=env, capture_output=True, text=True)
    assert space.returncode == 0, space.stdout + space.stderr
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
