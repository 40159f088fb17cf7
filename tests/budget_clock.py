"""A fake wall clock for time-budget tests: each training step takes a set number of seconds
of it, and the learning rate each step trained with is recorded beside the budget's position.
Named by `_target_` in a test's overrides (`+callbacks.clock._target_=tests.budget_clock...`)."""

from __future__ import annotations

import lightning as L

from resnet_lightning.callbacks.time_budget import find_time_budget


class FakeClock:
    now = 1_000_000.0  # seconds; tests set it to the run's start

    @classmethod
    def read(cls) -> float:
        return cls.now


class StepSeconds(L.Callback):
    """Each training step takes `seconds` of FakeClock (`slow_seconds` from the step numbered
    `slow_from`, counting from 0, on), the test `test_seconds`; records (step, position, lr)
    of every step in `StepSeconds.steps`."""

    steps: list[tuple[int, float, float]] = []

    def __init__(
        self,
        seconds: float = 1.0,
        slow_from: int = -1,
        slow_seconds: float = 1.0,
        test_seconds: float = 0.0,
    ):
        self.seconds, self.slow_from, self.slow_seconds = seconds, slow_from, slow_seconds
        self.test_seconds = test_seconds
        StepSeconds.steps = []

    def on_test_start(self, trainer, pl_module) -> None:
        FakeClock.now += self.test_seconds

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        position = find_time_budget(trainer).position
        StepSeconds.steps.append((trainer.global_step, position, optimizer.param_groups[0]["lr"]))

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        # The step takes its time now: the budget reads the clock when the step has ended.
        slow = 0 <= self.slow_from <= trainer.global_step
        FakeClock.now += self.slow_seconds if slow else self.seconds


class RecordFinalStep(L.Callback):
    """Each rank writes the step and learning rate it ended training at to
    `directory/final_step_<rank>.json`."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        lr = trainer.optimizers[0].param_groups[0]["lr"]
        record = {"step": trainer.global_step, "lr": lr}
        path = Path(self.directory) / f"final_step_{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
