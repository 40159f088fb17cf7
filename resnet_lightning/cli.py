"""What the command lines share: the arguments each process runs with, and bad input on one line.

Distributed runs start one process per device: Lightning's launcher re-runs this command for
ranks > 0, torchrun and SLURM start every rank themselves. Only rank 0 writes the run's outputs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    CompactHydraException,
    InstantiationException,
    MissingConfigException,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException

from resnet_lightning.errors import UNSAFE_PICKLE, find_usage_error, unsafe_file_message
from resnet_lightning.resume import with_saved_overrides

# Configs of the optional Hydra plugins, by the pyproject extra that installs each.
PLUGIN_CONFIGS = {"optuna": "sweep", "joblib": "sweep", "submitit_slurm": "slurm"}
# Set by a Hydra job for the DDP ranks Lightning starts: the job's own command line.
JOB_ARGV_ENV = "RESNET_LIGHTNING_JOB_ARGV"
# Ranks other than 0 write no .hydra/ folder and no log file.
QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def process_argv(argv: list[str]) -> list[str]:
    """The overrides this process runs with, given those on its command line."""
    job_argv = os.environ.get(JOB_ARGV_ENV)
    if job_argv is not None and "LOCAL_RANK" in os.environ:
        # A rank started by Lightning's launcher, which re-runs the parent's command line:
        # under `-m` that is the whole sweep, so each rank would run every job in a new sweep
        # directory. Run the parent's job alone, in its directory.
        return json.loads(job_argv)
    argv = with_saved_overrides(argv)
    return [*argv, *QUIET_RANK_OVERRIDES] if launched_rank() > 0 else argv


def launched_rank() -> int:
    """The global rank torchrun or SLURM gave this process (0 when started by hand)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


@contextmanager
def hydra_job() -> Iterator[None]:
    """Around one Hydra job (a run, or one job of a multirun).

    Publishes the job's command line for the DDP ranks Lightning will start, and afterwards
    leaves no distributed state behind: the next job of a multirun would otherwise find
    LOCAL_RANK set (Lightning then assumes an external launcher and starts no ranks) and the
    old process group still initialized.
    """
    hydra = HydraConfig.get()
    config_dirs = [
        arg
        for source in hydra.runtime.config_sources
        if source.provider == "command-line"
        for arg in ("--config-dir", source.path)
    ]
    job_argv = [
        *config_dirs,
        f"--config-name={hydra.job.config_name}",
        *hydra.overrides.task,
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        *QUIET_RANK_OVERRIDES,
    ]
    if launched_rank() > 0:
        # A rank that SLURM started inside the job (submitit runs the job once per task):
        # rank 0 alone writes the job's log file.
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
    saved_env = dict(os.environ)
    os.environ[JOB_ARGV_ENV] = json.dumps(job_argv)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input ends the process with `error: <problem and fix>` on stderr and exit code 2, no
    traceback. Any other exception (a bug) propagates with its full traceback."""
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
        raise SystemExit(2) from None
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


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
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        options = ", ".join(o for o in err.options if not o.startswith("_"))
        return f"{group}={name} is unknown (no conf/{group}/{name}.yaml); choose one of: {options}"
    if isinstance(err, InstantiationException):
        cause = err.__cause__
        if isinstance(cause, pickle.UnpicklingError) and UNSAFE_PICKLE in str(cause):
            return f"{_config_key(err)}: {unsafe_file_message('the file it names', cause)}"
        if isinstance(cause, FileNotFoundError):  # a file named in the config is not there
            return f"{_config_key(err)}: {_one_line(cause)}"
        if not isinstance(cause, TypeError | ValueError | MisconfigurationException):
            return None  # a failure inside a constructor: a bug, keep the traceback
        key = _config_key(err)
        return f"{key}: {type(cause).__name__}: {_one_line(cause)}; fix or remove that {key} option"
    if isinstance(err, CompactHydraException):  # a bad override or config composition
        listing = "`python -m resnet_lightning --cfg job` prints every option"
        unknown = re.match(r"Could not override '(.+?)'", str(err))
        if unknown and err.__cause__:
            key, reason = unknown.group(1), str(err.__cause__).splitlines()[0]
            return f"{key} is not an option ({reason}); check its spelling ({listing})"
        return f"{_one_line(err)}; {listing}"
    if isinstance(err, RuntimeError) and str(err).startswith("Unknown plugin class"):
        return (
            f"{_one_line(err)}: that Hydra plugin is not installed; pip install -e '.[slurm]' "
            "for hydra/launcher=submitit_slurm, '.[sweep]' for hydra/launcher=parallel and "
            "hparams_search=optuna"
        )
    if isinstance(err, MisconfigurationException):  # Lightning rejecting Trainer arguments
        return f"trainer: {_one_line(err)}"
    return None


def _config_key(err: InstantiationException) -> str:
    found = re.search(r"full_key: (\S+)", str(err))
    return found.group(1) if found else "the config"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
