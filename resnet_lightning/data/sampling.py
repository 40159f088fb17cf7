"""Shuffling that depends on (seed, epoch) alone, random draws keyed by what they are for, and
epochs that can resume part-way, so that a resumed run draws what an uninterrupted one would
have drawn."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

# The streams drawn from a run's seed by `stream_seed`, kept apart by their first key.
AUGMENTATION_STREAM, MIXING_STREAM = 1, 2


def stream_seed(seed: int, *key: int) -> int:
    """A seed for a torch generator, drawn from the run's `seed` and a `key` that names what it
    draws (a stream, an epoch, an index...): the same in any process and after a resume, and
    independent for different keys (numpy's SeedSequence, whose spawn keys are made for this).
    32 bits: all that torch's CPU generator keeps of a seed."""
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """This rank's shard of a permutation drawn from (seed, epoch), as DistributedSampler's
    (on one process, the whole permutation), that can start an epoch where a run left off.

    `state_dict()` says how far the current epoch got (the indices handed out so far);
    `load_state_dict()` makes the next iteration of that epoch skip them. Lightning keeps a
    DistributedSampler it is given, so DDP runs shard with this one too.
    """

    def __init__(
        self,
        data_source: Sized,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        super().__init__(
            data_source, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        self.start = 0  # indices skipped at the start of the current epoch (a resume)
        self.seen = 0  # indices handed out in the current epoch, the skipped ones included
        self._resume: tuple[int, int] | None = None  # (epoch, indices to skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        self.start = 0
        if self._resume is not None and self._resume[0] <= self.epoch:
            epoch, skip = self._resume
            self._resume = None
            self.start = skip if epoch == self.epoch else 0
        self.seen = self.start
        for index in indices[self.start :]:
            self.seen += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (int(state["epoch"]), int(state["seen"]))


class EpochKeyedSampler(ResumableSampler):
    """A ResumableSampler that yields `(epoch, index)` keys, for a data set that draws each
    item's random augmentation from them (datamodule.EpochSeededItems)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can resume part-way through an epoch: it saves
    `state_dict()` in a mid-epoch checkpoint and hands it back on resume, and the sampler
    (a ResumableSampler) then skips the batches already trained on.

    The position is counted in batches handed to training, not in the sampler's indices,
    which worker processes fetch ahead.
    """

    def __iter__(self) -> Iterator[Any]:
        return self._counted()

    def _counted(self) -> Iterator[Any]:
        # A generator: the DataLoader's own iterator, whose workers start fetching at once, is
        # made when the first batch is asked for. Lightning iterates the loader earlier (when a
        # schedule sizes itself from the data: before a resumed position is handed back, before
        # the epoch is set); workers started then would fetch from the epoch's start.
        self._given = None
        for n, batch in enumerate(super().__iter__(), start=1):
            # The sampler has started this epoch (and knows its resumed start) by now.
            self._given = getattr(self.sampler, "start", 0) + n * self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        given = getattr(self, "_given", None)
        return {"epoch": self.sampler.epoch, "seen": self.sampler.seen if given is None else given}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state)


def run_seed() -> int:
    """The seed `L.seed_everything` set for this run (what Lightning's DistributedSampler uses)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
