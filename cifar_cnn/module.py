"""The LightningModule: trains any classifier net with cross-entropy and tracks accuracy."""

import importlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of the net described by `net`, with the optimizer `optimizer`.

    Both arguments are plain `_target_` mappings (Hydra's instantiate format), not objects:
    the checkpoint then stores them as plain values, so `ImageClassifier.load_from_checkpoint`
    rebuilds the module from the file alone, and `torch.load(..., weights_only=True)` opens it.
    Since a checkpoint names the classes that loading it builds, only an `nn.Module` net and a
    torch `Optimizer` are accepted, and nested `_target_`s are not built.

    The other arguments are off by default (the seed's training): `label_smoothing` of the
    training loss (validation and test report the plain cross-entropy); `flip_tta`, logits
    averaged over each image and its mirror whenever the module is in eval mode (validation,
    test, eval.py); `channels_last`, the net's and inputs' memory layout (faster convs on CPUs
    and GPUs); `norm_bias_lr_scale`, a learning rate that many times larger for BatchNorm
    biases, with weight decay as many times smaller so that the decay per step stays the same.
    """

    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        flip_tta: bool = False,
        channels_last: bool = False,
        norm_bias_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _require_subclass(net, nn.Module)
        _require_subclass(optimizer, Optimizer)
        if scheduler is not None:
            _require_subclass(scheduler, LRScheduler)
        self.net = instantiate(net, _recursive_=False, _convert_="all")
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints: a resumed run keeps its best

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.net(images)  # (N, classes)
        if self.hparams.flip_tta and not self.training:
            logits = (logits + self.net(images.flip(3))) / 2
        return logits

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
        optimizer = make_optimizer(params=self._parameter_groups())
        if self.hparams.norm_bias_lr_scale != 1:
            norm_biases = optimizer.param_groups[1]
            norm_biases["lr"] *= self.hparams.norm_bias_lr_scale
            norm_biases["weight_decay"] /= self.hparams.norm_bias_lr_scale
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
        smoothing = self.hparams.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        accuracy = getattr(self, f"{split}_acc")
        accuracy(logits, labels)  # forward(), not update(): training logs per-step values too
        per_step = split == "train"
        # DDP: the accuracies are torchmetrics, which sum over processes themselves; the
        # evaluation losses are averaged over processes too, once per epoch. The training loss
        # stays each process's own (a sync every step would cost more than it tells).
        self.log(
            f"{split}/loss", loss, on_step=per_step, on_epoch=True, prog_bar=split != "test",
            sync_dist=not per_step,
        )  # fmt: skip
        self.log(f"{split}/acc", accuracy, on_step=per_step, on_epoch=True, prog_bar=split == "val")
        return loss

    def _parameter_groups(self) -> Iterator[nn.Parameter] | list[dict[str, Any]]:
        """All parameters, or with `norm_bias_lr_scale`: [the others, the BatchNorm biases]."""
        if self.hparams.norm_bias_lr_scale == 1:
            return self.parameters()
        # _BatchNorm: also the SyncBatchNorm layers that DDP's sync_batchnorm swaps in.
        norms = [m for m in self.net.modules() if isinstance(m, _BatchNorm) and m.affine]
        if not norms:
            raise ValueError(
                f"norm_bias_lr_scale={self.hparams.norm_bias_lr_scale} needs a net with "
                "BatchNorm layers; this one has none (set it to 1)"
            )
        norm_biases = [norm.bias for norm in norms]
        chosen = {id(p) for p in norm_biases}
        others = [p for p in self.parameters() if id(p) not in chosen]
        return [{"params": others}, {"params": norm_biases}]


class TriangularLR(LambdaLR):
    """airbench's schedule: each group's rate rises linearly from `start_factor` times its own
    to its own over the first `peak_fraction` of `total_steps`, then falls linearly to 0.

    It scales each group's own rate, so `norm_bias_lr_scale`'s ratio between groups stays
    (OneCycleLR would set one rate for all groups).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        peak_fraction: float = 0.2,
        start_factor: float = 0.2,
        last_epoch: int = -1,
    ) -> None:
        steps = [0, peak_fraction * total_steps, total_steps]

        def factor(step: int) -> float:
            return float(np.interp(step, steps, [start_factor, 1.0, 0.0]))

        super().__init__(optimizer, factor, last_epoch)


def _require_subclass(config: Mapping[str, Any], base: type) -> None:
    """Refuses a `_target_` that is not a subclass of `base` (a function, say)."""
    module_name, _, name = str(config["_target_"]).rpartition(".")
    target = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(target, type) and issubclass(target, base)):
        raise ValueError(f"_target_ {config['_target_']} is not a {base.__name__} class")
