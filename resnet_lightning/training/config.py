"""The run's config: conf/ composed as the CLI composes it, its values checked, its groups built.

Each config group maps one to one onto a constructor (`_target_`), whose signature is the
group's schema: an unknown key is a TypeError naming it, a bad value the constructor's own
ValueError. `instantiate_group` reports either as one line naming the group. The few keys no
constructor reads (the stopping rule, seed, threads, learning rate) are checked here, in
`check_config`, before anything is built or written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from resnet_lightning.errors import (
    InvalidArgument,
    UsageError,
    find_usage_error,
    is_unsafe_pickle,
    one_line,
    unsafe_file_message,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# `_target_`s that moved when the package took its layered layout, as configs saved in older
# checkpoints and run directories still name them.
MOVED_TARGETS = {
    "resnet_lightning.datamodule.CifarDataModule": "resnet_lightning.data.CifarDataModule",
    "resnet_lightning.module.ImageClassifier": "resnet_lightning.training.module.ImageClassifier",
    **{
        f"resnet_lightning.tensorboard_figures.{name}": f"resnet_lightning.callbacks.figures.{name}"
        for name in (
            "ConfusionMatrixFigure",
            "AugmentedImageGrid",
            "StageGradientNorms",
            "ParameterDistribution",
        )
    },
    "resnet_lightning.host_syncs.HostSyncCounter": (
        "resnet_lightning.callbacks.host_syncs.HostSyncCounter"
    ),
    "resnet_lightning.timing.EpochTimer": "resnet_lightning.callbacks.epoch_timer.EpochTimer",
}


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml with `overrides`; a bad override is a UsageError naming it."""
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except HydraException as err:
        # Hydra's message continues with every option and the search path: keep its first part.
        message = " ".join(str(err).strip().split("\n\n")[0].split())
        raise UsageError(f"{' '.join(overrides)}: {message}") from None


def instantiate_group(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` of the group `key`; bad arguments are a UsageError naming it."""
    try:
        return instantiate(OmegaConf.select(cfg, key), **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if find_usage_error(cause) is not None or cause is None:
            raise
        if isinstance(cause, InvalidArgument):
            raise UsageError(f"{key}.{cause}") from None
        if is_unsafe_pickle(cause):
            raise UsageError(f"{key}: {unsafe_file_message('the file it names', cause)}") from None
        if isinstance(cause, FileNotFoundError | ValueError | MisconfigurationException):
            raise UsageError(f"{key}: {one_line(cause)}") from None
        if isinstance(cause, TypeError):  # an argument the constructor does not take
            raise UsageError(f"{key}: {one_line(cause)}; fix or remove that {key} option") from None
        raise  # a failure inside a constructor: a bug, keep the traceback


def upgrade_saved_config(cfg: DictConfig) -> DictConfig:
    """A config saved by an older version, with moved `_target_`s renamed (in place)."""
    for node in _dict_nodes(cfg):
        target = node.get("_target_")
        if target in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[target]
    return cfg


def _dict_nodes(node: Any):
    if isinstance(node, DictConfig):
        yield node
        for value in node.values():
            yield from _dict_nodes(value)
    elif OmegaConf.is_list(node):
        for value in node:
            yield from _dict_nodes(value)


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
