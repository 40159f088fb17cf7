"""Resuming a run so that it ends exactly where an uninterrupted run would.

`resume=auto` continues from `<run dir>/checkpoints/last.ckpt` (a fresh run when there is none),
`resume=<path>` from that checkpoint. Lightning restores the weights, optimizer, scheduler and
loop counters, but no random-number state; the two pieces below make each epoch's randomness a
function of (seed, epoch) alone, so the epochs after a resume draw what they would have drawn.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sized
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import RandomSampler

from resnet_lightning.checkpointing import remove_partial_checkpoints
from resnet_lightning.errors import UsageError

log = logging.getLogger(__name__)
LAST_CHECKPOINT = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint `cfg.resume` names, or None to start fresh."""
    resume = cfg.get("resume")
    if resume is None:
        return None
    if resume == "auto":
        folder = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath")
        folder = Path(folder or Path(cfg.paths.output_dir) / "checkpoints")
        remove_partial_checkpoints(folder)
        last = folder / LAST_CHECKPOINT
        if not last.is_file():
            log.info("resume=auto: no %s yet, starting a fresh run", last)
            return None
        log.info("resume=auto: continuing from %s", last)
        return str(last)
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise UsageError(
            f"resume={resume}: no such checkpoint file; pass a .ckpt path, or resume=auto "
            "with hydra.run.dir=<the run's directory>"
        )
    return str(path)


def with_saved_overrides(argv: list[str]) -> list[str]:
    """`resume=auto hydra.run.dir=<run>`: put the run's own overrides (.hydra/overrides.yaml)
    before `argv`, so the run continues with the settings it started with. Overrides given on
    the command line win; a multirun repeats its sweep arguments itself."""
    if "resume=auto" not in argv or {"-m", "--multirun"} & set(argv):
        return argv
    run_dirs = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith("hydra.run.dir=")]
    saved_file = Path(run_dirs[-1]) / ".hydra" / "overrides.yaml" if run_dirs else None
    if saved_file is None or not saved_file.is_file():
        return argv
    given = {_override_key(a) for a in argv}
    saved = yaml.safe_load(saved_file.read_text()) or []
    return [*(o for o in saved if _override_key(o) not in given), *argv]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


class EpochSeededSampler(RandomSampler):
    """A RandomSampler whose order depends only on (seed, epoch), as DistributedSampler's does.

    RandomSampler draws its order from the global RNG's history, which a resumed run does not
    share. Lightning calls `set_epoch` at each epoch start, and under DDP swaps this sampler for
    its DistributedSampler (also seeded by the run's seed and the epoch).
    """

    def __init__(self, data_source: Sized, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class ReseedEachEpoch(L.Callback):
    """Seeds torch, numpy and random from (seed, epoch, rank) as each training epoch starts.

    Random crops and flips (in the main process, `data.num_workers=0`) then repeat exactly after
    a resume. Worker processes are seeded from the loader's own generator; with workers the
    batches hold the same images after a resume but their augmentation differs.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entropy = [self.seed, trainer.current_epoch, trainer.global_rank]
        state = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        torch.manual_seed(state)
        np.random.seed(state)
        random.seed(state)


def run_seed() -> int:
    """The seed `L.seed_everything` set for this run (what Lightning's DistributedSampler uses)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
