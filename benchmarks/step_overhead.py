"""Where a small net's training step loses time to the framework, per step.

Two measurements, each side by side in one process and in alternating rounds (a shared
machine drifts):

1. Lightning's own loop: a one-layer model (Linear 4 -> 2, batches of one row of 4 numbers, on
   the device) trained by a plain loop and by a bare `Trainer` (no logger, checkpoints,
   progress bar or callbacks): what Lightning's hooks cost a step when there is no compute
   to hide them; and by the same `Trainer` with manual optimization (the training step calls
   zero_grad, manual_backward and step itself), which skips the automatic loop's closure;
   and manual optimization with GROUPED optimizer steps per batch (Keras's
   `steps_per_execution`): the batch holds that many rows, one step each, so Lightning's
   per-batch work is shared by that many steps and only the optimizer's and backward's
   wrappers are paid every step.
2. The project's tutorial config (or any overrides): `train_speed.py`'s plain loop, and its
   project path three ways: data on the device (`data.on_device=true`), through the
   DataLoader, and data on the device with the module's per-step bookkeeping left out
   (`BareTrainingStep`: the loss alone; no training metrics or logging), which is what that
   bookkeeping costs. `--precision` applies to these paths.
3. On a CPU, the two data paths alone: an epoch's training and validation batches drawn
   through each, with nothing trained (`us_per_batch`): what the path costs, which the
   training step's spread from round to round hides.

python benchmarks/step_overhead.py --device cuda --epochs 3
python benchmarks/step_overhead.py --device cpu --precision 32-true   # float32 on a CPU
python benchmarks/step_overhead.py --device cpu --epochs 2 --steps 50 --rounds 1   # smoke run

The last line printed is one JSON object (microseconds per step; also written to --output).
"""

import argparse
import copy
import functools
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (the sibling benchmark: its config and project path)

from cifar_cnn.module import ImageClassifier  # noqa: E402
from cifar_cnn.resolvers import register_resolvers  # noqa: E402
from cifar_cnn.runtime import (  # noqa: E402
    keep_freed_memory,
    silence_known_warnings,
    skip_nvml_probe,
)

ROWS = 3000  # steps of the one-layer loop
GROUPED = 8  # steps per batch in `one_layer_grouped`


class BareTrainingStep(ImageClassifier):
    """ImageClassifier whose training step returns the loss and does nothing else."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels, label_smoothing=self.hparams.label_smoothing)


class _Rows:
    """Batches of one row, already on the device, as a loader Lightning accepts."""

    sampler = None
    batch_sampler = None

    def __init__(self, inputs: Tensor, targets: Tensor, rows_per_batch: int = 1) -> None:
        self.inputs, self.targets, self.rows_per_batch = inputs, targets, rows_per_batch

    def __len__(self) -> int:
        return len(self.inputs) // self.rows_per_batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self) * self.rows_per_batch, self.rows_per_batch):
            rows = slice(i, i + self.rows_per_batch)
            yield self.inputs[rows], self.targets[rows]


class _OneLayer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self.layer(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters())


class _OneLayerManual(_OneLayer):
    """The one-layer model under Lightning's manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        return loss


class _OneLayerGrouped(_OneLayerManual):
    """Manual optimization, one optimizer step for each row of the batch."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        for i in range(len(inputs)):
            loss = super().training_step((inputs[i : i + 1], targets[i : i + 1]), batch_idx)
        return loss


def one_layer_plain(rows: _Rows, device: torch.device) -> float:
    layer = torch.nn.Linear(4, 2).to(device)
    optimizer = torch.optim.Adam(layer.parameters())
    train_speed.synchronize(device)
    started = time.perf_counter()
    for inputs, targets in rows:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(layer(inputs), targets).backward()
        optimizer.step()
    train_speed.synchronize(device)
    return time.perf_counter() - started


def one_layer_lightning(
    rows: _Rows, device: torch.device, module: type = _OneLayer, rows_per_batch: int = 1
) -> float:
    timer = train_speed.EpochTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module(), _Rows(rows.inputs, rows.targets, rows_per_batch))
    assert trainer.global_step == ROWS, "each path takes one optimizer step per row"
    [seconds] = timer.epoch_times
    return seconds


def config_step_s(cfg: DictConfig, args: argparse.Namespace, variant: str) -> float:
    """Seconds a step (the first epoch left out) of train_speed's plain loop (`plain`) or of
    one variant of the project's path."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.on_device = variant != "dataloader"
        if variant == "bare_step":
            cfg.model._target_ = f"{__name__}.BareTrainingStep"
    datamodule = train_speed.ready_datamodule(cfg.data)  # fresh: the on-device path moves it
    steps = train_speed.epoch_steps(args, datamodule)
    if variant == "plain":
        train = datamodule.data_train
        device = torch.device(args.device)
        timings = train_speed.reference_loop(cfg, args, device, train.images, train.labels, steps)
        return timings["epoch_s"] / steps
    return train_speed.project_fit(cfg, args, datamodule, steps)["epoch_s"] / steps


