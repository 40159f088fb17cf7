"""What a fit ended with, readable in the process that called `trainer.fit`."""

from __future__ import annotations

import lightning as L
import torch

EPOCHS, STEPS, BEST_SCORE = "fit/epochs", "fit/steps", "fit/best_score"


class FitOutcome(L.Callback):
    """Puts the epochs and steps trained and the best checkpoint's score into
    `trainer.callback_metrics` at the end of fit.

    With `strategy=ddp_spawn` (or `ddp_fork`) training runs in processes the launcher starts,
    and the calling process gets back the weights, the best checkpoint's path and the callback
    metrics, but not the loop counters or the best score: read through callback_metrics, they
    are right under every strategy.
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        outcome = {EPOCHS: trainer.current_epoch, STEPS: trainer.global_step}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_score is not None:
            outcome[BEST_SCORE] = checkpoint.best_model_score
        trainer.callback_metrics.update({k: torch.as_tensor(v).cpu() for k, v in outcome.items()})
