"""Training speed: the project's Lightning path against the fastest plain PyTorch loop.

Both train the same net from the same Hydra config on the same cached data, in one process:
the plain loop, the project, the plain loop again (the machine may drift; the reference is
the mean of both). The ratio project/reference is the framework's cost per epoch.

python benchmarks/train_speed.py                          # tutorial config, 2 epochs each
python benchmarks/train_speed.py --steps 20 --epochs 2    # a smoke run
python benchmarks/train_speed.py --channels-last --precision bf16-mixed --compile
python benchmarks/train_speed.py --keras                  # adds the Keras tutorial (`.[bench]`)
python benchmarks/train_speed.py experiment=fast          # any train.py override after flags

The last line printed is one JSON object (also written to --output when given).
"""

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn

from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.data.augmentation import augment
from cifar_cnn.data.images import to_float_images
from cifar_cnn.resolvers import register_resolvers
from cifar_cnn.runtime import keep_freed_memory, silence_known_warnings, skip_nvml_probe
from cifar_cnn.training import build

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
# The precisions the plain loop runs (autocast's dtype; None: float32), Lightning's names.
AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def main() -> None:
    args = parse_args()
    register_resolvers()  # conf/ uses them; train.py registers them the same way
    silence_known_warnings()  # as train.py: library notices known to be harmless
    if args.keep_freed_memory:
        keep_freed_memory()  # as train.py does: for every path alike
    nvml_probe_skipped = args.skip_nvml_probe and skip_nvml_probe()  # likewise
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = compose_config(args)
    datamodule = ready_datamodule(cfg.data)
    train_images, train_labels = datamodule.data_train.images, datamodule.data_train.labels
    test_images, test_labels = datamodule.data_test.images, datamodule.data_test.labels
    batch_size = cfg.data.batch_size
    steps = epoch_steps(args, datamodule)

    # Reference, project, reference again: a shared machine drifts over minutes, and the
    # reference's mean over both sides of the project is the fair comparison.
    results: dict[str, Any] = {}
    before = reference_loop(cfg, args, device, train_images, train_labels, steps, args.profile)
    results["project"] = project_fit(cfg, args, datamodule, steps)
    after = reference_loop(cfg, args, device, train_images, train_labels, steps)
    results["reference"] = {
        **epoch_timings(before["epoch_times_s"] + after["epoch_times_s"], steps * batch_size,
                        warm_up=[0, args.epochs], runs=2),
        # The first run's: on a CPU the value is the process's high-water mark so far, and
        # the second run comes after the project's.
        "peak_memory_mb": before["peak_memory_mb"],
        "eval_images_per_s": reference_eval(
            cfg, args, device, after["net"], test_images, test_labels
        ),
        **({"profile": before["profile"]} if args.profile else {}),
    }  # fmt: skip
    results = {"reference": results["reference"], "project": results["project"]}
    if args.keras:
        results["keras"] = keras_fit(args, cfg, train_images, train_labels, steps)

    summary = {
        "reference_epoch_s": results["reference"]["epoch_s"],
        "project_epoch_s": results["project"]["epoch_s"],
        "ratio": results["project"]["epoch_s"] / results["reference"]["epoch_s"],
        "keras_epoch_s": results.get("keras", {}).get("epoch_s"),
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": cfg.data.batch_size,
        "steps_per_epoch": steps,
        "epochs": args.epochs,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "keep_freed_memory": args.keep_freed_memory,
        "nvml_probe_skipped": nvml_probe_skipped,
        "overrides": args.overrides,
        "details": results,
    }
    print_table(summary)
    print_json(summary, args.output)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=2, help="the first one is warm-up when >1")
    parser.add_argument("--steps", type=int, default=0, help="train steps per epoch (0: all)")
    parser.add_argument(
        "--precision", help="Lightning's: 32-true, bf16-mixed or 16-mixed (default: the config's)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="memory layout of net and inputs (default: the config's model.channels_last)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the net (default: the config's model.compile)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc keeps freed blocks (cifar_cnn/runtime.py), as train.py sets it",
    )
    parser.add_argument(
        "--skip-nvml-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="without a GPU, no NVML search at each Adam step (cifar_cnn/runtime.py), "
        "as train.py sets it",
    )
    parser.add_argument("--keras", action="store_true", help="add the Keras tutorial (tensorflow)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the last epoch of the project and of the first reference run under "
        "torch.profiler (their times then include its cost) and print where each step's host "
        "time goes, with operations, kernel launches and host-device syncs per step",
    )
    parser.add_argument("--output", help="also write the JSON summary to this file")
    parser.add_argument("overrides", nargs="*", help="train.py config overrides")
    return parser.parse_args()


