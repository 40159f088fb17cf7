"""The run's config: conf/ composed as the CLI composes it, its values checked, its groups built.

Each config group maps one to one onto a constructor (`_target_`), whose signature is the
group's schema: an unknown key is a TypeError naming it, a bad value the constructor's own
ValueError. `instantiate_group` reports either as one line naming the group. The few keys no
constructor reads (the stopping rule, seed, threads, learning rate) are checked here, in
`check_config`, before anything is built or written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from resnet_lightning.callbacks.time_budget import parse_budget
from resnet_lightning.data import image_folder_classes
from resnet_lightning.data.cifar import ReadLimits
from resnet_lightning.errors import (
    TARGET_EXTRAS,
    InvalidArgument,
    UsageError,
    find_usage_error,
    is_unsafe_pickle,
    one_line,
    unsafe_file_message,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# What a config read from a checkpoint or a run directory may instantiate: classes of these
# packages (constructing an optimizer, a callback or a Trainer writes nothing by itself) and
# these functions. A function such as builtins.open or torchvision.utils.save_image could
# write anywhere.
TRUSTED_PACKAGES = (
    "resnet_lightning",
    "torch.optim",
    "torchvision.transforms",
    "lightning.pytorch",
    "torchmetrics",
)
TRUSTED_FUNCTIONS = ("resnet_lightning.models.create_model",)
# Classes of those packages that write files or fetch data when built or run with the paths
# a config gives them.
UNTRUSTED_MODULES = ("lightning.pytorch.profilers", "lightning.pytorch.demos")
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


def with_null_groups(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides with `group=null` made what it means, as Hydra itself refuses a
    null group choice: no loggers or callbacks for `logger=null` / `callbacks=null` (as
    `logger=[]`), the default for the groups whose default is none (`experiment=null`), and
    a one-line error for a group that needs a choice (`model=null`)."""
    result = []
    for override in overrides:
        group, equals, value = override.partition("=")
        if not (equals and value == "null" and (Path(CONFIG_DIR) / group).is_dir()):
            result.append(override)
        elif group in ("logger", "callbacks"):
            result.append(f"{group}=[]")
        elif group not in ("debug", "experiment", "hparams_search"):
            options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("[!_]*.yaml"))
            raise UsageError(f"{group}=null: {group} needs a choice, one of: {', '.join(options)}")
    return result


def with_budget_shorthand(overrides: Sequence[str]) -> list[str]:
    """`budget=30m` (or 90s, 1.5h, a number of minutes; `budget=5m,10m` in a sweep) as the
    `budget.minutes=...` it stands for; `budget=null` for none."""
    result = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if key.lstrip("+") != "budget" or not equals:
            result.append(override)
            continue
        if value.lower() in ("null", "none"):
            result.append("budget.minutes=null")
            continue
        try:
            minutes = [parse_budget(part) for part in value.split(",")]
        except ValueError:
            raise UsageError(
                f"{override} is not a duration; e.g. budget=30m, budget=90s, budget=1.5h"
            ) from None
        result.append("budget.minutes=" + ",".join(format(m, ".10g") for m in minutes))
    return result


