"""A learning-rate schedule as a function of one position in [0, 1], for time budgets.

A recipe's schedule is written for a number of epochs (MultiStepLR's milestones, cosine's
T_max, the warm-up's epochs) or steps (one-cycle's total). Under a time budget the steps are
not known in advance, so the schedule is tabulated once as the recipe would run it without a
budget, step by step through torch's own schedulers, and the budget's position picks the
entry: position 0.3 is where 30% of the recipe's steps would be. Every schedule torch has
(and any a config names) keeps its shape, stretched over the time there is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim import Optimizer

SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class PositionSchedule:
    """Sets every parameter group's learning rate (and momentum, where the schedule cycles
    it) to the tabulated schedule's value at a position in [0, 1].

    Args:
        optimizer: the run's optimizer; each group's current lr is its base (scales of the
            groups, e.g. a backbone's or the batch's, are kept).
        lr_factors: (N + 1,) the schedule's learning rate over its N steps, as a fraction of
            the optimizer's configured lr.
        momenta: (N + 1,) the momentum (or Adam's beta1) at each step, or None when the
            schedule leaves it alone.
    """

    def __init__(
        self, optimizer: Optimizer, lr_factors: torch.Tensor, momenta: torch.Tensor | None
    ) -> None:
        self.optimizer = optimizer
        self.lr_factors, self.momenta = lr_factors, momenta
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def apply(self, position: float) -> None:
        index = self._index(position)
        factor = float(self.lr_factors[index])
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
            if self.momenta is not None:
                momentum = float(self.momenta[index])
                if "betas" in group:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum

    def _index(self, position: float) -> int:
        last = len(self.lr_factors) - 1
        return min(max(int(position * last), 0), last)


def tabulate_schedule(
    optimizer_factory: Callable[..., Optimizer],
    scheduler_factory: SchedulerFactory | None,
    interval: str,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 1.0,
    scheduler_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The schedule's learning rate (as a fraction of the configured lr) and momentum at each
    of `total_steps` optimizer steps, stepped as Lightning steps it: the warm-up every step,
    the scheduler every step or at the end of each epoch (`interval`). `scheduler_kwargs`
    complete the scheduler's arguments (one-cycle's `total_steps`)."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = optimizer_factory([param])
    group = optimizer.param_groups[0]
    configured_lr = group["lr"]
    schedulers = []
    if warmup_steps:
        schedulers.append(
            torch.optim.lr_scheduler.LinearLR(
                optimizer, warmup_start_factor, 1.0, total_iters=warmup_steps
            )
        )
    main = None
    if scheduler_factory is not None:
        main = scheduler_factory(optimizer, **(scheduler_kwargs or {}))
    lrs, momenta = [], []
    momentum_key = "betas" if "betas" in group else "momentum" if "momentum" in group else None
    for step in range(total_steps + 1):
        lrs.append(group["lr"] / configured_lr)
        if momentum_key == "betas":
            momenta.append(group["betas"][0])
        elif momentum_key:
            momenta.append(group["momentum"])
        if step == total_steps:
            break
        optimizer.step()  # nothing to update (no gradient); keeps torch's order check quiet
        for scheduler in schedulers:
            scheduler.step()
        if main is not None and (interval == "step" or (step + 1) % steps_per_epoch == 0):
            main.step()
    momentum_table = torch.tensor(momenta, dtype=torch.float64) if momenta else None
    if momentum_table is not None and bool((momentum_table == momentum_table[0]).all()):
        momentum_table = None  # the schedule leaves it alone: so do we
    return torch.tensor(lrs, dtype=torch.float64), momentum_table
