"""Time budgets: how long the whole command may take, as the measure of training.

A budget covers the command from process start to metrics.json: start-up, data caching,
training, the final validation and test. Training gets what is left after start-up and the
final evaluation, whose time is measured on a few batches before the first step and kept
back (and more when the steps slow down during the run: the evaluation will run at that
speed too). The learning-rate schedule then runs on the fraction of that training time
spent (its `position`), not on epochs or steps, so the anneal completes when the budget
runs out whatever the throughput does: a slower step moves the position further, a faster
one less (Li, Yumer & Ramanan, "Budgeted Training", ICLR 2020, decay to zero at the
budget's end).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from resnet_lightning.errors import InvalidArgument, UsageError

log = logging.getLogger(__name__)
# Kept back beyond the measured evaluation: checkpoint writes at the end of training, the
# test's set-up, metrics.json, loggers closing (seconds), and the estimate's own error (this
# host's speed wanders by 10-20% from one minute to the next).
EVAL_MARGIN = 1.1
FIXED_MARGIN_S = 3.0
# A slowdown during training (another job on the cores, a throttled CPU) slows the final
# test too, as much or more: the reserve scales with the steps' drift, margin kept. The
# drift: the latest steps' median time against the median of the REFERENCE_STEPS steps after
# the first (the ones nearest the evaluation's measurement; the first pays warm-up). Medians,
# so that an epoch's boundary (loader workers starting, a validation) moves nothing; the
# median of SLOWDOWN_WINDOW steps, so that a late slowdown counts within three steps, when
# its time can still be kept; the median of DRIFT_WINDOW too, so that one that has lasted is
# not forgotten at once. Speed-ups give nothing back: on a shared host they are noise-level,
# and an overrun breaks the budget's promise.
REFERENCE_STEPS = 10
SLOWDOWN_WINDOW = 5
DRIFT_WINDOW = 25
MAX_DRIFT = 3.0


def process_start_time() -> float:
    """When this process started, on `time.time()`'s scale: the budget counts imports and
    Hydra's start-up too. Linux: /proc; elsewhere, when this module was imported."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22 (after the parenthesised name, which may hold spaces): start time in
            # clock ticks since boot.
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()
wall_clock = time.time


def parse_budget(text: str) -> float:
    """'30m', '90s', '1.5h', '45' (minutes), Lightning's 'DD:HH:MM:SS' -> minutes."""
    value = str(text).strip().lower()
    if value.count(":") == 3:
        days, hours, minutes, seconds = (float(part) for part in value.split(":"))
        return days * 1440 + hours * 60 + minutes + seconds / 60
    units = {"s": 1 / 60, "sec": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0}
    for unit in sorted(units, key=len, reverse=True):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * units[unit]
    return float(value)