def compose_config(args: argparse.Namespace) -> DictConfig:
    """conf/train.yaml with the overrides, as train.py composes it, writing into a temp dir."""
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    overrides = [
        *args.overrides,
        f"trainer.accelerator={accelerator}",
        "trainer.devices=1",
        f"trainer.max_epochs={args.epochs}",
        "++trainer.num_sanity_val_steps=0",
    ]
    if args.precision:
        overrides.append(f"trainer.precision={args.precision}")
    if args.steps:
        overrides.append(f"++trainer.limit_train_batches={args.steps}")
    if args.channels_last is not None:
        overrides.append(f"++model.channels_last={args.channels_last}")
    if args.compile is not None:
        overrides.append(f"++model.compile={args.compile}")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    precision = str(cfg.trainer.precision)
    if accelerator == "cpu" and precision == "16-mixed":  # as Lightning does on a CPU
        precision = "bf16-mixed"
    if precision not in AUTOCAST_DTYPES:
        raise SystemExit(
            f"precision {precision}: the plain loop runs {', '.join(AUTOCAST_DTYPES)} only"
        )
    args.precision = precision  # both paths alike
    args.channels_last = bool(cfg.model.get("channels_last", False))
    args.compile = bool(cfg.model.get("compile", False))
    with open_dict(cfg):
        cfg.trainer.precision = precision
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="train_speed-")
        del cfg.hydra
    return cfg


def ready_datamodule(data_cfg: DictConfig, **overrides: Any) -> CIFAR10DataModule:
    """The config's data module (with `overrides` of its settings), decoded and split."""
    datamodule: CIFAR10DataModule = instantiate(data_cfg, **overrides)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def epoch_steps(args: argparse.Namespace, datamodule: CIFAR10DataModule) -> int:
    """Training steps an epoch: --steps, at most the epoch's batches (drop_last as the config
    says); all of them without it."""
    batches = len(datamodule.train_dataloader())
    if not 0 <= args.steps <= batches:
        raise SystemExit(f"--steps {args.steps}: an epoch has {batches} batches")
    return args.steps or batches


def autocast(args: argparse.Namespace, device: torch.device) -> torch.autocast:
    dtype = AUTOCAST_DTYPES[args.precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def reference_loop(
    cfg: DictConfig,
    args: argparse.Namespace,
    device: torch.device,
    images: Tensor,
    labels: Tensor,
    steps: int,
    profile: bool = False,
) -> dict[str, Any]:
    """The fastest plain loop: batches sliced from in-memory tensors by a shuffled permutation,
    augmented as the config says. Only the net, optimizer and data are the config's: no
    schedule, label smoothing or test-time flips (a reference for speed, not accuracy)."""
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = instantiate(cfg.model.net, _convert_="all").to(device, memory_format=memory_format)
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    if args.compile:
        net.compile()  # in place, as ImageClassifier does
    images, labels = images.to(device), labels.to(device)
    # Read once: a DictConfig read costs microseconds, which the loop must not pay every step
    # (the project's data module reads plain attributes).
    batch_size, flip, crop_padding = cfg.data.batch_size, cfg.data.flip, cfg.data.crop_padding
    reset_peak_memory(device)
    epoch_times = []
    profiler = step_profiler(device) if profile else None
    for epoch in range(args.epochs):
        if profiler is not None and epoch == args.epochs - 1:
            profiler.start()
        synchronize(device)
        started = time.perf_counter()
        order = torch.randperm(len(labels), device=device)
        for i in range(steps):
            index = order[i * batch_size : (i + 1) * batch_size]
            batch = augment(to_float_images(images[index]), flip, crop_padding)
            batch = batch.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)  # as Lightning does: before the forward
            with autocast(args, device):
                loss = F.cross_entropy(net(batch), labels[index])
            loss.backward()
            optimizer.step()
        synchronize(device)
        epoch_times.append(time.perf_counter() - started)
    if profiler is not None:
        profiler.stop()
    return {
        "net": net,
        **epoch_timings(epoch_times, steps * batch_size),
        **({"profile": profile_summary(profiler, steps, "reference")} if profiler else {}),
        "epoch_times_s": epoch_times,
        "peak_memory_mb": peak_memory_mb(device),
    }


