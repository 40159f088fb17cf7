"""How one command line becomes one process per device, each running the right Hydra job.

Why this exists: Lightning's DDP launcher starts ranks > 0 by re-running the parent's command
line (`sys.argv`) with LOCAL_RANK set. Under `python -m resnet_lightning -m ...` that command
line is the whole sweep, so every rank would start the sweep again, in a new sweep directory
(Lightning issue #11300). So each Hydra job publishes its own command line (its overrides and
its directory) in an environment variable, and a rank started by Lightning runs that job alone.
torchrun and SLURM start every rank themselves; there ranks > 0 write no `.hydra/` and no log
file, rank 0 writes the run's outputs.

After a job, no distributed state is left behind: the next job of a multirun would otherwise
find LOCAL_RANK set (Lightning then assumes an external launcher and starts no ranks) and the
old process group still initialized.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hydra.core.hydra_config import HydraConfig

from resnet_lightning.training.resume import with_saved_overrides

# Set by a Hydra job for the DDP ranks Lightning starts: the job's own command line.
JOB_ARGV_ENV = "RESNET_LIGHTNING_JOB_ARGV"
# Ranks other than 0 write no .hydra/ folder and no log file.
QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def process_overrides(argv: list[str]) -> list[str]:
    """The overrides this process runs with, given those on its command line."""
    job_argv = os.environ.get(JOB_ARGV_ENV)
    if job_argv is not None and "LOCAL_RANK" in os.environ:
        return json.loads(job_argv)  # a rank started by Lightning: its parent's job alone
    argv = with_saved_overrides(argv)
    return [*argv, *QUIET_RANK_OVERRIDES] if launched_rank() > 0 else argv


def launched_rank() -> int:
    """The global rank torchrun or SLURM gave this process (0 when started by hand)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


@contextmanager
def hydra_job() -> Iterator[None]:
    """Around one Hydra job (a run, or one job of a multirun): publishes the job's command line
    for the ranks Lightning will start, and afterwards restores the environment and destroys
    the process group."""
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
