"""Export speed: export time, file sizes, and CPU evaluation images/s of the exported models
(onnxruntime, TorchScript) against PyTorch, for the tutorial net and FastCNN, in one process.

python benchmarks/export_speed.py                          # both nets, 2,048 test images
python benchmarks/export_speed.py --images 10000           # the whole test set
python benchmarks/export_speed.py --images 64 --rounds 1   # a smoke run
python benchmarks/export_speed.py --no-tta                 # FastCNN without its six passes

Each net is built from its config (conf/model/) with its initial weights: speed does not depend
on the weights. The exported files are export.py's (cifar_cnn/export.py): uint8 images in,
scaling and test-time augmentation inside. The last line printed is one JSON object (also
written to --output when given).
"""

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from torch import Tensor

from cifar_cnn.export import (
    OPSET,
    DeployableNet,
    OnnxClassifier,
    export_onnx,
    export_torchscript,
    torchscript_runner,
)
from cifar_cnn.prediction import predict_logits
from cifar_cnn.resolvers import register_resolvers
from cifar_cnn.runtime import silence_known_warnings

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
NETS = {"tutorial": "tutorial_cnn", "fast": "fast_cnn"}  # name: conf/model option
PATHS = ("pytorch", "onnxruntime", "torchscript")


def main() -> None:
    args = parse_args()
    register_resolvers()
    silence_known_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = test_images(args.overrides)[: args.images]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, option in NETS.items():
            results[name] = measure(name, option, images, args, Path(folder))
    summary = {
        "images": len(images),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "tta": args.tta,
        "opset": OPSET,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "nets": results,
    }
    print_table(summary)
    line = json.dumps(summary)
    if args.output:
        Path(args.output).write_text(line + "\n")
    print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # FastCNN's six passes an image make the whole test set minutes a path on a small CPU.
    parser.add_argument("--images", type=int, default=2048, help="test images to evaluate")
    parser.add_argument("--batch-size", type=int, default=256, help="eval.py's batch size")
    parser.add_argument("--rounds", type=int, default=2, help="each path's evaluations, in turn")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the nets' test-time augmentation (export.py's default) or leave it out",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--output", help="also write the JSON summary to this file")
    parser.add_argument("overrides", nargs="*", help="conf/train.yaml overrides (data.*)")
    return parser.parse_args()


def test_images(overrides: list[str]) -> Tensor:
    """The test set's uint8 images, read as train.py reads them (CIFAR10_DIR, decode cache)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule.data_test.images


def measure(
    name: str, option: str, images: Tensor, args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    """One net: both exports timed, then the three paths evaluated in turn, `rounds` times."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={option}"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    tta = {"flip": args.tta and model.hparams.flip_tta,
           "translate": args.tta and model.hparams.translate_tta}  # fmt: skip
    if not args.tta:  # eval.py's path without test-time augmentation too
        model.hparams.flip_tta = model.hparams.translate_tta = False
    net = DeployableNet(model.net, **tta).eval()
    onnx_path, script_path = folder / f"{name}.onnx", folder / f"{name}.pt"
    started = time.perf_counter()
    export_onnx(net, images[:2], onnx_path, Path(name))
    onnx_s = time.perf_counter() - started
    started = time.perf_counter()
    export_torchscript(net, images[:2], script_path, Path(name))
    script_s = time.perf_counter() - started

    device = torch.device("cpu")
    paths: dict[str, Callable[[Tensor], Tensor]] = {
        "pytorch": lambda batch: predict_logits(model, batch, args.batch_size, device),
        "onnxruntime": OnnxClassifier(onnx_path, args.batch_size),
        "torchscript": torchscript_runner(script_path),
    }
    seconds = dict.fromkeys(PATHS, 0.0)
    logits = {}
    for run in paths.values():  # warm-up: first calls allocate and optimise
        run(images[: args.batch_size])
    for _ in range(args.rounds):
        for path, run in paths.items():
            started = time.perf_counter()
            with torch.inference_mode():
                logits[path] = torch.cat([run(b) for b in images.split(args.batch_size)])
            seconds[path] += time.perf_counter() - started
    reference = logits["pytorch"]
    return {
        "parameters": sum(p.numel() for p in model.net.parameters()),
        "passes_per_image": (2 if tta["flip"] else 1) * (3 if tta["translate"] else 1),
        "export_s": {"onnx": onnx_s, "torchscript": script_s},
        "file_mb": {
            "onnx": onnx_path.stat().st_size / 2**20,
            "torchscript": script_path.stat().st_size / 2**20,
        },
        "images_per_s": {p: args.rounds * len(images) / seconds[p] for p in PATHS},
        "max_abs_logit_difference": {
            p: (logits[p] - reference).abs().max().item() for p in PATHS[1:]
        },
        "top1_agreement": {
            p: (logits[p].argmax(1) == reference.argmax(1)).float().mean().item() for p in PATHS[1:]
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"{summary['images']} test images, batch {summary['batch_size']}, {summary['rounds']} "
        f"rounds; {summary['cpu']}, torch {summary['torch']} ({summary['torch_threads']} "
        f"threads), onnxruntime {summary['onnxruntime']}, opset {summary['opset']}"
    )
    header = (
        f"{'net':<9}{'passes':>7}{'export s onnx/ts':>18}{'MB onnx/ts':>13}"
        f"{'images/s pytorch':>18}{'onnxruntime':>13}{'torchscript':>13}{'ort/pt':>8}"
    )
    print(header)
    for name, r in summary["nets"].items():
        rate = r["images_per_s"]
        print(
            f"{name:<9}{r['passes_per_image']:>7}"
            f"{r['export_s']['onnx']:>11.2f} / {r['export_s']['torchscript']:<4.2f}"
            f"{r['file_mb']['onnx']:>7.2f} / {r['file_mb']['torchscript']:<4.2f}"
            f"{rate['pytorch']:>17.0f}{rate['onnxruntime']:>13.0f}{rate['torchscript']:>13.0f}"
            f"{rate['onnxruntime'] / rate['pytorch']:>8.2f}"
        )


if __name__ == "__main__":
    main()