def batch_s(cfg: DictConfig, on_device: bool) -> float:
    """Seconds a batch to draw an epoch's training and validation batches on the CPU, through
    the DataLoader or sliced from the tensors (`data.on_device`), with nothing trained."""
    datamodule = train_speed.ready_datamodule(cfg.data, on_device=on_device)
    loaders = (datamodule.train_dataloader(), datamodule.val_dataloader())
    batches = 0
    start = time.perf_counter()
    for loader in loaders:
        for _ in loader:
            batches += 1
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3, help="the first one is warm-up")
    parser.add_argument("--steps", type=int, default=0, help="train steps per epoch (0: all)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each")
    parser.add_argument(
        "--precision", help="Lightning's: 32-true, bf16-mixed or 16-mixed (default: the config's)"
    )
    parser.add_argument("--output", help="also write the JSON summary to this file")
    parser.add_argument("overrides", nargs="*", help="train.py config overrides")
    args = parser.parse_args()
    # What else train_speed's config and paths read: the config's own settings, no profiler.
    args.channels_last, args.compile, args.profile = None, None, False
    register_resolvers()  # conf/ uses them; train.py registers them the same way
    silence_known_warnings()  # as train.py: library notices known to be harmless
    keep_freed_memory()  # as train.py and train_speed.py: glibc keeps freed blocks
    skip_nvml_probe()  # and no NVML search at each Adam step without a GPU
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    cfg = train_speed.compose_config(args)
    datamodule = train_speed.ready_datamodule(cfg.data)
    train_speed.epoch_steps(args, datamodule)  # a bad --steps stops before the first round

    inputs = torch.randn(ROWS, 4, device=device)
    rows = _Rows(inputs, torch.randint(0, 2, (ROWS,), device=device))
    one_layer_plain(rows, device)  # warm-up: the device's first kernels
    timings: dict[str, list[float]] = {}
    batch_timings: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, run in (
            ("one_layer_plain", one_layer_plain),
            ("one_layer_lightning", one_layer_lightning),
            ("one_layer_manual", functools.partial(one_layer_lightning, module=_OneLayerManual)),
            (
                "one_layer_grouped",
                functools.partial(
                    one_layer_lightning, module=_OneLayerGrouped, rows_per_batch=GROUPED
                ),
            ),
        ):
            timings.setdefault(name, []).append(run(rows, device) / ROWS)
        for variant in ("plain", "on_device", "dataloader", "bare_step"):
            timings.setdefault(variant, []).append(config_step_s(cfg, args, variant))
        if device.type == "cpu":
            for on_device, name in ((True, "batches_on_device"), (False, "batches_dataloader")):
                batch_timings.setdefault(name, []).append(batch_s(cfg, on_device))

    summary: dict[str, Any] = {
        "device": train_speed.device_name(device),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "precision": args.precision,
        "overrides": args.overrides,
        "us_per_step": {
            name: [round(s * 1e6, 1) for s in times] for name, times in timings.items()
        },
        "us_per_batch": {
            name: [round(s * 1e6, 1) for s in times] for name, times in batch_timings.items()
        },
    }
    mean = {name: sum(times) / len(times) * 1e6 for name, times in timings.items()}
    print(f"\n{'path':22s} us/step (mean of {args.rounds})")
    for name, value in mean.items():
        print(f"{name:22s} {value:9.1f}")
    print(
        f"Lightning's loop: {mean['one_layer_lightning'] - mean['one_layer_plain']:.1f} us a "
        f"step ({mean['one_layer_manual'] - mean['one_layer_plain']:.1f} with manual "
        f"optimization, {mean['one_layer_grouped'] - mean['one_layer_plain']:.1f} with "
        f"{GROUPED} steps a batch); the module's bookkeeping: "
        f"{mean['on_device'] - mean['bare_step']:.1f} us; "
        f"project/plain {mean['on_device'] / mean['plain']:.3f} (data on the device), "
        f"{mean['dataloader'] / mean['plain']:.3f} (DataLoader)"
    )
    if batch_timings:
        drawn = {name: sum(times) / len(times) * 1e6 for name, times in batch_timings.items()}
        print(
            f"Drawing a batch, nothing trained: {drawn['batches_on_device']:.1f} us on the "
            f"device, {drawn['batches_dataloader']:.1f} us through the DataLoader"
        )
    train_speed.print_json(summary, args.output)


if __name__ == "__main__":
    main()
