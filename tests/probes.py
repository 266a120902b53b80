"""Callbacks that tests add to real runs from the command line (`+callbacks.<name>._target_=`)."""

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class ShardProbe(L.Callback):
    """Writes `shard_rank<R>.json` in the run folder: for each training step, a fingerprint
    of each image its process trained on (the sum of its 8-bit pixel values)."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images, _ = batch  # floats in [0, 1]
        fingerprints = (images * 255).round().to(torch.int64).sum(dim=(1, 2, 3))
        self.steps.append(sorted(fingerprints.tolist()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / f"shard_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))
