"""How one command line becomes one process per device, each running the right Hydra job.

Why this exists: Lightning's DDP launcher starts ranks > 0 by re-running the parent's command
line (`sys.argv`) with LOCAL_RANK set. Under `python -m resnet_lightning -m ...` that command
line is the whole sweep, so every rank would start the sweep again, in a new sweep directory
(Lightning issue #11300). So each Hydra job publishes its own command line (its overrides, the
sweeper's values among them, and its directory) in an environment variable, and a rank started
by Lightning runs that job alone. The job's overrides still select a config that makes the
command a sweep by itself (`hydra.mode: MULTIRUN`: experiment=degradation,
hparams_search=optuna), so that command line also says `hydra.mode=RUN`.
torchrun and SLURM start every rank themselves; there ranks > 0 write no `.hydra/` and no log
file, rank 0 writes the run's outputs.

After a job, no distributed state is left behind: the next job of a multirun would otherwise
find LOCAL_RANK set (Lightning then assumes an external launcher and starts no ranks) and the
old process group still initialized. Nor is the job's memory: its trainer, model and data
module are freed before the next job starts (docs/distributed.md, memory over a sweep).

Run and sweep directories are named by the second they start; `unique_dir` creates each one
exclusively, so that runs started in the same second never share one. Composing a config also
resolves the directories that a later config replaces (OmegaConf's merge dereferences an
interpolation it overwrites: an experiment or search config that sets hydra.sweep.dir, once per
sweep job): those stay empty and are removed when a job starts and when the process ends.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, read_write

from resnet_lightning.training.config import with_budget_shorthand, with_null_groups
from resnet_lightning.training.resume import given_run_dir, with_saved_overrides

# Set by a Hydra job for the DDP ranks Lightning starts: the job's own command line.
JOB_ARGV_ENV = "RESNET_LIGHTNING_JOB_ARGV"
# Ranks other than 0 write no .hydra/ folder and no log file.
QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


# The directories `unique_dir` created in this process (and their parents), newest last.
CREATED_DIRS: list[Path] = []


def unique_dir(path: str) -> str:
    """`path`, else `path-1`, `path-2`, ...: the first that did not exist, created here.

    `os.mkdir` fails when the folder exists, so of two runs that start in the same second (and
    resolve the same name) each gets its own. Hydra resolves it once per run and once per sweep
    (its jobs share the sweep's resolver cache); the DDP ranks Lightning starts are given its
    directory, and ranks that torchrun or SLURM started take the name as it is (pass them
    hydra.run.dir to be sure they agree).
    """
    if launched_rank() > 0:
        return path
    base = Path(path)
    missing = [folder for folder in [base.parent, *base.parent.parents] if not folder.exists()]
    base.parent.mkdir(parents=True, exist_ok=True)
    CREATED_DIRS.extend(reversed(missing))  # the outermost first
    for n in itertools.count():
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        CREATED_DIRS.append(candidate)
        return str(candidate)
    raise AssertionError("unreachable")


OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)


def remove_unused_dirs(*in_use: Path) -> None:
    """Remove the directories `unique_dir` created in this process (and the parents it created)
    that are still empty and hold none of `in_use`."""
    keep = {Path(path).resolve() for path in in_use}
    keep |= {parent for path in keep for parent in path.parents}
    for folder in reversed(list(CREATED_DIRS)):  # the innermost first
        if folder.resolve() in keep:
            continue
        try:
            folder.rmdir()  # only if empty
        except OSError:
            continue
        CREATED_DIRS.remove(folder)


atexit.register(remove_unused_dirs)


def process_overrides(argv: list[str]) -> list[str]:
    """The overrides this process runs with, given those on its command line."""
    job_argv = os.environ.get(JOB_ARGV_ENV)
    if job_argv is not None and "LOCAL_RANK" in os.environ:
        return json.loads(job_argv)  # a rank started by Lightning: its parent's job alone
    argv = with_saved_overrides(with_budget_shorthand(with_null_groups(argv)))
    return [*argv, *QUIET_RANK_OVERRIDES] if launched_rank() > 0 else argv


def remove_half_written_run(argv: list[str]) -> None:
    """After the disk filled or refused a write while Hydra set a run up: remove the empty
    files it left (`.hydra/*.yaml`, `train.log`), and the run directory if nothing else is
    in it, so that no half-written run remains."""
    run_dir = given_run_dir(argv) or (CREATED_DIRS[-1] if CREATED_DIRS else None)
    if run_dir is None or not run_dir.is_dir():
        return
    for file in [*run_dir.glob(".hydra/*"), run_dir / "train.log"]:
        if file.is_file() and file.stat().st_size == 0:
            file.unlink()
    for folder in (run_dir / ".hydra", run_dir):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def launched_rank() -> int:
    """The global rank torchrun or SLURM gave this process (0 when started by hand)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


@contextmanager
def hydra_job() -> Iterator[None]:
    """Around one Hydra job (a run, or one job of a multirun): publishes the job's command line
    for the ranks Lightning will start, and afterwards restores the environment and destroys
    the process group."""
    hydra = HydraConfig.get()
    remove_unused_dirs(Path(hydra.runtime.output_dir))
    # Lightning's launcher reads hydra.run.dir for the ranks' command line: in a multirun that
    # would resolve (and create, unique_dir) a run directory of its own.
    with read_write(hydra.run):
        hydra.run.dir = hydra.runtime.output_dir
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
        # This job alone, even where a config the overrides select sets MULTIRUN: a rank
        # would otherwise run a sweep of its own, in a directory of its own (and a search's
        # second trial would wait for a rank 0 that never comes, forever).
        "hydra.mode=RUN",
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
        # The trainer, the module and the data module reference each other: only the cyclic
        # collector frees them, which waits for many more allocations than a job makes, so
        # each job of a multirun would keep every earlier job's alive.
        gc.collect()