@torch.inference_mode()
def reference_eval(
    cfg: DictConfig,
    args: argparse.Namespace,
    device: torch.device,
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
) -> float:
    net.eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = images.to(device)
    batch_size = cfg.data.eval_batch_size  # read once, as in reference_loop
    synchronize(device)
    started = time.perf_counter()
    for i in range(0, len(images), batch_size):
        batch = to_float_images(images[i : i + batch_size])
        with autocast(args, device):
            net(batch.contiguous(memory_format=memory_format)).argmax(1)
    synchronize(device)
    return len(images) / (time.perf_counter() - started)


class EpochTimer(L.Callback):
    """Training time of each epoch: from its start to its last batch, validation excluded;
    the last epoch's training under `profiler` when one is given."""

    def __init__(self, profiler: torch.profiler.profile | None = None) -> None:
        self.epoch_times: list[float] = []
        self.validation_s = 0.0
        self.profiler = profiler
        self._profiling = False
        self._started: float | None = None
        self._validation_started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.profiler is not None and trainer.current_epoch == trainer.max_epochs - 1:
            self.profiler.start()
            self._profiling = True
        synchronize(pl_module.device)
        self._started = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_training_part(pl_module)  # the epoch's training ends where validation starts
        self._validation_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_training_part(pl_module)  # an epoch without validation

    def _end_training_part(self, pl_module: L.LightningModule) -> None:
        if self._started is not None:
            synchronize(pl_module.device)
            self.epoch_times.append(time.perf_counter() - self._started)
            self._started = None
            if self._profiling:
                self.profiler.stop()
                self._profiling = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.validation_s += time.perf_counter() - self._validation_started


def project_fit(
    cfg: DictConfig, args: argparse.Namespace, datamodule: CIFAR10DataModule, steps: int
) -> dict[str, Any]:
    """The project's own path: datamodule, module and Trainer from the config, as train.py."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _, model, trainer = build(cfg)
    device = torch.device(args.device)
    timer = EpochTimer(step_profiler(device) if args.profile else None)
    trainer.callbacks.append(timer)
    reset_peak_memory(device)
    trainer.fit(model, datamodule)
    timings = epoch_timings(timer.epoch_times, steps * cfg.data.batch_size)
    if timer.profiler is not None:
        timings["profile"] = profile_summary(timer.profiler, steps, "project")
    started = time.perf_counter()
    trainer.test(model, datamodule, verbose=False)
    synchronize(device)
    return {
        **timings,
        "validation_s_per_epoch": timer.validation_s / args.epochs,
        "eval_images_per_s": len(datamodule.data_test) / (time.perf_counter() - started),
        "peak_memory_mb": peak_memory_mb(device),
    }


def keras_fit(
    args: argparse.Namespace, cfg: DictConfig, images: Tensor, labels: Tensor, steps: int
) -> dict[str, Any]:
    """The tutorial's Keras model and fit() on the same images: the framework to beat on CPU."""
    try:
        import tensorflow as tf
    except ImportError:
        print("keras: tensorflow is not installed (pip install -e '.[bench]'); skipped")
        return {}
    keras = tf.keras
    tf.keras.utils.set_random_seed(cfg.seed)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10),
    ])  # fmt: skip
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.model.optimizer.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch_size = cfg.data.batch_size
    count = min(len(labels), steps * batch_size)
    x = (images[:count].permute(0, 2, 3, 1).float() / 255).numpy()  # NHWC, as Keras wants
    y = labels[:count].numpy()

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epoch_times.append(time.perf_counter() - self.started)

    epoch_times: list[float] = []
    model.fit(x, y, batch_size=batch_size, epochs=args.epochs, verbose=0, callbacks=[Timer()])
    return {**epoch_timings(epoch_times, count), "tensorflow": tf.__version__}


