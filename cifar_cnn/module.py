"""The LightningModule: trains any classifier net with cross-entropy and tracks accuracy."""

import importlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_cnn.steps import run_length_settings, steps_the_optimizer


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of the net described by `net`, with the optimizer `optimizer`.

    Both arguments are plain `_target_` mappings (Hydra's instantiate format), not objects:
    the checkpoint then stores them as plain values, so `ImageClassifier.load_from_checkpoint`
    rebuilds the module from the file alone, and `torch.load(..., weights_only=True)` opens it.
    Since a checkpoint names the classes that loading it builds, only an `nn.Module` net and a
    torch `Optimizer` are accepted, and nested `_target_`s are not built.

    The other arguments are off by default (the tutorial's training): `label_smoothing` of the
    training loss (validation and test report the plain cross-entropy); `flip_tta`, logits
    averaged over each image and its mirror whenever the module is in eval mode (validation,
    test, eval.py); `channels_last`, the net's and inputs' memory layout (faster convs on CPUs
    and GPUs); `norm_bias_lr_scale`, a learning rate that many times larger for BatchNorm
    biases, with weight decay as many times smaller so that the decay per step stays the same;
    `translate_tta`, in eval mode, logits also averaged over the image shifted by one pixel up
    and left and by one down and right (airbench's second level of test-time augmentation);
    `compile`, the net compiled by `torch.compile` in place (its first batches wait for the
    compiler; the parameters keep their names, so checkpoints load either way).
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
        translate_tta: bool = False,
        compile: bool = False,
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
        if compile:
            self.net.compile()
        # validate_args=False: the argument checks (torch.unique of the labels) make a GPU wait
        # for its queue to drain at every batch. The data module's labels are class indices.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_loss = MeanLoss()
        self.test_loss = MeanLoss()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints: a resumed run keeps its best

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.training:
            return self.net(images)  # (N, classes)
        return augmented_logits(
            self.net, images, flip=self.hparams.flip_tta, translate=self.hparams.translate_tta
        )

    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes a run mid-epoch: that epoch's
        # metrics go on from the checkpoint's.
        self._reset_epoch_metrics(**vars(self).pop("_resumed_epoch_metrics", {}))

    def on_train_epoch_start(self) -> None:
        self._reset_epoch_metrics()

    def _reset_epoch_metrics(
        self, loss_sum: float = 0.0, correct: int = 0, batches: int = 0, images: int = 0
    ) -> None:
        """The epoch's training metrics, summed on the device step by step (training_step)."""
        self._epoch_loss_sum = torch.tensor(loss_sum, device=self.device)
        self._epoch_correct = torch.tensor(correct, dtype=torch.long, device=self.device)
        self._epoch_batches, self._epoch_images = batches, images

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The precision the run computed in, which eval.py and resumes take again; the
        epoch's metrics so far, for a run resumed mid-epoch (DDP: the first process's); and
        the trainer settings that a schedule's length came from, which a resume must keep."""
        checkpoint["precision"] = self.trainer.precision
        if hasattr(self, "_epoch_loss_sum"):  # once training has started
            checkpoint["epoch_metrics"] = {
                "loss_sum": float(self._epoch_loss_sum),
                "correct": int(self._epoch_correct),
                "batches": self._epoch_batches,
                "images": self._epoch_images,
            }
        if hasattr(self, "_schedule_laid_out_by"):
            checkpoint["schedule_laid_out_by"] = self._schedule_laid_out_by

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_epoch_metrics = checkpoint.get("epoch_metrics", {})

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The loss of one batch. Its metrics reach the loggers at the steps where Lightning
        writes (every `trainer.log_every_n_steps`) as `train/loss_step` and `train/acc_step`,
        and per epoch as `train/loss_epoch` (the mean of the batches' losses) and
        `train/acc_epoch`.

        The epoch's metrics are two sums kept on the device and logged once, at the epoch's
        last batch: torchmetrics updates and `self.log` calls at every step cost more host time
        than a small net's whole step (the GPU syncs in benchmarks/README.md's log).
        """
        images, targets = batch  # (N,) classes; or (N, classes) probabilities: MixUp, CutMix
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        # A mixed image counts as its dominant class: the one that makes up more of it.
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        self._epoch_loss_sum += loss.detach()
        self._epoch_correct += correct
        self._epoch_batches += 1
        self._epoch_images += len(labels)
        # With accumulate_grad_batches, a window's batches share a step: its last one counts.
        steps = steps_the_optimizer(self.trainer, batch_idx)
        every = self.trainer.log_every_n_steps
        if steps and every and (self.trainer.global_step + 1) % every == 0:  # Lightning's rule
            metrics = {"train/loss_step": loss, "train/acc_step": correct / len(labels)}
            # Not in the progress bar: Lightning reads its values from the device every batch.
            self.log_dict(metrics, on_step=True, on_epoch=False)
        last_step = steps and self.trainer.global_step + 1 == self.trainer.max_steps  # -1: never
        if batch_idx + 1 == self.trainer.num_training_batches or last_step:
            metrics = {
                "train/loss_epoch": self._epoch_loss_sum / self._epoch_batches,
                "train/acc_epoch": self._epoch_correct / self._epoch_images,
            }
            # DDP: averaged over processes, whose shards are the same size.
            self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # its few batches before training are no result
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

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
        length = {}
        if "total_steps" in inspect.signature(make_scheduler).parameters:
            length = {"total_steps": self.trainer.estimated_stepping_batches}
            self._schedule_laid_out_by = run_length_settings(self.trainer)
        scheduler = make_scheduler(optimizer, **length)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        """Loss and accuracy of one batch, logged per epoch as `<split>/loss`, `<split>/acc`."""
        images, labels = batch
        logits = self(images)  # with test-time augmentation when it is on
        mean_loss = getattr(self, f"{split}_loss")
        mean_loss.update(F.cross_entropy(logits.float(), labels, reduction="none"))
        accuracy = getattr(self, f"{split}_acc")
        accuracy.update(logits, labels)
        # torchmetrics, which sum over DDP processes themselves. Not `self.log(loss,
        # sync_dist=True)`: Lightning averages the processes' image counts as integers, which
        # skews the mean loss over shards of unequal size.
        self.log(f"{split}/loss", mean_loss, on_epoch=True, prog_bar=split == "val")
        self.log(f"{split}/acc", accuracy, on_epoch=True, prog_bar=split == "val")

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


def augmented_logits(net: nn.Module, images: Tensor, flip: bool, translate: bool) -> Tensor:
    """The net's logits with test-time augmentation: averaged with the mirror image's (`flip`)
    and, with `translate`, also over the image shifted by one pixel up and left and by one
    down and right. A function of the net alone, so that an exported model (cifar_cnn/export.py)
    computes what ImageClassifier does in eval mode."""
    logits = _mirrored(net, images, flip)
    if translate:  # airbench: half the image, a quarter each 1-pixel shift
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = (padded[:, :, :-2, :-2], padded[:, :, 2:, 2:])
        logits = logits / 2 + sum(_mirrored(net, x, flip) for x in shifted) / 4
    return logits


def _mirrored(net: nn.Module, images: Tensor, flip: bool) -> Tensor:
    """The net's logits, averaged with its mirror image's when `flip` is on."""
    logits = net(images)
    if flip:
        logits = (logits + net(images.flip(3))) / 2
    return logits


class MeanLoss(MeanMetric):
    """The mean of the images' losses, added up in float32 as they come.

    Unlike MeanMetric's own `update`, no NaN check: it would make a GPU wait at every batch;
    a NaN loss shows as a NaN metric.
    """

    def update(self, losses: Tensor) -> None:  # (N,) one loss an image
        self.mean_value += losses.sum(dtype=torch.float32)
        self.weight += losses.numel()


def _require_subclass(config: Mapping[str, Any], base: type) -> None:
    """Refuses a `_target_` that is not a subclass of `base` (a function, say)."""
    module_name, _, name = str(config["_target_"]).rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"_target_ {config['_target_']} names nothing to import") from error
    if not (isinstance(target, type) and issubclass(target, base)):
        raise ValueError(f"_target_ {config['_target_']} is not a {base.__name__} class")