def sweep_label() -> str:
    """In a multirun job: its model and the values of the overrides the sweep varies, e.g.
    `resnet56,optimizer.lr=0.05`, so that TensorBoard tells the jobs apart by name
    (`version: ${sweep_label:}` in conf/logger/tensorboard.yaml); "" outside a multirun.

    The varied keys are those given with sweep syntax on the command line (`a=1,2`, `range()`,
    ...), as the sweep's multirun.yaml keeps them, and those of the sweeper's search space
    (`hydra.sweeper.params`: Optuna's, or an experiment's such as degradation).
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    hydra = HydraConfig.get()
    parser = OverridesParser.create()
    varied = list((hydra.sweeper.get("params") or {}).keys())
    multirun = Path(hydra.sweep.dir) / "multirun.yaml"
    if multirun.is_file():
        command_line = OmegaConf.load(multirun).hydra.overrides.task
        varied += [
            o.get_key_element()
            for o in parser.parse_overrides(list(command_line))
            if o.is_sweep_override()
        ]
    job = {
        o.get_key_element(): o.value() for o in parser.parse_overrides(list(hydra.overrides.task))
    }
    parts = [hydra.runtime.choices.get("model", "")]
    parts += [f"{key}={job[key]}" for key in dict.fromkeys(varied) if key in job and key != "model"]
    return ",".join(p for p in parts if p).replace("/", "-")


OmegaConf.register_new_resolver("sweep_label", sweep_label)


def data_classes(*, _parent_: DictConfig) -> int:
    """The number of class folders of the data config's `path` (an archive extracted into its
    `root` first), so that `num_classes: ${image_folder_classes:}` in conf/data/imagefolder.yaml
    sizes the model's head from the data (`model.num_classes: ${data.num_classes}`)."""
    limits = ReadLimits(_parent_.max_image_mb, _parent_.max_total_gb)
    return image_folder_classes(_parent_.path, _parent_.root, limits)


OmegaConf.register_new_resolver("image_folder_classes", data_classes)