def step_profiler(device: torch.device) -> torch.profiler.profile:
    """A torch.profiler recording host operations, and on a GPU its runtime calls and kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


# How the names of CUDA calls that launch a kernel, and of those that make the host wait for
# the device, begin (the profiler may append an API version).
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel")
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_summary(profiler: torch.profiler.profile, steps: int, path: str) -> dict[str, float]:
    """Prints the operations with the most host time over one profiled epoch of `steps` steps;
    returns per-step counts: aten operations (nested ones included), kernel launches, waits
    for the device (the two that time the epoch included, on both paths), and copies between
    host and device."""
    events = profiler.key_averages()
    print(f"\n{path}: one epoch of {steps} steps under torch.profiler")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))

    def per_step(counted: Callable[[str], bool]) -> float:
        return sum(event.count for event in events if counted(event.key)) / steps

    return {
        "aten_ops_per_step": per_step(lambda name: name.startswith("aten::")),
        "kernel_launches_per_step": per_step(lambda name: name.startswith(KERNEL_LAUNCHES)),
        "host_waits_per_step": per_step(lambda name: name.startswith(HOST_WAITS)),
        "memcpy_per_step": per_step(lambda name: name.startswith("cudaMemcpy")),
    }


def epoch_timings(
    epoch_times: list[float],
    images_per_epoch: int,
    warm_up: list[int] | None = None,
    runs: int = 1,
) -> dict[str, Any]:
    """Seconds per epoch (the mean without the warm-up epochs: by default the first), images
    per second, and the training time of a whole run, warm-up included (over `runs` runs)."""
    warm_up = [0] if warm_up is None else warm_up
    timed = [t for i, t in enumerate(epoch_times) if i not in warm_up] or epoch_times
    epoch_s = sum(timed) / len(timed)
    return {
        "epoch_s": epoch_s,
        "images_per_s": images_per_epoch / epoch_s,
        "train_s": sum(epoch_times) / runs,
        "epoch_times_s": [round(t, 3) for t in epoch_times],
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """The device's peak allocation on CUDA; on CPU, the process's peak resident size so far
    (the decoded data set and whatever ran before included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def print_json(summary: dict[str, Any], output: str | Path | None) -> None:
    """The result as one JSON line, printed last, and written to `output` when given."""
    line = json.dumps(summary)
    if output:
        Path(output).write_text(line + "\n")
    print(line)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n{summary['device']}, torch {summary['torch']}, {summary['threads']} threads, "
          f"batch {summary['batch_size']}, {summary['steps_per_epoch']} steps/epoch, "
          f"precision {summary['precision']}, channels_last {summary['channels_last']}, "
          f"compile {summary['compile']}")  # fmt: skip
    print(f"{'path':<10} {'epoch s':>9} {'all epochs s':>13} {'train img/s':>12} "
          f"{'eval img/s':>11} {'peak MB':>9}")  # fmt: skip
    for name, timings in summary["details"].items():
        if timings:
            print(
                f"{name:<10} {timings['epoch_s']:>9.2f} {timings['train_s']:>13.1f} "
                f"{timings['images_per_s']:>12.0f} "
                f"{timings.get('eval_images_per_s', float('nan')):>11.0f} "
                f"{timings.get('peak_memory_mb', float('nan')):>9.0f}"
            )
    print(f"ratio project/reference: {summary['ratio']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
