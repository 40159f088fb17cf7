"""Shuffling that depends on (seed, epoch) alone, so a resumed run draws what an uninterrupted
one would have drawn."""

from __future__ import annotations

import os
from collections.abc import Sized

import torch
from torch.utils.data import RandomSampler


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


def run_seed() -> int:
    """The seed `L.seed_everything` set for this run (what Lightning's DistributedSampler uses)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
