"""Errors a user can fix: the CLI prints their message on one line and exits non-zero."""

import re

# What torch.load(weights_only=True) says when a file would run code when unpickled.
UNSAFE_PICKLE = "Weights only load failed"


class UsageError(Exception):
    """Bad input (a config value, a file, a data set); the message names the problem and the fix."""


class DataError(UsageError):
    """The data set is missing, unreadable or not the shape CIFAR-10 should have."""


class CheckpointError(UsageError):
    """A checkpoint is missing, corrupt, unsafe to load, of another model, or cannot be written."""


class TrainingDivergedError(UsageError):
    """The training loss became NaN or infinite; training stops at that step."""


def find_usage_error(err: BaseException | None) -> UsageError | None:
    """The UsageError behind `err`, looking through wrappers (Hydra's InstantiationException)."""
    while err is not None and not isinstance(err, UsageError):
        err = err.__cause__
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
