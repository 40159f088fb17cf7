"""Lightning's rich progress bar, counting epochs from 1."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class EpochProgressBar(RichProgressBar):
    """`Epoch 1/100` for the first of 100 epochs, where Lightning's own bar reads `Epoch 0/99`
    (and a one-epoch run `Epoch 0/0`, which looks like nothing ran); no total when the run has
    none (`max_epochs=-1`)."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs}"
        # As long as the validation bar's label, so that the bar does not jump between them.
        return description.ljust(len(self.validation_description))
