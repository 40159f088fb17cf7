"""Lightning's rich progress bar, counting epochs from 1."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

from .time_budget import find_time_budget


class EpochProgressBar(RichProgressBar):
    """`Epoch 1/100` for the first of 100 epochs, where Lightning's own bar reads `Epoch 0/99`
    (and a one-epoch run `Epoch 0/0`, which looks like nothing ran); no total when the run has
    none (`max_epochs=-1`). Under a time budget, the budget's share spent instead of a total
    of epochs: `Epoch 3 · budget 41%`."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        budget = find_time_budget(self.trainer)
        if budget is not None:
            description += f" · budget {budget.position:.0%}"
        elif self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs}"
        # As long as the validation bar's label, so that the bar does not jump between them.
        return description.ljust(len(self.validation_description))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The budget's share moves every step; Lightning sets the label once an epoch.
        if self.is_enabled and self.progress is not None and find_time_budget(trainer):
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)
