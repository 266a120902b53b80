"""Pruning a search's hopeless trials: the trial's job reports its metric after each epoch's
validation to its own Optuna trial, and stops when the search's pruner says so.

The search's sweeper adds `TrialPruning` to each trial's config when it has a pruner
(`hydra/sweeper/pruner=median`). The stop is Lightning's clean one, as by early stopping:
the epoch's checkpoints are saved, the best one is tested, and the run's metrics.json says
`"status": "pruned"` with the epoch. (optuna-integration's Lightning callback raises
`TrialPruned` out of `Trainer.fit` instead, which leaves no test and no metrics.json.)
"""

import logging

import lightning as L
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

PRUNED_AT_EPOCH = "pruned_at_epoch"  # the trial's user attribute, and metrics.json's key


class TrialPruning(Callback):
    """Reports `monitor` (the search's optimized_metric) after each validation to trial number
    `trial` of the search's study. Under DDP the first process reports and asks the pruner;
    all of them stop together."""

    def __init__(self, trial: int, monitor: str) -> None:
        self.trial_number = trial
        self.monitor = monitor
        self.pruned_at_epoch: int | None = None
        self._trial: optuna.Trial | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # the job's own process, which has the search's config
            self._trial = _open_trial(self.trial_number)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                self._trial.report(float(value), step=trainer.current_epoch)
                prune = self._trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned_at_epoch = trainer.current_epoch
            if trainer.is_global_zero:
                self._trial.set_user_attr(PRUNED_AT_EPOCH, self.pruned_at_epoch)
                log.info("Trial %d pruned after epoch %d", self.trial_number, self.pruned_at_epoch)
            trainer.should_stop = True


def _open_trial(number: int) -> optuna.Trial:
    """Trial `number` of the search's study, reopened from its storage with its pruner."""
    sweeper = HydraConfig.get().sweeper
    study = optuna.load_study(
        study_name=sweeper.study_name, storage=sweeper.storage, pruner=instantiate(sweeper.pruner)
    )
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.Trial(study, trial_id)
