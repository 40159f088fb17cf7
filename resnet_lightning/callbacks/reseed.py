"""Per-epoch seeding, so that a resumed run's random augmentation repeats exactly."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class ReseedEachEpoch(L.Callback):
    """Seeds torch, numpy and random from (seed, epoch, rank) as each training epoch starts.

    Lightning restores weights, optimizer, scheduler and loop counters on resume, but no
    random-number state. With this (and the data's epoch-seeded shuffling) each epoch's
    randomness is a function of (seed, epoch) alone. Random crops and flips in the main
    process (`data.num_workers=0`) then repeat exactly after a resume; worker processes are
    seeded from the loader's own generator, so with workers the batches hold the same images
    after a resume but their augmentation differs.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entropy = [self.seed, trainer.current_epoch, trainer.global_rank]
        state = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        torch.manual_seed(state)
        np.random.seed(state)
        random.seed(state)
