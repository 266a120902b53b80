"""The LightningModule: trains any classifier net with cross-entropy and tracks accuracy."""

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of the net described by `net`, with the optimizer `optimizer`.

    Both arguments are plain `_target_` mappings (Hydra's instantiate format), not objects:
    the checkpoint then stores them as plain values, so `ImageClassifier.load_from_checkpoint`
    rebuilds the module from the file alone, and `torch.load(..., weights_only=True)` opens it.
    """

    def __init__(
        self, net: Mapping[str, Any], optimizer: Mapping[str, Any], num_classes: int = 10
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = instantiate(net)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def on_train_start(self) -> None:
        # The sanity check's few validation batches must not count towards the best accuracy.
        self.val_acc.reset()
        self.val_acc_best.reset()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        logits, labels = self(batch[0]), batch[1]
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)  # forward(), not update(): the per-step value is logged too
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Optimizer:
        make_optimizer = instantiate(self.hparams.optimizer)  # a `_partial_` config
        return make_optimizer(params=self.parameters())

    def _evaluate(
        self, batch: tuple[Tensor, Tensor], split: str, accuracy: MulticlassAccuracy
    ) -> None:
        logits, labels = self(batch[0]), batch[1]
        accuracy.update(logits, labels)
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), prog_bar=split == "val")
        self.log(f"{split}/acc", accuracy, prog_bar=split == "val")
