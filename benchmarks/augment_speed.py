"""Augmentation cost per training batch: each policy of conf/augment applied image by image
(how the data module draws per image), against one call on the whole batch (one draw for
every image), and the flips and shifts alone; in one process, rounds interleaved.

python benchmarks/augment_speed.py                       # batches of 64, the tutorial's
python benchmarks/augment_speed.py --batch-size 1024     # the fast recipe's
python benchmarks/augment_speed.py --rounds 2            # a smoke run

Synthetic images: the cost does not depend on the pixels. The last line printed is one JSON
object (also written to --output when given).
"""

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from cifar_cnn.data.augmentation import BatchMix, ImagePolicy, augment

CONF = Path(__file__).resolve().parents[1] / "conf" / "augment"


def policies() -> dict[str, dict]:
    """conf/augment's options, by name, as the data module receives them."""
    configs = {}
    for path in sorted(CONF.glob("*.yaml")):
        config = OmegaConf.load(path)
        if "num_classes" in config:  # ${model.num_classes} in a training config
            config.num_classes = 10
        configs[path.stem] = OmegaConf.to_container(config)
    return configs


def time_ms(apply: Callable[[], object]) -> float:
    """One call's time, in milliseconds."""
    started = time.perf_counter()
    apply()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    images: Tensor = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8) / 255
    labels = torch.randint(0, 10, (args.batch_size,))
    timings: dict[str, Callable[[], object]] = {
        "flip_and_shift_4": lambda: augment(images, flip=True, padding=4)
    }
    for name, config in policies().items():
        if config["_target_"].endswith(("MixUp", "CutMix")):
            mix = BatchMix({name: config})
            timings[name] = lambda mix=mix: mix(images, labels)
        else:
            policy = ImagePolicy({name: config})
            timings[name] = lambda policy=policy: policy(images)
            timings[f"{name}_one_draw_per_batch"] = lambda t=policy.transform: t(images)
    for apply in timings.values():  # warm-up
        apply()
    results: dict[str, list[float]] = {name: [] for name in timings}
    for _ in range(args.rounds):  # interleaved: the machine's noise falls on all alike
        for name, apply in timings.items():
            results[name].append(time_ms(apply))
    summary = {
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "ms_per_batch": {name: round(sorted(v)[len(v) // 2], 3) for name, v in results.items()},
    }
    for name, ms in summary["ms_per_batch"].items():
        print(f"{name:40s} {ms:9.3f} ms per batch of {args.batch_size}")
    line = json.dumps(summary)
    if args.output:
        args.output.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
