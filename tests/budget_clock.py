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
    of every step in `StepSeconds.steps`. With `per_pixel`, a step's seconds scale with the
    pixels of the images the network trained on (progressive resizing: a 16 px step takes a
    quarter of a 32 px one), and `StepSeconds.sizes` holds the (height, width) of each
    step's training input; `StepSeconds.eval_sizes` those of every validation/test input."""

    steps: list[tuple[int, float, float]] = []
    sizes: list[tuple[int, int]] = []
    eval_sizes: set[tuple[int, int]] = set()

    def __init__(
        self,
        seconds: float = 1.0,
        slow_from: int = -1,
        slow_seconds: float = 1.0,
        test_seconds: float = 0.0,
        per_pixel: bool = False,
        full_size: int = 32,
    ):
        self.seconds, self.slow_from, self.slow_seconds = seconds, slow_from, slow_seconds
        self.test_seconds, self.per_pixel, self.full_size = test_seconds, per_pixel, full_size
        StepSeconds.steps, StepSeconds.sizes, StepSeconds.eval_sizes = [], [], set()

    def on_fit_start(self, trainer, pl_module) -> None:
        def record(module, args) -> None:
            size = tuple(args[0].shape[-2:])
            if module.training:
                self._last_size = size
            else:
                StepSeconds.eval_sizes.add(size)

        pl_module.net.register_forward_pre_hook(record)

    def on_test_start(self, trainer, pl_module) -> None:
        FakeClock.now += self.test_seconds

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        position = find_time_budget(trainer).position
        StepSeconds.steps.append((trainer.global_step, position, optimizer.param_groups[0]["lr"]))
        StepSeconds.sizes.append(self._last_size)
        if self.per_pixel:  # the step's time, now that its images' size is known
            height, width = self._last_size
            FakeClock.now += self._seconds(trainer) * height * width / self.full_size**2

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        # The step takes its time now: the budget reads the clock when the step has ended.
        if not self.per_pixel:
            FakeClock.now += self._seconds(trainer)

    def _seconds(self, trainer) -> float:
        slow = 0 <= self.slow_from <= trainer.global_step
        return self.slow_seconds if slow else self.seconds


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
