"""Every learning-rate schedule of conf/scheduler/, built from the real config by the module's
configure_optimizers and stepped by Lightning through a short fit, gives at each step the
learning rate of its closed-form formula, written out here."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resnet_lightning.data.tensor_loader import intra_op_threads
from resnet_lightning.training.config import build_module
from tests.cli_harness import CONFIG_DIR, bare_trainer, compose_config

EPOCHS, STEPS_PER_EPOCH = 6, 4
TOTAL = EPOCHS * STEPS_PER_EPOCH


def warmup_factor(cfg: DictConfig, step: int) -> float:
    """Linear from warmup_start_factor to 1 over warmup_epochs of steps, then 1."""
    warmup = round(cfg.module.warmup_epochs * STEPS_PER_EPOCH)
    if not warmup:
        return 1.0
    start = cfg.module.warmup_start_factor
    return start + (1 - start) * min(step, warmup) / warmup


def constant(cfg: DictConfig, step: int, epoch: int) -> float:
    return cfg.optimizer.lr


def multistep(cfg: DictConfig, step: int, epoch: int) -> float:
    """lr x gamma for every milestone epoch reached, after the warm-up (if any)."""
    passed = sum(epoch >= milestone for milestone in cfg.scheduler.milestones)
    return cfg.optimizer.lr * warmup_factor(cfg, step) * cfg.scheduler.gamma**passed


def cosine(cfg: DictConfig, step: int, epoch: int) -> float:
    """Half a cosine from lr down to eta_min over T_max epochs, per epoch."""
    lr, low = cfg.optimizer.lr * warmup_factor(cfg, step), cfg.scheduler.eta_min
    return low + (lr - low) * (1 + math.cos(math.pi * epoch / cfg.scheduler.T_max)) / 2


def linear_to_zero(cfg: DictConfig, step: int, epoch: int) -> float:
    """From lr x start_factor to lr x end_factor over the run's steps, step by step."""
    start, end = cfg.scheduler.start_factor, cfg.scheduler.end_factor
    return cfg.optimizer.lr * (start + (end - start) * step / TOTAL)


# torch's defaults, where the config leaves them
ONECYCLE_DEFAULTS = {
    "div_factor": 25.0,
    "final_div_factor": 1e4,
    "base_momentum": 0.85,
    "max_momentum": 0.95,
}


def onecycle_phase(cfg: DictConfig, step: int) -> float:
    """Where `step` is in one-cycle's two phases: 0 to 1 over the first pct_start of the steps
    (its last step the peak), 1 to 2 over the rest (the last step at 2)."""
    peak = cfg.scheduler.pct_start * TOTAL - 1
    return step / peak if step <= peak else 1 + (step - peak) / (TOTAL - 1 - peak)


def onecycle(cfg: DictConfig, step: int, epoch: int) -> float:
    """Linear from max_lr / div_factor up to max_lr, then down to that start / final_div_factor
    (anneal_strategy=linear)."""
    args = ONECYCLE_DEFAULTS | dict(cfg.scheduler)
    assert args["anneal_strategy"] == "linear"
    top = args["max_lr"]
    start = top / args["div_factor"]
    phase = onecycle_phase(cfg, step)
    if phase <= 1:
        return start + (top - start) * phase
    return top + (start / args["final_div_factor"] - top) * (phase - 1)


def onecycle_momentum(cfg: DictConfig, step: int) -> float:
    """The momentum's cycle, the other way round: max_momentum down to base_momentum as the
    learning rate rises, and back."""
    args = ONECYCLE_DEFAULTS | dict(cfg.scheduler)
    high, low = args["max_momentum"], args["base_momentum"]
    phase = onecycle_phase(cfg, step)
    return high + (low - high) * phase if phase <= 1 else low + (high - low) * (phase - 1)


FORMULAS = {
    "none": constant,
    "multistep": multistep,
    "multistep_warmup": multistep,
    "cosine": cosine,
    "linear_to_zero": linear_to_zero,
    "onecycle": onecycle,
}
# Milestones the short run reaches (the configs' 30/60/90 epochs scaled to six).
SHORT = {
    "multistep": ["scheduler.milestones=[2,4]"],
    "multistep_warmup": ["scheduler.milestones=[2,4]"],
}


def test_every_scheduler_config_has_its_formula_here():
    configs = {path.stem for path in (Path(CONFIG_DIR) / "scheduler").glob("*.yaml")}
    assert configs == FORMULAS.keys()


class RecordSchedule(L.Callback):
    """The learning rate and momentum each optimizer step uses."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.momenta: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.lrs.append(group["lr"])
        self.momenta.append(group["momentum"])


def scheduled_fit(overrides: list[str]) -> tuple[DictConfig, RecordSchedule]:
    """The configured module, optimizer and schedule over a fit of EPOCHS epochs of
    STEPS_PER_EPOCH steps, on a linear net and random images (the schedule's subject is
    neither)."""
    cfg = compose_config(["optimizer=sgd", f"trainer.max_epochs={EPOCHS}", *overrides])
    torch.manual_seed(0)
    module = build_module(cfg, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)))
    images, labels = torch.randn(2 * STEPS_PER_EPOCH, 3, 4, 4), torch.randint(0, 10, (8,))
    record = RecordSchedule()
    trainer = bare_trainer(max_epochs=EPOCHS, callbacks=[record])
    with intra_op_threads(1):  # ops this small only wait for each other's threads
        trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=2))
    assert len(record.lrs) == TOTAL
    return cfg, record


@pytest.mark.parametrize(
    ("scheduler", "extra"),
    [
        *((name, SHORT.get(name, [])) for name in FORMULAS),
        ("cosine", ["module.warmup_epochs=1.5"]),  # the modern recipes' warm-up, then cosine
    ],
)
def test_learning_rate_follows_the_formula_at_every_step(scheduler, extra):
    cfg, record = scheduled_fit([f"scheduler={scheduler}", *extra])
    formula = FORMULAS[scheduler]
    expected = [formula(cfg, step, step // STEPS_PER_EPOCH) for step in range(TOTAL)]
    assert record.lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
    if scheduler == "onecycle":
        expected = [onecycle_momentum(cfg, step) for step in range(TOTAL)]
        assert record.momenta == pytest.approx(expected)
    else:  # the configured momentum throughout
        assert set(record.momenta) == {cfg.optimizer.momentum}