class TimeBudget(L.Callback):
    """Ends training when the budget's training time is spent, and gives the schedule its
    position (`training_position`).

    Position = the larger of the training time's fraction spent and, where the Trainer has
    them, the fraction of `max_steps` / `max_epochs` done: whichever limit is reached first
    ends training with the schedule complete. Under DDP rank 0's clock decides: the position
    is broadcast after every step, so all ranks use the same learning rate and stop at the
    same step. The time used is saved in checkpoints: a resumed run continues the same budget
    (the gap between the two processes is not counted; the second one's start-up is).

    Args:
        minutes: the whole command's wall-clock budget.
        started_at: when the command started (`time.time()` scale); default: this process's
            start.
        clock: the wall clock (default `wall_clock`, which tests replace).
    """

    def __init__(
        self,
        minutes: float,
        started_at: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not (isinstance(minutes, int | float) and math.isfinite(minutes) and minutes > 0):
            raise InvalidArgument("minutes", minutes, "must be a positive number, e.g. 30")
        self.budget_s = float(minutes) * 60
        self.clock = clock or wall_clock
        self.started_at = process_start_time() if started_at is None else started_at
        self.used_before_s = 0.0  # by earlier processes of a resumed run
        self.train_start_s: float | None = None  # budget time used when training began
        self.reserve_s = 0.0  # kept back for the final evaluation
        self.measured_eval_s = 0.0  # the evaluation's time measured before the first step
        self.drift = 1.0  # the latest steps' time / the time of those near that measurement
        self._last_step_end: float | None = None
        self._reference_steps: list[float] = []
        self._recent_steps: deque[float] = deque(maxlen=DRIFT_WINDOW)
        self._image_size: Any = None  # the module's train_image_size at the last step
        self._drift_before = 0.0  # the largest drift at an earlier image size
        self.position = 0.0
        # Set by the LightningModule when it builds the optimizer: anything with
        # `apply(position)` that sets the learning rates (training.position_schedule).
        self.schedule: Any = None
        self.train_end_s: float | None = None
        self._steps_per_epoch = math.inf
        self._fitting = False

    # -- the clock --------------------------------------------------------------------------
    def used_s(self) -> float:
        """Budget time used so far, earlier processes of a resumed run included."""
        return self.used_before_s + self.clock() - self.started_at

    def training_seconds_left(self) -> float:
        return max(self.budget_s - self.reserve_s - self.used_s(), 0.0)

    def _time_fraction(self, reserve: float) -> float:
        available = self.budget_s - reserve - self.train_start_s
        return (self.used_s() - self.train_start_s) / available if available > 0 else 1.0

    def _limit_fraction(self, trainer: L.Trainer) -> float:
        """How far the Trainer's own limits are: steps of max_steps, epochs of max_epochs."""
        fractions = [0.0]
        if trainer.max_steps and trainer.max_steps > 0:
            fractions.append(trainer.global_step / trainer.max_steps)
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(self._steps_per_epoch):
            fractions.append(trainer.global_step / (self._steps_per_epoch * trainer.max_epochs))
        return max(fractions)

    # -- Lightning hooks --------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accumulate = trainer.accumulate_grad_batches
        if math.isfinite(trainer.num_training_batches):
            self._steps_per_epoch = max(math.ceil(trainer.num_training_batches / accumulate), 1)
        measured = evaluation_seconds(trainer, pl_module) if trainer.is_global_zero else 0.0
        used = self.used_s()
        # Rank 0's numbers for every rank: they decide together.
        measured, used = trainer.strategy.broadcast((measured, used), src=0)
        # The drift is against steps near this measurement: a new one starts it over.
        self.measured_eval_s, self.drift, self._drift_before = measured, 1.0, 0.0
        self._image_size = None
        self._reference_steps.clear()
        self._recent_steps.clear()
        self._last_step_end = self.clock()
        self.reserve_s = reserve = self._reserve()
        if self.train_start_s is None:
            self.train_start_s = used
        minimum = used + reserve
        if minimum >= self.budget_s:
            raise UsageError(
                f"budget.minutes={self.budget_s / 60:g} ({self.budget_s:.0f} s) leaves no time "
                f"to train: start-up took {used:.0f} s and the final evaluation needs about "
                f"{reserve:.0f} s (measured); give at least budget.minutes="
                f"{math.ceil(minimum / 6) / 10:g} and more to train"
            )
        self.position = self._compute_position(trainer)
        self._apply_schedule()
        if trainer.is_global_zero:
            log.info(
                "Time budget %s for the whole command: %.0f s used by start-up, %.0f s kept "
                "for the final evaluation, %.0f s to train%s",
                duration(self.budget_s),
                used,
                reserve,
                self.budget_s - reserve - used,
                _limits_line(trainer),
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._apply_schedule()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._time_step(getattr(pl_module, "train_image_size", None))
        self.position = self._compute_position(trainer)
        if self.position >= 1.0:
            trainer.should_stop = True
            if self.train_end_s is None:
                self.train_end_s = self.used_s()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_end_s is None:
            self.train_end_s = self.used_s()
        if trainer.is_global_zero and abs(self.drift - 1) > 0.1:
            log.info(
                "The last steps took %.2f times as long as the early ones: %.0f s kept for the "
                "final evaluation (measured %.0f s before the first step)",
                self.drift,
                self.reserve_s,
                self.measured_eval_s,
            )

    def _apply_schedule(self) -> None:
        if self.schedule is not None:
            self.schedule.apply(self.position)

    def _reserve(self) -> float:
        return self.measured_eval_s * max(self.drift, 1.0) * EVAL_MARGIN + FIXED_MARGIN_S

    def _time_step(self, image_size: Any = None) -> None:
        """Times the step that just ended and updates the drift (each rank its own; rank 0's
        reserve is the one broadcast). A step on images of another size than the last one's
        (progressive resizing) does other work: the drift is measured on against a new
        reference of steps at the new size, and never falls below the largest one measured at
        an earlier size (a slowdown under way when the size changed is in the new reference;
        chaining the ratios instead would compound their noise, 5-10% at each change)."""
        now = self.clock()
        if image_size != self._image_size:
            if self._image_size is not None:
                self._drift_before = max(self._drift_before, self.drift)
                self._reference_steps.clear()
                self._recent_steps.clear()
            self._image_size = image_size
        if self._last_step_end is not None:
            seconds = now - self._last_step_end
            self._recent_steps.append(seconds)
            if len(self._reference_steps) <= REFERENCE_STEPS:
                self._reference_steps.append(seconds)
            if len(self._reference_steps) > REFERENCE_STEPS:
                self.drift = self._drift()
        self._last_step_end = now

    def _drift(self) -> float:
        reference = statistics.median(self._reference_steps[1:])
        recent = list(self._recent_steps)
        latest = max(statistics.median(recent[-SLOWDOWN_WINDOW:]), statistics.median(recent))
        drift = latest / reference if reference > 0 else 1.0
        return min(max(drift, self._drift_before), MAX_DRIFT)

    def _compute_position(self, trainer: L.Trainer) -> float:
        reserve = self._reserve()
        position = max(self._time_fraction(reserve), self._limit_fraction(trainer))
        position, self.reserve_s = trainer.strategy.broadcast((position, reserve), src=0)
        # Never back: a reserve that shrinks (a slowdown that passed) leaves the position.
        return min(max(position, self.position, 0.0), 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "used_s": self.used_s(),
            "train_start_s": self.train_start_s,
        }

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only a resumed fit continues the saved budget: testing a checkpoint of this very
        # run restores callbacks too, and would count the time before it twice.
        if self._fitting:
            self.used_before_s = state_dict["used_s"]
            self.train_start_s = state_dict["train_start_s"]

    def summary(self, steps: int) -> dict[str, float]:
        """What metrics.json records of the budget (seconds, and epochs as a fraction)."""
        return {
            "budget_s": round(self.budget_s, 2),
            "budget_used_s": round(self.used_s(), 2),
            "budget_start_s": round(self.train_start_s or 0.0, 2),
            "budget_train_s": round((self.train_end_s or 0.0) - (self.train_start_s or 0.0), 2),
            "budget_reserve_s": round(self.reserve_s, 2),
            "budget_drift": round(self.drift, 3),
            "epochs_done": round(steps / self._steps_per_epoch, 3)
            if math.isfinite(self._steps_per_epoch)
            else float("nan"),
        }


def find_time_budget(trainer: L.Trainer | None) -> TimeBudget | None:
    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)


def training_position(trainer: L.Trainer) -> float:
    """How far training is, in [0, 1]: the time budget's position when the run has one,
    else the optimizer steps done over the fit's planned steps (0 when it has no end)."""
    budget = find_time_budget(trainer)
    if budget is not None:
        return budget.position
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 0:
        return 0.0
    return min(trainer.global_step / total, 1.0)


def evaluation_seconds(trainer: L.Trainer, pl_module: L.LightningModule, batches: int = 2) -> float:
    """The final validation's and test's time, estimated from `batches` timed evaluation
    batches (after one that warms up) of the test data, with the module's own test-time
    augmentation and the run's precision."""
    val_loader = _datamodule_loader(trainer, "val")
    test_loader = _datamodule_loader(trainer, "test")
    loader = test_loader or val_loader
    loops = [_batches(test_loader, trainer.limit_test_batches)]
    loops.append(_batches(val_loader, trainer.limit_val_batches))
    final_batches = sum(loops)
    if loader is None or final_batches == 0:
        return 0.0
    predict = getattr(pl_module, "predict_logits", pl_module)
    was_training = pl_module.training
    pl_module.eval()
    times = []
    start = time.perf_counter()
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for i, batch in enumerate(loader):
            images = trainer.strategy.batch_to_device(batch)[0]
            predict(images)
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)
            now = time.perf_counter()
            times.append(now - start)
            start = now
            if i >= batches:
                break
    pl_module.train(was_training)
    per_batch = sum(times[1:]) / max(len(times) - 1, 1)
    # The first batch's extra time (loader workers starting) is paid again by each loop.
    loops_run = sum(1 for count in loops if count)
    return per_batch * final_batches + loops_run * max(times[0] - per_batch, 0.0)


