"""Per-epoch seeding, so that a resumed run's random augmentation repeats exactly."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist


class ReseedEachEpoch(L.Callback):
    """Seeds torch, numpy and random from (seed, epoch, rank) as each training epoch starts,
    and carries their states in checkpoints for a resume part-way through an epoch.

    Lightning restores weights, optimizer, scheduler and loop counters on resume, but no
    random-number state. With this (and the data's epoch-seeded shuffling) each epoch's
    randomness is a function of (seed, epoch) alone. A run resumed from a mid-epoch checkpoint
    (a signal, `every_n_train_steps`) starts no new epoch: it continues from the generators'
    states saved in the checkpoint. The data's draws do not depend on these generators at all:
    the augmentation of each training image (pipeline=torchvision, in whichever worker process
    makes it) or batch (pipeline=tensor) is seeded from (seed, epoch, its index), and each
    batch's Mixup/CutMix from (seed, epoch, batch, rank) (data/). Under DDP the checkpoint holds
    every rank's states (gathered when it is written, which Lightning does on all ranks), and
    each rank takes its own back; resumed on another number of processes, each rank is
    reseeded from (seed, epoch, rank, step) instead: the same data draws, but other draws of
    the model's own (dropout, drop-path) than an uninterrupted run's.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._restored: dict[str, Any] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _seed_all(self.seed, trainer.current_epoch, trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        state = _generator_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state)
            return {"ranks": ranks}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume part-way through an epoch calls no on_train_epoch_start for it; one from an
        # epoch's end starts the next epoch, which reseeds over this.
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        ranks = state.get("ranks", [state])
        if len(ranks) != trainer.world_size:  # saved by another number of processes
            _seed_all(self.seed, trainer.current_epoch, trainer.global_rank, trainer.global_step)
            return
        state = ranks[trainer.global_rank]
        torch.set_rng_state(state["torch"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(_as_tuples(state["random"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def _generator_states() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        # Tensors and plain numbers: checkpoints are loaded with weights_only=True.
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "random": random.getstate(),
    }
    if torch.cuda.is_available():  # the training device's (one per process)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _seed_all(*entropy: int) -> None:
    """Seed torch, numpy and random from the numbers given (seed, epoch, rank, ...)."""
    state = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    torch.manual_seed(state)
    np.random.seed(state)
    random.seed(state)


def _as_tuples(value: Any) -> Any:
    """random.getstate()'s nested tuples, which a checkpoint may give back as lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
