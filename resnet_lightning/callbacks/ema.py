"""An exponential moving average of the weights, which validation, test, the checkpoints and
`python -m resnet_lightning.eval` use in place of the trained weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from resnet_lightning.errors import InvalidArgument


class EMA(WeightAveraging):
    """Lightning's WeightAveraging (torch's AveragedModel) with an exponential average whose
    decay warms up as timm's ModelEmaV3 does: min(decay, (1 + n) / (10 + n)) at the n-th
    update, so that the average is not dominated by the random initial weights in short runs.

    Lightning swaps the averaged weights in for each validation and after training, and saves
    them as the checkpoint's `state_dict` (the trained ones in `current_model_state`, from which
    a resumed run continues). With `use_buffers` BatchNorm's running statistics are averaged
    like the weights (and its batch counter copied).

    Args:
        decay: the average's decay per optimizer step (0.999: a memory of about 1,000 steps).
        warmup: raise the decay from 0.1 towards `decay` over the first updates.
        use_buffers: average BatchNorm's running statistics too (else they are the trained
            model's at the time of the update, kept by AveragedModel as they are).
        update_every_n_steps: update the average every this many optimizer steps.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        use_buffers: bool = True,
        update_every_n_steps: int = 1,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise InvalidArgument("decay", decay, "must be in (0, 1), e.g. 0.999")
        if update_every_n_steps < 1:
            raise InvalidArgument("update_every_n_steps", update_every_n_steps, "must be >= 1")
        super().__init__(use_buffers=use_buffers, multi_avg_fn=EmaUpdate(decay, warmup))
        self.update_every_n_steps = update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning's callback puts the trained weights back whenever it loads a checkpoint,
        # so the run's own test of its best checkpoint would score those, not the average
        # that the checkpoint's state_dict (and eval) holds. Only a resumed fit needs them.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EmaUpdate:
    """AveragedModel's `multi_avg_fn`: one fused update per device and dtype. The decay is
    computed on the device from `num_averaged` (a device tensor), so it never syncs a GPU."""

    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay = decay
        self.warmup = warmup

    def __call__(self, averaged: Sequence[Tensor], current: Sequence[Tensor], num_averaged: Tensor):
        if not torch.is_floating_point(averaged[0]):  # BatchNorm's num_batches_tracked
            torch._foreach_copy_(averaged, current)
            return
        decay = torch.full_like(num_averaged, self.decay, dtype=averaged[0].dtype)
        if self.warmup:
            n = num_averaged.to(averaged[0].dtype)
            decay = torch.minimum(decay, (1 + n) / (10 + n))
        # averaged = decay * averaged + (1 - decay) * current, with the decay as a device tensor
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - decay))
