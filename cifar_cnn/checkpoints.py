"""Finding and safely loading checkpoints of `ImageClassifier`.

Checkpoints are read with torch's weights-only unpickler: a file can hold only tensors and
plain values, so opening one runs no code from it. Ours need nothing more.
"""

import glob
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.errors import InstantiationException
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.errors import UserError
from cifar_cnn.files import read_record, unwritable_message, written_then_renamed
from cifar_cnn.module import ImageClassifier


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, then renames it into place: a run killed
    while saving leaves the previous checkpoint intact, never a half-written one. A write that
    fails (a full disk) stops the run with a message; the previous checkpoint stays whole."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        try:
            with written_then_renamed(path) as partial:
                super().save_checkpoint(checkpoint, partial, storage_options)
        except OSError as error:  # Lightning writes the file with Python: errno is kept
            raise UserError(unwritable_message(f"checkpoint {path}", error) + (
                f"; the run's earlier checkpoints are kept whole: free space, then continue "
                f"it with python train.py ckpt_path={_run_of(path)}"
            )) from error  # fmt: skip


def _run_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint in its checkpoints/ folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


# What zipfile raises on a damaged archive's headers (a changed compression method, sizes or
# offsets that point nowhere, a name that is not text), besides BadZipFile.
DAMAGED_ZIP = (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError,
               OverflowError, struct.error)  # fmt: skip


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best one of a run folder (else its last.ckpt)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    record = read_record(path / "metrics.json") or {}
    name = Path(record.get("best_checkpoint") or "").name
    # A finished run names its best checkpoint: looked up by name in the run folder, which
    # may have moved, and where Lightning's own checkpoint callback saves (run without ours).
    for best in (folder / name, *sorted(path.rglob(glob.escape(name)))) if name else ():
        if best.is_file():
            return best
    candidates = sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt")
    if len(candidates) == 1:
        return candidates[0]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    if candidates:
        raise UserError(
            f"{folder} holds several checkpoints and no record of the best: name one of "
            + ", ".join(p.name for p in candidates)
        )
    raise UserError(f"no checkpoint in {folder}: a run folder keeps them in checkpoints/*.ckpt")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The content of an ImageClassifier checkpoint, read weights-only."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    # torch.save writes zip archives; on other files (a config, a CSV) the unpickler fails with
    # a KeyError or IndexError that names nothing.
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path} is not a checkpoint file: torch.save writes zip archives, and this is none "
            "(or one cut short)"
        )
    try:  # torch.load does not check the parts' checksums: damaged bytes would load as weights
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except DAMAGED_ZIP as error:
        raise UserError(f"{path} is not a readable checkpoint ({_reason(error)})") from error
    if damaged:
        raise UserError(
            f"{path} is damaged: its part {damaged} fails its checksum (a disk or copy error); "
            "use another of the run's checkpoints (a resume reads last.ckpt: copy an "
            "epoch_NNN.ckpt over it to go on from that epoch)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise UserError(f"{path} is not a readable checkpoint ({_reason(error)})") from error
    hyperparameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hyperparameters, dict)
        or not {"net", "optimizer"} <= hyperparameters.keys()
        or "precision" not in checkpoint  # ImageClassifier.on_save_checkpoint records it
    ):
        raise UserError(f"{path} is not a checkpoint of cifar_cnn's ImageClassifier")
    return checkpoint


class LoadedCheckpoint(NamedTuple):
    """What eval.py takes from a checkpoint."""

    model: ImageClassifier  # on the CPU, in eval mode
    data_settings: dict[str, Any]  # the data module's arguments in the run
    precision: str  # the run's, as Lightning names it: "32-true", "bf16-mixed", ...
    validation_digest: str | None  # of the run's validation images


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """The classifier saved in `path`, with the run's data settings and precision."""
    checkpoint = read_checkpoint(path)
    try:
        # Not compiled, whatever the training did: evaluation should not wait for a compiler.
        model = ImageClassifier.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, compile=False
        )
    except (
        RuntimeError,
        KeyError,
        TypeError,
        ValueError,
        ImportError,
        InstantiationException,
    ) as error:
        raise UserError(
            f"{path} does not load as the model it describes ({_reason(error)})"
        ) from error
    return LoadedCheckpoint(
        model.eval(),
        checkpoint.get("datamodule_hyper_parameters", {}),
        checkpoint["precision"],
        validation_digest(checkpoint),
    )


def validation_digest(checkpoint: dict[str, Any]) -> str | None:
    """The digest of the run's validation images; None in a checkpoint saved without its
    data module (`Trainer.save_checkpoint` outside a fit)."""
    return checkpoint.get(CIFAR10DataModule.__qualname__, {}).get("validation_digest")


def _reason(error: Exception) -> str:
    """The line of torch's message that says why: which class the weights-only unpickler
    refused, if that was it (not torch's advice to load the file unsafely)."""
    lines = str(error).splitlines()
    refused = [line.strip() for line in lines if "WeightsUnpickler error" in line]
    return (refused or lines or [type(error).__name__])[0]
