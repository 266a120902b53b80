"""The LightningModule: trains any classifier net with cross-entropy and tracks accuracy."""

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of the net described by `net`, with the optimizer `optimizer`.

    Both arguments are plain `_target_` mappings (Hydra's instantiate format), not objects:
    the checkpoint then stores them as plain values, so `ImageClassifier.load_from_checkpoint`
    rebuilds the module from the file alone, and `torch.load(..., weights_only=True)` opens it.
    Since a checkpoint names the classes that loading it builds, only an `nn.Module` net and a
    torch `Optimizer` are accepted, and nested `_target_`s are not built.
    """

    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _require_subclass(net, nn.Module)
        _require_subclass(optimizer, Optimizer)
        if scheduler is not None:
            _require_subclass(scheduler, LRScheduler)
        self.net = instantiate(net, _recursive_=False, _convert_="all")
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints: a resumed run keeps its best

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # its few batches before training are no result
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:
        make_optimizer = instantiate(self.hparams.optimizer)  # a `_partial_` config
        optimizer = make_optimizer(params=self.parameters())
        if self.hparams.scheduler is None:
            return optimizer
        # A `_partial_` schedule stepped every batch; told the run's length where it takes one.
        make_scheduler = instantiate(self.hparams.scheduler)
        length = {"total_steps": self.trainer.estimated_stepping_batches}
        if "total_steps" not in inspect.signature(make_scheduler).parameters:
            length = {}
        scheduler = make_scheduler(optimizer, **length)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        """Loss and accuracy of one batch, logged as `<split>/loss` and `<split>/acc`."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = getattr(self, f"{split}_acc")
        accuracy(logits, labels)  # forward(), not update(): training logs per-step values too
        per_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=per_step, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}/acc", accuracy, on_step=per_step, on_epoch=True, prog_bar=split == "val")
        return loss


def _require_subclass(config: Mapping[str, Any], base: type) -> None:
    """Refuses a `_target_` that is not a subclass of `base` (a function, say)."""
    module_name, _, name = str(config["_target_"]).rpartition(".")
    target = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(target, type) and issubclass(target, base)):
        raise ValueError(f"_target_ {config['_target_']} is not a {base.__name__} class")
