"""Checks of config values that the constructors would accept but that make no run.

Run before anything is built, so a mistyped number stops the run with a one-line error and
nothing written but Hydra's .hydra/ record of the command.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from resnet_lightning.errors import UsageError


def check_config(cfg: DictConfig) -> None:
    """Raise UsageError naming the first bad value and a good one."""
    lr = _number(cfg, "optimizer.lr")
    if lr is not None and not lr > 0:  # `not >` also catches nan
        raise UsageError(f"optimizer.lr={lr} must be positive, e.g. optimizer.lr=0.1")
    max_epochs = _number(cfg, "trainer.max_epochs")
    max_steps = _number(cfg, "trainer.max_steps")
    max_steps = -1 if max_steps is None else max_steps
    if max_epochs is not None and max_epochs < 1 and not (max_epochs == -1 and max_steps > 0):
        raise UsageError(
            f"trainer.max_epochs={max_epochs} must be positive, e.g. trainer.max_epochs=100 "
            "(or -1 with trainer.max_steps=<steps> to train for a number of steps)"
        )
    if max_steps == 0 or max_steps < -1:
        raise UsageError(
            f"trainer.max_steps={max_steps} must be positive, or -1 to stop by trainer.max_epochs"
        )
    seed = cfg.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise UsageError(f"seed={seed!r} must be an integer (0 included) or null for a random one")
    threads = cfg.get("num_threads")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise UsageError(f"num_threads={threads!r} must be a positive integer, or null")


def _number(cfg: DictConfig, key: str) -> float | None:
    value = OmegaConf.select(cfg, key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise UsageError(f"{key}={value!r} must be a number")
    return value
