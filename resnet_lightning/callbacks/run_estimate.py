"""How long the run will take, said early: after its first steps, and again after the first
epoch (when validation's share is known). On a CPU, also a word at the start that the run
is on the CPU, and the recipe that trains a network there in reasonable time."""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch

from .time_budget import duration, find_time_budget

log = logging.getLogger(__name__)


class RunTimeEstimate(L.Callback):
    """Logs the estimated training time once `steps` steps after the first (which pays the
    warm-up) have run, or `seconds` have passed, whichever comes first; then once more after
    the first whole epoch, validation included.

    Args:
        steps: steps to time before the first estimate.
        seconds: or this much time, if the steps are slow (at least one step is timed).
        cpu_alternative: the overrides named on a CPU as the way to a trained network in
            reasonable time (null: say nothing of it).
    """

    def __init__(
        self, steps: int = 10, seconds: float = 20.0, cpu_alternative: str | None = None
    ) -> None:
        self.steps = steps
        self.seconds = seconds
        self.cpu_alternative = cpu_alternative
        self._timed_from: tuple[int, float] | None = None  # (global step, time)
        self._estimated = False
        self._epoch_start = 0.0
        self._epoch_start_step = 0
        self._epochs_timed = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and pl_module.device.type == "cpu":
            line = "Training on the CPU (no GPU in use): expect hours per epoch for large models"
            if self.cpu_alternative:
                line += (
                    "; for a trained network on a CPU in about 30 minutes: "
                    f"python -m resnet_lightning {self.cpu_alternative}"
                )
            log.info(line)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self._estimated or not trainer.is_global_zero:
            return
        if self._timed_from is None:  # the first step (warm-up) is not timed
            self._timed_from = (trainer.global_step, _now(pl_module.device))
            return
        first_step, start = self._timed_from
        steps = trainer.global_step - first_step
        seconds = time.perf_counter() - start
        if steps >= self.steps or (steps >= 1 and seconds >= self.seconds):
            seconds = _now(pl_module.device) - start  # the steps' work done, on a GPU too
            self._estimated = True
            remaining = _remaining_steps(trainer)
            budget = find_time_budget(trainer)
            if budget is not None:
                per_step = seconds / steps
                left = budget.training_seconds_left()
                log.info(
                    "Time budget: %s of training left, about %d steps more at %.3g s a step "
                    "(%.1f epochs in all); then the final evaluation",
                    duration(left),
                    left / per_step,
                    per_step,
                    (trainer.global_step + left / per_step) / max(epoch_steps(trainer), 1),
                )
            elif remaining is not None:
                per_step = seconds / steps
                log.info(
                    "Estimated training time: %s (%.3g s a step, %d steps to go; "
                    "validation not included)",
                    duration(per_step * remaining),
                    per_step,
                    remaining,
                )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning calls this after the epoch's validation: it is in the time.
        self._epochs_timed += 1
        if self._epochs_timed != 1 or not trainer.is_global_zero:
            return
        epoch_s = _now(pl_module.device) - self._epoch_start
        epoch_steps = trainer.global_step - self._epoch_start_step
        remaining = _remaining_steps(trainer)
        budget = find_time_budget(trainer)
        if budget is not None and budget.position >= 1.0:
            return  # the budget ended training within this epoch
        # Recipes scored once at the end (limit_val_batches=0) have no validation to count.
        validation = " with validation" if trainer.enable_validation else ""
        if budget is not None and epoch_steps > 0:
            left = budget.training_seconds_left()
            log.info(
                "Epoch took %s%s; the budget's %s of training left are about %.1f epochs more",
                duration(epoch_s),
                validation,
                duration(left),
                left / epoch_s,
            )
        elif remaining and epoch_steps > 0:
            epochs_left = math.ceil(remaining / epoch_steps)
            log.info(
                "Epoch took %s%s; the %d epoch%s to go: about %s",
                duration(epoch_s),
                validation,
                epochs_left,
                "" if epochs_left == 1 else "s",
                duration(epoch_s * remaining / epoch_steps),
            )


def _remaining_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps left in the fit, or None when it has no end (max_epochs=-1)."""
    total = trainer.estimated_stepping_batches
    return None if math.isinf(total) else max(int(total) - trainer.global_step, 0)


def epoch_steps(trainer: L.Trainer) -> float:
    """Optimizer steps in an epoch."""
    return trainer.num_training_batches / trainer.accumulate_grad_batches


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # the steps are queued: time them when they have run
        torch.cuda.synchronize(device)
    return time.perf_counter()
