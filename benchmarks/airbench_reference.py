"""airbench's own code trained on this project's data: the yardstick for `experiment=fast`.

Runs `train94` of the `airbench` package (Keller Jordan's cifar10-airbench; 94.01% on the
official CIFAR-10, mean of its author's 1,000 runs) unchanged, on the images that
`python train.py experiment=fast` reads (the project's decoded cache). Whatever separates the
two accuracies is then the recipes' code, not the data. airbench trains on all 50,000
training images for 9.9 epochs and tests with flip and translate test-time augmentation.

python benchmarks/airbench_reference.py --runs 3               # on the GPU, as airbench runs
python benchmarks/airbench_reference.py --device cpu --runs 1  # float32, slow (tens of minutes)

Needs `pip install -e ".[bench]"`. airbench is written for CUDA (fp16 net, CUDA events):
on the CPU the net is its `make_net94` without `.half().cuda()`, the loaders hold float32
images, and the timing events read the host clock; the training code is airbench's.
The last line printed is one JSON object (also written to --output when given).
"""

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from train_speed import device_name, print_json, synchronize  # the sibling, on sys.path

from cifar_cnn.resolvers import register_resolvers
from cifar_cnn.runtime import silence_known_warnings

try:
    import airbench.lib_airbench94 as airbench94
    import airbench.utils as airbench_utils
except ImportError as error:
    raise SystemExit(f"{error}: install the benchmark extra, pip install -e '.[bench]'") from error

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    args = parse_args()
    register_resolvers()  # conf/ uses them; train.py registers them the same way
    silence_known_warnings()  # as train.py: library notices known to be harmless
    device = torch.device(args.device)
    if device.type == "cpu":
        run_on_cpu()
    previous_dir = Path.cwd()
    with tempfile.TemporaryDirectory() as work:
        # airbench reads <path>/train.pt and its test set from ./cifar10/test.pt.
        write_airbench_data(Path(work) / "cifar10", args.overrides)
        os.chdir(work)
        try:
            train_loader = airbench_utils.CifarLoader(
                "cifar10", train=True, batch_size=1024, aug=airbench94.hyp["aug"], altflip=True
            )
            test_loader = airbench_utils.CifarLoader("cifar10", train=False, batch_size=2000)
            make_net = make_net_cpu if device.type == "cpu" else airbench94.make_net94
            airbench94.train94(train_loader, make_net=make_net, run=-1)  # its warm-up step
            runs = [train_once(seed, args.epochs, train_loader, test_loader, make_net, device)
                    for seed in range(args.runs)]  # fmt: skip
        finally:
            os.chdir(previous_dir)  # the temporary folder goes; relative paths work again
    accuracies = torch.tensor([run["tta_acc"] for run in runs], dtype=torch.float64)
    summary = {
        "device": device_name(device),
        "torch": torch.__version__,
        "airbench": version("airbench"),
        "epochs": args.epochs,
        "runs": runs,
        "tta_acc_mean": accuracies.mean().item(),
        "tta_acc_std": accuracies.std().item() if len(runs) > 1 else 0.0,
        "train_s_mean": sum(run["train_s"] for run in runs) / len(runs),
    }
    print_json(summary, args.output)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    # "cuda", not "cuda:N": airbench puts everything on the first GPU.
    parser.add_argument("--device", choices=("cuda", "cpu"), default=default_device)
    parser.add_argument("--runs", type=int, default=3, help="seeds 0..runs-1")
    parser.add_argument("--epochs", type=float, default=airbench94.hyp["opt"]["train_epochs"])
    parser.add_argument("--output", type=Path, help="also write the JSON line to this file")
    parser.add_argument("overrides", nargs="*", help="train.py overrides that pick the data")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, not {args.runs}")
    return args


def write_airbench_data(folder: Path, overrides: list[str]) -> None:
    """The project's training and test images, as airbench's train.pt and test.pt.

    All 50,000 training images (`val_fraction=0`), in the data module's seeded random order:
    the cache holds them class by class, and airbench whitens its stem from the first 5,000
    it is given (a random mix in the official files)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=["experiment=fast", "data.val_fraction=0", *overrides])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    folder.mkdir(parents=True)
    for split, dataset in (("train", datamodule.data_train), ("test", datamodule.data_test)):
        images = dataset.images.permute(0, 2, 3, 1)  # airbench's (N, H, W, C) uint8
        data = {"images": images, "labels": dataset.labels, "classes": list(range(10))}
        torch.save(data, folder / f"{split}.pt")


def train_once(
    seed: int,
    epochs: float,
    train_loader: airbench_utils.CifarLoader,
    test_loader: airbench_utils.CifarLoader,
    make_net: Callable[[], nn.Module],
    device: torch.device,
) -> dict[str, Any]:
    """One airbench run: the wall time of its `train94` call (building the net, loading the
    test set, whitening the stem, training) and the test accuracy with its test-time
    augmentation."""
    torch.manual_seed(seed)
    synchronize(device)
    started = time.perf_counter()
    model = airbench94.train94(train_loader, epochs=epochs, make_net=make_net, verbose=False)
    synchronize(device)
    train_s = time.perf_counter() - started
    tta_level = airbench94.hyp["net"]["tta_level"]  # flips and 1-pixel shifts
    tta_acc = airbench_utils.evaluate(model, test_loader, tta_level=tta_level)
    print(f"seed {seed}: test accuracy {tta_acc:.4f}, training {train_s:.2f} s", flush=True)
    return {"seed": seed, "tta_acc": tta_acc, "train_s": train_s}


def make_net_cpu() -> nn.Sequential:
    """airbench's make_net94, in float32 on the CPU: a 2x2 stem of 2 * 3 * 2 * 2 = 24 whitening
    filters, then its three conv groups and head."""
    widths, momentum = airbench94.hyp["net"]["widths"], airbench94.hyp["net"]["batchnorm_momentum"]
    net = nn.Sequential(
        airbench94.Conv(3, 24, 2, padding=0, bias=True),
        nn.GELU(),
        airbench94.ConvGroup(24, widths["block1"], momentum),
        airbench94.ConvGroup(widths["block1"], widths["block2"], momentum),
        airbench94.ConvGroup(widths["block2"], widths["block3"], momentum),
        nn.MaxPool2d(3),
        airbench94.Flatten(),
        nn.Linear(widths["block3"], 10, bias=False),
        airbench94.Mul(airbench94.hyp["net"]["scaling_factor"]),
    )
    net[0].weight.requires_grad = False
    return net.to(memory_format=torch.channels_last)


def run_on_cpu() -> None:
    """airbench's loaders and timers on the CPU, in float32 (its code assumes CUDA)."""

    class CpuCifarLoader(airbench_utils.CifarLoader):
        def __init__(self, path: str, *args: Any, gpu: Any = None, **kwargs: Any) -> None:
            super().__init__(path, *args, gpu="cpu", **kwargs)
            self.images = self.images.float()

    class HostClockEvent:
        def __init__(self, enable_timing: bool = True) -> None:
            self.time = 0.0

        def record(self) -> None:
            self.time = time.perf_counter()

        def elapsed_time(self, end: "HostClockEvent") -> float:
            return 1e3 * (end.time - self.time)

    airbench_utils.CifarLoader = CpuCifarLoader  # train() builds its own test loader
    torch.cuda.Event = HostClockEvent
    torch.cuda.synchronize = lambda *args: None


if __name__ == "__main__":
    main()
