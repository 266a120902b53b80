"""DDP for real on the CPU: two processes talking gloo, against one process with the same
global batch."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
from omegaconf import DictConfig

from cifar_cnn.evaluation import evaluate
from cifar_cnn.training import train

from .conftest import compose_in

ROOT = Path(__file__).resolve().parents[1]


def run_train(run_dir: Path, cache_dir: Path, data_dir: Path, *overrides: str) -> str:
    """Runs train.py into run_dir; returns its output (the other DDP processes' too)."""
    command = [
        sys.executable, str(ROOT / "train.py"), f"data.data_dir={data_dir}",
        "model.net.dropout=0", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "+callbacks.shard_probe._target_=tests.probes.ShardProbe", f"hydra.run.dir={run_dir}",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        command, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("on_device", ["false", "true"])  # the GPU and the CPU default
def test_two_processes_train_like_one_with_the_same_global_batch(
    on_device: str, tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Same global batches (20 images: 10 per process), no dropout: the metrics agree within
    float32 rounding (losses to 1e-3, accuracies to one image: 1/20 of val, 1/40 of test)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    fresh_cache = tmp_path / "cache"  # built by one process, read by both
    float32 = "trainer.precision=32-true"  # bf16 would round the two runs differently
    data_path = f"data.on_device={on_device}"
    output = run_train(
        ddp, fresh_cache, tiny_data_dir, "trainer=ddp_cpu", "data.batch_size=10", float32, data_path
    )
    assert output.count("Decoding") == 1 and len(list(fresh_cache.glob("*.pt"))) == 1
    run_train(
        single, cache_dir, tiny_data_dir, "trainer=cpu", "data.batch_size=20", float32, data_path
    )

    # One run folder, written once: one config record, one metrics.json, one set of checkpoints;
    # one report of each epoch and of the test accuracy.
    assert output.count("epoch 001 (2/2)") == 1 and output.count("Test accuracy") == 1
    assert sorted(p.name for p in ddp.iterdir() if p.name.startswith(".")) == [".hydra"]
    checkpoints = sorted(p.name for p in (ddp / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[1] == "last.ckpt", checkpoints
    assert not list(ddp.glob("*.tmp")) and not list((ddp / "checkpoints").glob("*.tmp"))

    # Each process trained on its own half of every global batch, the one-process run's batch.
    rank0, rank1 = (json.loads((ddp / f"shard_rank{r}.json").read_text()) for r in (0, 1))
    [alone] = [json.loads((single / "shard_rank0.json").read_text())]
    assert len(rank0) == len(rank1) == len(alone) == 8  # 4 steps an epoch, 2 epochs
    for mine, theirs, whole in zip(rank0, rank1, alone, strict=True):
        assert len(mine) == len(theirs) == 10 and not set(mine) & set(theirs)
        assert sorted(mine + theirs) == whole

    together, one = (json.loads((run / "metrics.json").read_text()) for run in (ddp, single))
    assert together["status"] == one["status"] == "completed"
    assert together["test/loss"] == pytest.approx(one["test/loss"], abs=1e-3)
    assert together["val/acc_best"] == pytest.approx(one["val/acc_best"], abs=1 / 20)
    assert together["test/acc"] == pytest.approx(one["test/acc"], abs=1 / 40)


@pytest.mark.slow
def test_the_fast_recipe_trains_in_two_processes_past_the_stem_bias_epochs(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """WhitenStem stops the stem bias after its epochs without taking it from DDP's parameters
    (DDP fails a step whose parameters stop getting gradients), and Lookahead runs alike."""
    command = [
        sys.executable, str(ROOT / "train.py"), "experiment=fast", "trainer=ddp_cpu",
        f"data.data_dir={tiny_data_dir}", "data.batch_size=16", "data.eval_batch_size=16",
        "model.net.widths=[8,16,16]", "trainer.max_epochs=2", "callbacks.whiten_stem.bias_epochs=1",
        "logger.tensorboard=null", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2


@pytest.mark.slow
def test_three_processes_report_the_mean_loss_of_their_uneven_shards(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """40 test images over 3 processes (14, 13, 13): the test loss is the mean over the 40, as
    eval.py computes it from the checkpoint. Lightning's mean of a logged loss divided by the
    image count averaged over processes as an integer (40 / 3: 13), 2.6% too large."""
    run_dir = tmp_path / "run"
    run_train(run_dir, cache_dir, tiny_data_dir, "trainer=ddp_cpu", "trainer.devices=3")
    trained = json.loads((run_dir / "metrics.json").read_text())
    overrides = [f"ckpt_path={run_dir}", f"data.data_dir={tiny_data_dir}"]
    report = evaluate(compose_in("eval", overrides, tmp_path / "eval", cache_dir))
    assert trained["test/acc"] == pytest.approx(report["accuracy"], abs=1e-6)
    assert trained["test/loss"] == pytest.approx(report["loss"], abs=1e-6)


def test_a_run_ends_its_process_group(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """Each DDP process ends its gloo group before the interpreter exits: left to the exit, it
    can abort a completed run ("terminate called without an active exception", rc -6).
    (Here a one-process group stands for the one Lightning's DDP sets up.)"""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = compose_config(
            f"data.data_dir={tiny_data_dir}", "trainer.accelerator=cpu", "trainer.max_epochs=1",
            "logger.tensorboard=null",
        )  # fmt: skip
        assert train(cfg)["status"] == "completed"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_a_ddp_run_continued_by_its_folder_alone_continues_in_every_process(
    tiny_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """The further process, started by Lightning with the command line, takes the run's own
    config too: both train the continued run's epochs."""
    run_dir = tmp_path / "run"
    run_train(run_dir, cache_dir, tiny_data_dir, "trainer=ddp_cpu", "data.batch_size=10")
    command = [sys.executable, str(ROOT / "train.py"), f"ckpt_path={run_dir}",
               "trainer.max_epochs=3"]  # fmt: skip
    env = {**os.environ, "CIFAR_CNN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3
    second = (run_dir / "train_ddp_process_1.log").read_text()
    assert "Continuing with trainer.max_epochs 2 -> 3" in second
    assert second.count("Continuing with") == 1  # data.batch_size: the run's 10, not 64
