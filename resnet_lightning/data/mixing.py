"""Mixup and CutMix of whole training batches, with timm's argument names and meanings.

Mixup (Zhang et al. 2018, arXiv:1710.09412) blends each image with its neighbour in the batch,
lam * x + (1 - lam) * x.roll(1); CutMix (Yun et al. 2019, arXiv:1905.04899) pastes a box of
the neighbour instead, lam corrected to the box's real area after clipping at the border
(timm's `correct_lam`). lam ~ Beta(alpha, alpha), one draw per batch (timm's batch mode). The
targets become (B, num_classes) probabilities, lam on the own label and 1 - lam on the
neighbour's. torchvision.transforms.v2's MixUp and CutMix do exactly that; the neighbour is
the next image of a shuffled batch where timm takes the mirrored batch, a pairing as random.

Each batch's draws (mixed or not, which of the two, lam, the box) come from a generator seeded
by (seed, epoch, batch, rank), so that a run resumed part-way through an epoch mixes its
batches as an uninterrupted run did, on every rank.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from resnet_lightning.errors import InvalidArgument

from .sampling import MIXING_STREAM, run_seed, stream_seed


def batch_mixer(
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_prob: float = 1.0,
    mix_switch_prob: float = 0.5,
) -> v2.Transform | None:
    """The transform `(images, labels) -> (mixed images, soft targets)`, or None when both
    alphas are 0.

    Args:
        num_classes: width of the targets.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) of each; 0 turns it off.
        mix_prob: probability that a batch is mixed at all (an unmixed one keeps its labels).
        mix_switch_prob: with both alphas > 0, probability of CutMix rather than Mixup.
    """
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if alpha < 0:
            raise InvalidArgument(name, alpha, "is negative; 0 turns it off, e.g. 0.2 or 1.0")
    for name, prob in (("mix_prob", mix_prob), ("mix_switch_prob", mix_switch_prob)):
        if not 0 <= prob <= 1:
            raise InvalidArgument(name, prob, "is a probability: it must be in [0, 1]")
    mixers = []
    # float: torch's Beta distribution cannot sample from an integer alpha (`cutmix_alpha=1`).
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
    if not mixers:
        return None
    mixer = mixers[0]
    if len(mixers) == 2:
        mixer = v2.RandomChoice(mixers, p=[1 - mix_switch_prob, mix_switch_prob])
    return mixer if mix_prob == 1 else v2.RandomApply([mixer], p=mix_prob)


class MixedTrainingBatches:
    """A LightningDataModule mixin: training batches go through `self.mixer` (a batch_mixer,
    or None) on the training device, after the loader, whichever loader it is."""

    mixer: v2.Transform | None = None

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Training batches only: validation, the sanity check, test and predict run in other
        # stages, and the model summary's example input (a bare tensor) comes through in the
        # training stage too.
        trainer = self.trainer
        if self.mixer is None or trainer is None or not trainer.training:
            return batch
        if isinstance(batch, torch.Tensor):
            return batch
        images, labels = batch
        # Lightning counts the batch as ready just after this hook: its index in the epoch is
        # one past the last one counted (the count a mid-epoch checkpoint restores).
        number = trainer.fit_loop.batch_idx + 1
        key = (MIXING_STREAM, trainer.current_epoch, number, trainer.global_rank)
        # torchvision's mixers draw on the CPU from the global generator, and take no other.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(stream_seed(run_seed(), *key))
            return self.mixer(images, labels)
