"""A sweep trial's job reports to its Optuna trial, which may prune it.

The Optuna sweeper (hydra_plugins/resnet_lightning_sweeper) gives each trial's job its trial
as overrides, `+optuna_trial.storage=... +optuna_trial.study_name=... +optuna_trial.number=N`;
train() then adds `OptunaPruning`. After each validation the job's rank 0 reports the
optimized metric to the trial in the shared storage, and asks the study's pruner whether to go
on. A pruned trial stops as early stopping does (`trainer.should_stop`): the epoch's checkpoints
are written as usual, the test runs on the best one, metrics.json says `"pruned": true`, and
the trial's user attribute `pruned_after_epoch` tells the sweeper to record it as PRUNED.

Optuna is imported here only when a trial is given (it is in the optional `sweep` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.storages import BaseStorage

log = logging.getLogger(__name__)

JOURNAL_SCHEME = "journal://"
# The trial's user attribute that marks it pruned: the epoch (counted from 1) whose validation
# pruned it.
PRUNED_AFTER_EPOCH = "pruned_after_epoch"


def journal_file(storage: str) -> Path | None:
    """The journal file of `storage` (`journal:///path/study.log`, or any URL-less path, e.g.
    `outputs/study.log`), or None for a database URL (`sqlite:///...`, `postgresql://...`)."""
    if storage.startswith(JOURNAL_SCHEME):
        return Path(storage.removeprefix(JOURNAL_SCHEME))
    return None if "://" in storage else Path(storage)


def open_storage(storage: str) -> BaseStorage:
    """Optuna's storage for `storage`: a JournalStorage on a file (created, with its folder,
    when missing; safe on a shared file system) or an RDBStorage on a database URL."""
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = journal_file(storage)
    if path is None:
        return RDBStorage(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


class OptunaPruning(L.Callback):
    """Reports `monitor` after each validation to trial `number` of the study, and stops the
    fit when the pruner says so. Rank 0 alone talks to the storage; its decision is broadcast,
    so that every DDP rank stops at the same epoch."""

    def __init__(
        self,
        storage: str,
        study_name: str,
        number: int,
        monitor: str,
        pruner: BasePruner | None = None,
    ) -> None:
        self.storage = storage
        self.study_name = study_name
        self.number = number
        self.monitor = monitor
        self.pruner = pruner
        self.pruned_after_epoch: int | None = None  # counted from 1
        self._trial: Any = None  # optuna.trial.Trial, on rank 0 while the trial runs
        self._validations = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self._trial is not None:
            return
        import optuna

        storage = open_storage(self.storage)
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            pruner=self.pruner or optuna.pruners.NopPruner(),
        )
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        state = storage.get_trial(trial_id).state
        if state != optuna.trial.TrialState.RUNNING:  # e.g. resume=auto of a finished trial
            log.warning("Optuna trial %d is %s: not reporting to it", self.number, state.name)
            return
        self._trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        value = trainer.callback_metrics.get(self.monitor)
        if self._trial is not None and value is not None:
            # The step is the validation's number: the epoch, with one validation per epoch.
            self._trial.report(float(value), step=self._validations)
            prune = self._trial.should_prune()
        self._validations += 1
        if not trainer.strategy.broadcast(prune, src=0):
            return
        trainer.should_stop = True
        self.pruned_after_epoch = trainer.current_epoch + 1
        if self._trial is not None:
            self._trial.set_user_attr(PRUNED_AFTER_EPOCH, self.pruned_after_epoch)
            log.info(
                "Optuna trial %d pruned after epoch %d (%s=%.4f): stopping",
                self.number,
                self.pruned_after_epoch,
                self.monitor,
                float(value),
            )