def _datamodule_loader(trainer: L.Trainer, split: str) -> Any:
    datamodule = trainer.datamodule
    try:
        return getattr(datamodule, f"{split}_dataloader")() if datamodule is not None else None
    except Exception:  # a data module without that split
        return None


def _batches(loader: Any, limit: int | float | None) -> int:
    """The batches an evaluation loop takes of `loader` under a Trainer's `limit_*_batches`."""
    try:
        count = len(loader) if loader is not None else 0
    except TypeError:  # no length
        return 0
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(count, limit)
    return math.ceil(count * float(1.0 if limit is None else limit))


def duration(seconds: float) -> str:
    """'2 d 3 h', '3 h 12 min', '4 min 05 s', '12 s'."""
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _limits_line(trainer: L.Trainer) -> str:
    limits = []
    if trainer.max_epochs and trainer.max_epochs > 0:
        limits.append(f"trainer.max_epochs={trainer.max_epochs}")
    if trainer.max_steps and trainer.max_steps > 0:
        limits.append(f"trainer.max_steps={trainer.max_steps}")
    if not limits:
        return ""
    verb = "apply" if len(limits) > 1 else "applies"
    return (
        f"; {' and '.join(limits)} also {verb}: training ends at whichever is reached first, "
        "with the schedule complete there"
    )
