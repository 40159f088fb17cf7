"""Time budgets: the run's wall clock as the measure of training, and the schedule's position.

(Work in progress: the TimeBudget callback lands here; `training_position` is its interface.)
"""

from __future__ import annotations

import math

import lightning as L


def training_position(trainer: L.Trainer) -> float:
    """How far training is, in [0, 1]: the time budget's fraction spent when the run has one,
    else the optimizer steps done over the fit's planned steps (0 when it has no end)."""
    budget = getattr(trainer, "time_budget", None)
    if budget is not None:
        return budget.position
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 0:
        return 0.0
    return min(trainer.global_step / total, 1.0)
