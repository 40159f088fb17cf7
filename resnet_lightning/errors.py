"""Errors a user can fix, and how every command line reports them: one `error: ...` line
naming the problem and the fix, exit code 2, no traceback.

The project raises UsageError (and its kinds below) itself. Hydra, OmegaConf and Lightning
raise their own exceptions for bad overrides and Trainer arguments; `describe_bad_input`
reads those from their attributes (the key, the missing config file, the options), not from
their message text.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import CompactHydraException, MissingConfigException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

# The errors of a file system that a user fixes (free space, permissions), not a bug.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# What torch.load(weights_only=True) says when a file would run code when unpickled.
UNSAFE_PICKLE = "Weights only load failed"
# Configs of the optional Hydra plugins, by the pyproject extra that installs each.
PLUGIN_CONFIGS = {"optuna": "sweep", "joblib": "sweep", "submitit_slurm": "slurm"}
# Classes whose package is optional, by the pyproject extra that installs it.
TARGET_EXTRAS = {
    "lightning.pytorch.loggers.MLFlowLogger": "mlflow",
    "resnet_lightning.training.tracking.ResumableMLFlowLogger": "mlflow",
    "lightning.pytorch.loggers.WandbLogger": "wandb",
}
LIST_OPTIONS = "`python -m resnet_lightning --cfg job` prints every option"


class UsageError(Exception):
    """Bad input (a config value, a file, a data set); the message names the problem and the fix."""


class DataError(UsageError):
    """The data set is missing, unreadable or not the shape it should have."""


class CheckpointError(UsageError):
    """A checkpoint is missing, corrupt, unsafe to load, of another model, or cannot be written."""


class TrainingDivergedError(UsageError):
    """The training loss became NaN or infinite; training stops at that step."""


class InvalidArgument(ValueError):
    """A constructor argument with a value it cannot take. The message starts `name=value`, so
    that the CLI, which knows the config group, can name the key (`data.batch_size=0 ...`)."""

    def __init__(self, name: str, value: object, requirement: str):
        super().__init__(f"{name}={value!r} {requirement}")
        self.name = name


def find_usage_error(err: BaseException | None) -> UsageError | None:
    """The UsageError behind `err`, looking through wrappers (Hydra's InstantiationException,
    and OmegaConf's error for a resolver that raised, which keeps it as the context only)."""
    while err is not None and not isinstance(err, UsageError):
        wrapped = isinstance(err, InterpolationResolutionError)
        err = err.__cause__ or (err.__context__ if wrapped else None)
    return err


def unsafe_file_message(what: str, err: BaseException) -> str:
    """The message for a file that torch.load(weights_only=True) refused to unpickle."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    detail = f" ({found.group(1)})" if found else ""
    return (
        f"refusing to load {what}: it holds Python objects that would run code when "
        f"loaded{detail}, which no checkpoint or weight file needs; use only files from a "
        "source you trust, or re-save the weights with torch.save(model.state_dict())"
    )


def is_unsafe_pickle(err: BaseException) -> bool:
    return isinstance(err, pickle.UnpicklingError) and UNSAFE_PICKLE in str(err)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input ends the process with `error: <problem and fix>` on stderr and exit code 2.
    Any other exception (a bug) propagates with its full traceback."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra then raises its errors instead of printing a multi-line report and exiting 1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as err:
        message = describe_bad_input(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        log_to_files(f"error: {message}")
        raise SystemExit(2) from None
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def log_to_files(line: str) -> None:
    """Write `line` to the log files of the root logger (a run's train.log), not the console,
    where it has been printed already."""
    record = logging.LogRecord("resnet_lightning", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:  # a full disk or a closed file loses the line there, not the error itself
                handler.stream.write(handler.format(record) + handler.terminator)
                handler.flush()
            except (OSError, ValueError, AttributeError):
                pass


def describe_bad_input(err: BaseException) -> str | None:
    """One line naming the problem and the fix when `err` is bad input, else None."""
    usage_error = find_usage_error(err)
    if usage_error is not None:
        return str(usage_error)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        if name in PLUGIN_CONFIGS:  # a config that an optional Hydra plugin brings
            return (
                f"{group}={name} needs a Hydra plugin that is not installed; "
                f"pip install -e '.[{PLUGIN_CONFIGS[name]}]'"
            )
        if err.options:
            options = ", ".join(o for o in err.options if not o.startswith("_"))
            return (
                f"{group}={name} is unknown (no conf/{group}/{name}.yaml); choose one of: {options}"
            )
    if isinstance(err, CompactHydraException):  # a bad override or config composition
        cause = err.__cause__
        key = getattr(cause, "full_key", None)
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and key:
            reason = str(cause).splitlines()[0]
            return f"{key} is not an option ({reason}); check its spelling ({LIST_OPTIONS})"
        if isinstance(cause, OmegaConfBaseException) and key:  # a value of the wrong type
            return f"{key}: {str(cause).splitlines()[0]} ({LIST_OPTIONS})"
        return f"{one_line(err)}; {LIST_OPTIONS}"
    if isinstance(err, RuntimeError) and str(err).startswith("Unknown plugin class"):
        return (
            f"{one_line(err)}: that Hydra plugin is not installed; pip install -e '.[slurm]' "
            "for hydra/launcher=submitit_slurm, '.[sweep]' for hydra/launcher=parallel and "
            "hparams_search=optuna"
        )
    if isinstance(err, MisconfigurationException):  # Lightning rejecting Trainer arguments
        return f"trainer: {one_line(err)}"
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        where = f": could not write {err.filename}" if err.filename else ""
        return (
            f"the disk is full{where} ({err.strerror}); free space there, or point "
            "hydra.run.dir (and data.root) at another disk"
        )
    if isinstance(err, OSError) and err.errno in NOT_WRITABLE and err.filename:
        return (
            f"cannot write {err.filename} ({err.strerror}); make it writable, or point "
            "hydra.run.dir (and data.root) at a writable folder"
        )
    return None


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