def instantiate_group(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` of the group `key`; bad arguments are a UsageError naming it."""
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if find_usage_error(cause) is not None or cause is None:
            raise
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if isinstance(cause, ModuleNotFoundError) and target in TARGET_EXTRAS:
            raise UsageError(
                f"{key} ({target.rsplit('.', 1)[-1]}) needs a package that is not installed; "
                f"pip install -e '.[{TARGET_EXTRAS[target]}]'"
            ) from None
        if isinstance(cause, InvalidArgument):
            raise UsageError(f"{key}.{cause}") from None
        if is_unsafe_pickle(cause):
            raise UsageError(f"{key}: {unsafe_file_message('the file it names', cause)}") from None
        if isinstance(cause, FileNotFoundError | ValueError | MisconfigurationException):
            raise UsageError(f"{key}: {one_line(cause)}") from None
        if isinstance(cause, TypeError):  # an argument the constructor does not take
            raise UsageError(f"{key}: {one_line(cause)}; fix or remove that {key} option") from None
        raise  # a failure inside a constructor: a bug, keep the traceback


def build_module(cfg: DictConfig, net: torch.nn.Module) -> Any:
    """The run's LightningModule (`module`) around `net`, with the optimizer and scheduler
    factories of `optimizer` and `scheduler` (none for `scheduler: null`)."""
    return instantiate_group(
        cfg,
        "module",
        net=net,
        optimizer=instantiate_group(cfg, "optimizer"),
        scheduler=instantiate_group(cfg, "scheduler") if cfg.scheduler else None,
    )


def trusted_saved_config(cfg: DictConfig, source: str) -> DictConfig:
    """A config read from a file (a checkpoint's, a run directory's), resolved, with moved
    `_target_`s renamed, and refused unless every `_target_` in it is one a run of this
    framework can name (`check_targets`): nothing else in such a file is ever called."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise UsageError(f"{source}: its saved config does not resolve ({one_line(err)})") from None
    for _, node in _dict_nodes(cfg):
        if node.get("_target_") in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[node["_target_"]]
    check_targets(cfg, source)
    return cfg


def check_targets(cfg: DictConfig, source: str) -> None:
    """Raise UsageError naming the first `_target_` (at any depth, in lists too) that is not
    a class of a trusted package (TRUSTED_PACKAGES) or one of TRUSTED_FUNCTIONS."""
    for key, node in _dict_nodes(cfg):
        target = node.get("_target_")
        if target is not None and not _is_trusted_target(target):
            raise UsageError(
                f"refusing {source}: its config names _target_ {target!r} at {key or 'the top'}, "
                f"and a saved config may only name classes of {', '.join(TRUSTED_PACKAGES)} or "
                f"{', '.join(TRUSTED_FUNCTIONS)}; use only checkpoints and runs from a source "
                "you trust"
            )


def _is_trusted_target(target: object) -> bool:
    if not isinstance(target, str):
        return False
    if target in TRUSTED_FUNCTIONS:
        return True
    if not _in_packages(target, TRUSTED_PACKAGES):
        return False
    try:  # a module of a trusted package: importing it runs nothing a run would not
        obj = get_object(target)
    except Exception:  # not there: instantiating it would fail anyway
        return False
    # Defined in a trusted package, not imported into one (`....cifar.zipfile.ZipFile`).
    module = getattr(obj, "__module__", "") or ""
    return (
        isinstance(obj, type)
        and _in_packages(module, TRUSTED_PACKAGES)
        and not _in_packages(module, UNTRUSTED_MODULES)
    )


def _in_packages(name: str, packages: Sequence[str]) -> bool:
    return any(name == package or name.startswith(f"{package}.") for package in packages)


def _dict_nodes(node: Any, key: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(dotted key, node) of every dict in `node`, itself included, lists entered."""
    if isinstance(node, DictConfig):
        yield key, node
        for name, value in node.items():
            yield from _dict_nodes(value, f"{key}.{name}" if key else str(name))
    elif OmegaConf.is_list(node):
        for i, value in enumerate(node):
            yield from _dict_nodes(value, f"{key}[{i}]")


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
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"trainer.accelerator={accelerator} (trainer=gpu or trainer=ddp) but this machine has "
            "no CUDA GPU; use trainer=cpu, or trainer=ddp_cpu for DDP on the CPU"
        )
    seed = cfg.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise UsageError(f"seed={seed!r} must be an integer (0 included) or null for a random one")
    threads = cfg.get("num_threads")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise UsageError(f"num_threads={threads!r} must be a positive integer, or null")


def take_time_budget(cfg: DictConfig) -> float | None:
    """The run's time budget in minutes (None: none), from `budget.minutes` or Lightning's
    `trainer.max_time`, which means the same here: the latter is moved into the budget (and
    taken off the Trainer, whose own timer would stop the run before the schedule ends)."""
    minutes = _budget_minutes(OmegaConf.select(cfg, "budget.minutes"), "budget.minutes")
    max_time = OmegaConf.select(cfg, "trainer.max_time")
    if max_time is None:
        return minutes
    if isinstance(max_time, DictConfig):  # Lightning's dict form: {days, hours, minutes, ...}
        units = {"days": 1440, "hours": 60, "minutes": 1, "seconds": 1 / 60}
        unknown = set(max_time) - set(units)
        if unknown:
            raise UsageError(f"trainer.max_time has unknown keys {sorted(unknown)}; use {units}")
        as_minutes = sum(float(max_time[key]) * units[key] for key in max_time)
    else:
        as_minutes = _budget_minutes(max_time, "trainer.max_time")
    if minutes is not None and abs(minutes - as_minutes) > 1e-9:
        raise UsageError(
            f"budget.minutes={minutes:g} and trainer.max_time={max_time} disagree; they are the "
            "same budget here: give one of them"
        )
    with open_dict(cfg):
        cfg.trainer.max_time = None
    return as_minutes


def _budget_minutes(value: Any, key: str) -> float | None:
    if value is None:
        return None
    example = "budget.minutes=30 (or budget=30m, budget=90s, budget=1.5h)"
    try:
        minutes = parse_budget(value) if isinstance(value, str) else float(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} is not a duration; e.g. {example}") from None
    if isinstance(value, bool) or not minutes > 0 or minutes == float("inf"):
        raise UsageError(f"{key}={value!r} must be a positive duration, e.g. {example}")
    return minutes


def _number(cfg: DictConfig, key: str) -> float | None:
    value = OmegaConf.select(cfg, key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise UsageError(f"{key}={value!r} must be a number")
    return value
