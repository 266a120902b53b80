"""Lightning's loop rules, in one place: which batches step the optimizer or are followed by
a validation, where training may stop, and which settings set a run's length. The module
and the resume checks and stops (resume.py) share them."""

from typing import Any

import lightning as L


def steps_the_optimizer(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether Lightning steps the optimizer after the batch: at the end of each window of
    `accumulate_grad_batches` batches, and at an epoch's last batch."""
    last = batch_idx + 1 == trainer.num_training_batches
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or last


def run_length_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer's settings that, with the data's, set how many steps a run takes."""
    names = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches")
    return {name: getattr(trainer, name) for name in names} | {"processes": trainer.world_size}


def validates_after(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether a mid-epoch validation follows the batch, by Lightning's batch rule (not its
    time rule, `val_check_interval` as a duration)."""
    every, epochs = trainer.val_check_batch, trainer.check_val_every_n_epoch
    if not isinstance(every, int) or not trainer.enable_validation:  # inf: no length
        return False
    if epochs is not None and (trainer.current_epoch + 1) % epochs:
        return False
    count = batch_idx if epochs is not None else trainer.fit_loop.epoch_loop.total_batch_idx
    return (count + 1) % every == 0


def may_stop_after_epoch(trainer: L.Trainer) -> bool:
    """At an epoch's end: whether Lightning honours should_stop (min_epochs and min_steps met)."""
    min_epochs, min_steps = trainer.min_epochs or 0, trainer.min_steps or 0
    return trainer.current_epoch + 1 >= min_epochs and trainer.global_step >= min_steps


def training_ends_after_epoch(trainer: L.Trainer) -> bool:
    """At an epoch's end: whether Lightning stops here (max_epochs, max_steps, should_stop)."""
    last_epoch = trainer.current_epoch + 1 == trainer.max_epochs
    return last_epoch or trainer.global_step == trainer.max_steps or trainer.should_stop
