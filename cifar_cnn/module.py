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
from torchmetrics import MaxMetric, MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy


def steps_the_optimizer(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether Lightning steps the optimizer after the batch: at the end of each window of
    `accumulate_grad_batches` batches, and at an epoch's last batch."""
    last = batch_idx + 1 == trainer.num_training_batches
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or last


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
        logits = self._mirrored(images)
        if self.hparams.translate_tta:  # airbench: half the image, a quarter each 1-pixel shift
            padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
            shifted = (padded[:, :, :-2, :-2], padded[:, :, 2:, 2:])
            logits = logits / 2 + sum(self._mirrored(x) for x in shifted) / 4
        return logits

    def _mirrored(self, images: Tensor) -> Tensor:
        """The net's logits, averaged with its mirror image's when `flip_tta` is on."""
        logits = self.net(images)
        if self.hparams.flip_tta:
            logits = (logits + self.net(images.flip(3))) / 2
        return logits

    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes a run mid-epoch: that epoch's
        # figures go on from the checkpoint's.
        self._reset_epoch_figures(**vars(self).pop("_resumed_epoch_figures", {}))

    def on_train_epoch_start(self) -> None:
        self._reset_epoch_figures()

    def _reset_epoch_figures(
        self, loss_sum: float = 0.0, correct: int = 0, batches: int = 0, images: int = 0
    ) -> None:
        """The epoch's training figures, summed on the device step by step (training_step)."""
        self._epoch_loss_sum = torch.tensor(loss_sum, device=self.device)
        self._epoch_correct = torch.tensor(correct, dtype=torch.long, device=self.device)
        self._epoch_batches, self._epoch_images = batches, images

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The epoch's figures so far, for a run resumed mid-epoch (DDP: the first process's);
        the trainer settings a schedule's length came from, checked on resume; and the
        precision the run computed in, which eval.py evaluates in."""
        checkpoint["precision"] = self.trainer.precision
        if hasattr(self, "_epoch_loss_sum"):  # once training has started
            checkpoint["epoch_figures"] = {
                "loss_sum": float(self._epoch_loss_sum),
                "correct": int(self._epoch_correct),
                "batches": self._epoch_batches,
                "images": self._epoch_images,
            }
        if hasattr(self, "_schedule_laid_out_by"):
            checkpoint["schedule_laid_out_by"] = self._schedule_laid_out_by

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_epoch_figures = checkpoint.get("epoch_figures", {})
        # As saved: bf16-true converts the module after restoring it, and would round it.
        self._restored_best = checkpoint["state_dict"].get("val_acc_best.max_value")

    def on_fit_start(self) -> None:
        self._best_in_float32()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The loss of one batch. Its figures reach the loggers at the steps where Lightning
        writes (every `trainer.log_every_n_steps`) as `train/loss_step` and `train/acc_step`,
        and per epoch as `train/loss_epoch` (the mean of the batches' losses) and
        `train/acc_epoch`.

        The epoch figures are two sums kept on the device, a handful of small kernels a step,
        logged once, at the epoch's last batch, where the callbacks that report epochs read
        them. torchmetrics' `MeanMetric` and `MulticlassAccuracy` updates took about 0.5 ms a
        step on an H100's host, a fifth of the plain loop's whole seed step there
        (benchmarks/step_overhead.py); `self.log` costs 0.8 ms a call (Lightning moves its
        records to the device each time)."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        self._epoch_loss_sum += loss.detach()
        self._epoch_correct += correct
        self._epoch_batches += 1
        self._epoch_images += len(labels)
        # With accumulate_grad_batches, a window's batches share a step: its last one counts.
        steps = steps_the_optimizer(self.trainer, batch_idx)
        every = self.trainer.log_every_n_steps
        if steps and every and (self.trainer.global_step + 1) % every == 0:  # Lightning's rule
            figures = {"train/loss_step": loss, "train/acc_step": correct / len(labels)}
            # Not in the progress bar: Lightning reads its values from the device every batch.
            self.log_dict(figures, on_step=True, on_epoch=False)
        last_step = steps and self.trainer.global_step + 1 == self.trainer.max_steps  # -1: never
        if batch_idx + 1 == self.trainer.num_training_batches or last_step:
            figures = {
                "train/loss_epoch": self._epoch_loss_sum / self._epoch_batches,
                "train/acc_epoch": self._epoch_correct / self._epoch_images,
            }
            # DDP: averaged over processes, whose shards are the same size.
            self.log_dict(figures, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_validation_start(self) -> None:
        self._best_in_float32()
        _in_float32(self.val_loss)

    def on_test_start(self) -> None:
        _in_float32(self.test_loss)

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

    def _best_in_float32(self) -> None:
        """`val_acc_best` in float32, and as saved in the checkpoint the run resumed from:
        bf16-true converts the module after Lightning restored it (0.1 became 0.10009765625)."""
        _in_float32(self.val_acc_best)
        restored = vars(self).pop("_restored_best", None)
        if restored is not None:
            self.val_acc_best.max_value = restored.float().to(self.device)

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        """Loss and accuracy of one batch, logged per epoch as `<split>/loss`, `<split>/acc`."""
        images, labels = batch
        logits = self(images)  # with test-time augmentation when it is on
        # In float32 whatever the precision (autocast does so too): under bf16-true the
        # figure would otherwise carry bf16's rounding, which eval.py's does not.
        mean_loss = getattr(self, f"{split}_loss")
        mean_loss.update(F.cross_entropy(logits.float(), labels, reduction="none"))
        accuracy = getattr(self, f"{split}_acc")
        accuracy.update(logits, labels)
        # torchmetrics, which sum over DDP processes themselves. Not `self.log(loss,
        # sync_dist=True)`: Lightning averages the processes' image counts as integers, so
        # shards of 14, 13 and 13 images made its mean loss 40/39 too large.
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


class MeanLoss(MeanMetric):
    """The mean of the images' losses, added up in float32 as they come.

    MeanMetric's own `update` casts them to the metric's dtype, which becomes bf16 when
    Lightning moves a logged metric inside a bf16-true step (torchmetrics takes the default
    dtype then), and with `nan_strategy="disable"` it drops `weight=`. No NaN check either: it
    would make a GPU wait at every batch; a NaN loss shows as a NaN figure.
    """

    def update(self, losses: Tensor) -> None:  # (N,) one loss an image
        self.mean_value += losses.sum(dtype=torch.float32)
        self.weight += losses.numel()


def _in_float32(*metrics: Metric) -> None:
    """The metrics' states back in float32. bf16-true and 16-true convert the whole module with
    `.to(dtype)`, which torchmetrics passes on to metric states (it guards `.half()`, not
    `.to`): the loss sums then added up in bf16, and the best accuracy was rounded to bf16."""
    for metric in metrics:
        metric.set_dtype(torch.float32)


def run_length_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer's settings that, with the data's, set how many steps a run takes."""
    names = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches")
    return {name: getattr(trainer, name) for name in names} | {"processes": trainer.world_size}


class TriangularLR(LambdaLR):
    """airbench's schedule: each group's rate rises linearly from `start_factor` times its own
    to its own over the first `peak_fraction` of `total_steps`, then falls linearly to
    `end_factor` times its own.

    It scales each group's own rate, so `norm_bias_lr_scale`'s ratio between groups stays
    (OneCycleLR would set one rate for all groups).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        peak_fraction: float = 0.2,
        start_factor: float = 0.2,
        end_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        steps = [0, peak_fraction * total_steps, total_steps]

        def factor(step: int) -> float:
            return float(np.interp(step, steps, [start_factor, 1.0, end_factor]))

        super().__init__(optimizer, factor, last_epoch)


def _require_subclass(config: Mapping[str, Any], base: type) -> None:
    """Refuses a `_target_` that is not a subclass of `base` (a function, say)."""
    module_name, _, name = str(config["_target_"]).rpartition(".")
    target = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(target, type) and issubclass(target, base)):
        raise ValueError(f"_target_ {config['_target_']} is not a {base.__name__} class")
