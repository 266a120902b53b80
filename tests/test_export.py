"""export.py's code path on briefly trained runs of both nets, checked on real test images."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from cifar_cnn.checkpoints import load_checkpoint, resolve_checkpoint
from cifar_cnn.data import CLASSES, CIFAR10DataModule
from cifar_cnn.errors import UserError
from cifar_cnn.evaluation import evaluate
from cifar_cnn.export import OPSET, DeployableNet, export, torchscript_runner
from cifar_cnn.training import train

from .conftest import compose_in

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 10
TEST_IMAGES = PER_CLASS * len(CLASSES)
ALL_AGREE = {"images": TEST_IMAGES, "agreeing": TEST_IMAGES}
TINY_RUN = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "data.batch_size=32",
]
NETS = {
    "tutorial": ["trainer.precision=32-true"],
    # With its test-time augmentation (flips and shifts), trained in bf16: exported in float32.
    "fast": ["model=fast_cnn", "model.net.widths=[8,16,16]", "trainer.precision=bf16-mixed"],
}


@pytest.fixture(scope="module")
def real_subset(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first PER_CLASS real images of each class and split: the export's checks run on
    every test image, and 10,000 through FastCNN's six passes would take minutes here."""
    root = tmp_path_factory.mktemp("cifar-subset")
    for split in ("train", "test"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for image in sorted((data_dir / split / name).iterdir())[:PER_CLASS]:
                shutil.copyfile(image, root / split / name / image.name)
    return root


@pytest.fixture(scope="module")
def runs(
    real_subset: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A run folder for each net, trained for a few batches."""
    folders = {}
    for name, overrides in NETS.items():
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        cfg = compose_in("train", [*TINY_RUN, *overrides, f"data.data_dir={real_subset}"],
                         run_dir, cache_dir)  # fmt: skip
        train(cfg)
        folders[name] = run_dir
    return folders


@pytest.fixture(scope="module")
def subset_images(real_subset: Path, cache_dir: Path) -> torch.Tensor:
    datamodule = CIFAR10DataModule(real_subset, cache_dir)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule.data_test.images


def run_export(run_dir: Path, data_dir: Path, cache_dir: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_in(
        "export", [f"ckpt_path={run_dir}", f"data.data_dir={data_dir}", *overrides], out, cache_dir
    )
    return export(cfg)


def eager_logits(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's logits as eval.py computes them in float32, test-time augmentation on."""
    model = load_checkpoint(resolve_checkpoint(run_dir)).model
    with torch.inference_mode():
        return model(images.float() / 255)


@pytest.mark.slow  # the ONNX exporter takes seconds a net
@pytest.mark.parametrize("net", NETS)
def test_onnx_export_matches_pytorch_and_describes_its_input(
    net: str, runs: dict[str, Path], subset_images: torch.Tensor, real_subset: Path,
    cache_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    description = run_export(runs[net], real_subset, cache_dir, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text()) == description
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]  # one file

    model = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain == ""] == [OPSET]
    assert description["opset"] == OPSET and description["computes_in"] == "float32"
    assert description["trained_in"] == ("bf16-mixed" if net == "fast" else "32-true")
    assert description["input"]["dtype"] == "uint8" and description["classes"][0] == "airplane"
    assert description["test_time_augmentation"] == {"flip": net == "fast",
                                                     "translate": net == "fast"}  # fmt: skip
    checks = description["checks"]
    assert checks["onnx_checker"] == "passed"
    assert max(checks["max_abs_logit_difference"].values()) <= 1e-4
    assert checks["top1_agreement"] == ALL_AGREE

    session = onnxruntime.InferenceSession(tmp_path / "model.onnx")
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    for size in (1, 7):
        images = subset_images[40 : 40 + size]
        (exported,) = session.run(None, {"images": images.numpy()})
        assert exported.dtype == "float32" and exported.shape == (size, 10)
        expected = eager_logits(runs[net], images)
        assert torch.from_numpy(exported).sub(expected).abs().max() <= 1e-4


@pytest.mark.parametrize("net", NETS)
def test_torchscript_export_matches_pytorch(
    net: str, runs: dict[str, Path], subset_images: torch.Tensor, real_subset: Path,
    cache_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    description = run_export(runs[net], real_subset, cache_dir, tmp_path, "format=torchscript")
    assert description["file"] == "model.pt" and "opset" not in description
    assert description["checks"]["top1_agreement"] == ALL_AGREE

    loaded = torchscript_runner(tmp_path / "model.pt")
    for size in (1, 7):
        images = subset_images[80 : 80 + size]
        with torch.inference_mode():
            exported = loaded(images)
        assert exported.sub(eager_logits(runs[net], images)).abs().max() <= 1e-4


def test_test_time_augmentation_can_be_left_out(
    runs: dict[str, Path], subset_images: torch.Tensor, real_subset: Path, cache_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    description = run_export(runs["fast"], real_subset, cache_dir, tmp_path, "format=torchscript",
                             "tta=false")  # fmt: skip
    assert description["test_time_augmentation"] == {"flip": False, "translate": False}
    net = load_checkpoint(resolve_checkpoint(runs["fast"])).model.net
    images = subset_images[:7]
    with torch.inference_mode():
        one_pass = net(images.float() / 255)
        exported = torchscript_runner(tmp_path / "model.pt")(images)
        with_tta = DeployableNet(net, flip=True, translate=True)(images)
    assert exported.sub(one_pass).abs().max() <= 1e-4
    assert with_tta.sub(one_pass).abs().max() > 1e-3


@pytest.mark.slow  # exports to ONNX
def test_predict_with_the_onnx_file_writes_the_checkpoints_csv(
    runs: dict[str, Path], real_subset: Path, cache_dir: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(9):
        pixels = torch.randint(0, 256, (40 + i, 50, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(photos / f"{i}.png")
    run_export(runs["tutorial"], real_subset, cache_dir, tmp_path / "export")

    def predict(ckpt_path: Path, out: Path) -> str:
        overrides = [f"ckpt_path={ckpt_path}", f"predict={photos}", "device=cpu"]
        assert evaluate(compose_in("eval", overrides, out, cache_dir)) == {"predictions": 9}
        return (out / "predictions.csv").read_text()

    from_checkpoint = predict(runs["tutorial"], tmp_path / "checkpoint")
    assert predict(tmp_path / "export" / "model.onnx", tmp_path / "onnx") == from_checkpoint


def test_files_that_cannot_be_exported_are_named(
    runs: dict[str, Path], real_subset: Path, cache_dir: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint")
    with pytest.raises(UserError, match=f"{notes} is not a checkpoint file"):
        run_export(notes, real_subset, cache_dir, tmp_path / "notes")

    content = bytearray(resolve_checkpoint(runs["tutorial"]).read_bytes())
    middle = len(content) // 2
    content[middle : middle + 64] = bytes(b ^ 0xFF for b in content[middle : middle + 64])
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(content)
    with pytest.raises(UserError, match=f"{damaged} is damaged"):
        run_export(damaged, real_subset, cache_dir, tmp_path / "damaged", "format=torchscript")

    with pytest.raises(UserError, match="format=tflite is not a format: use format=onnx or"):
        run_export(runs["tutorial"], real_subset, cache_dir, tmp_path / "tflite", "format=tflite")
    with pytest.raises(UserError, match="tta='no' is not allowed: it must be true or false"):
        run_export(runs["tutorial"], real_subset, cache_dir, tmp_path / "tta", "tta=no")


def test_eval_names_an_onnx_file_it_cannot_use(cache_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "red").save(photo)
    cfg = compose_in("eval", [f"ckpt_path={broken}", f"predict={photo}"], tmp_path, cache_dir)
    with pytest.raises(UserError, match=f"{broken} is not a readable ONNX model"):
        evaluate(cfg)
    cfg = compose_in("eval", [f"ckpt_path={broken}"], tmp_path, cache_dir)
    with pytest.raises(UserError, match=f"ckpt_path={broken} is an exported model: eval.py"):
        evaluate(cfg)


@pytest.mark.slow  # starts export.py processes
def test_export_py_prints_its_checks_and_explains_bad_checkpoints(
    runs: dict[str, Path], real_subset: Path, tmp_path: Path
) -> None:
    def export_py(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "export.py"), f"data.data_dir={real_subset}",
                   *overrides]  # fmt: skip
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    result = export_py(f"ckpt_path={runs['tutorial']}", "format=torchscript",
                       f"hydra.run.dir={tmp_path}/ts")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    agreement = f"on the {TEST_IMAGES} test images: {TEST_IMAGES} (100.00%)"
    assert f"Top-1 agreement with PyTorch {agreement}" in result.stdout + result.stderr
    assert (tmp_path / "ts" / "model.pt").is_file() and (tmp_path / "ts" / "export.log").is_file()

    missing = tmp_path / "nowhere.ckpt"
    result = export_py(f"ckpt_path={missing}", f"hydra.run.dir={tmp_path}/m")
    assert result.returncode == 1
    assert f"checkpoint {missing} does not exist" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
