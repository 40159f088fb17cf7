"""Lookahead in airbench's form: the weights pulled back to a slow moving average of
themselves every few optimizer steps, ever more strongly as training ends."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from resnet_lightning.errors import CheckpointError, InvalidArgument

from .time_budget import training_position


class Lookahead(L.Callback):
    """Every `every_n_steps` optimizer steps, `ema = d * ema + (1 - d) * w`, then `w = ema`,
    with `d = decay * position ** power` (position: the fraction of training done, of the
    time budget when there is one): no pull at first, then ever stronger, which averages out
    the last steps' noise (airbench; Zhang et al. 2019's lookahead with a scheduled step).
    At the step that ends training (position 1), and again at the end of the fit, `w = ema`,
    so the last validation, the checkpoints and the test see the slow weights.

    The average covers the float parameters and buffers (BatchNorm's running statistics
    follow the weights they belong to, as in airbench). It is saved in checkpoints
    (`state_dict`), so a resumed run continues it exactly.

    Args:
        every_n_steps: optimizer steps between pulls (airbench: 5).
        decay: d at the end of training (airbench: 0.95 ** 5, i.e. 0.95 per step).
        power: how d rises with the position (airbench: 3; 0 keeps it at `decay`).
    """

    def __init__(self, every_n_steps: int = 5, decay: float = 0.95**5, power: float = 3.0):
        if every_n_steps < 1:
            raise InvalidArgument("every_n_steps", every_n_steps, "must be >= 1, e.g. 5")
        if not 0.0 <= decay <= 1.0:
            raise InvalidArgument("decay", decay, "must be in [0, 1], e.g. 0.7737809375 (0.95**5)")
        if power < 0:
            raise InvalidArgument("power", power, "must be >= 0, e.g. 3")
        self.every_n_steps, self.decay, self.power = every_n_steps, decay, power
        self.ema: dict[str, Tensor] | None = None  # restored by load_state_dict on resume
        self._pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._stepped = 0  # global_step at the last batch seen

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        live = {
            name: tensor
            for name, tensor in [*pl_module.named_parameters(), *pl_module.named_buffers()]
            if tensor.is_floating_point()
        }
        if self.ema is None:
            self.ema = {name: tensor.detach().clone() for name, tensor in live.items()}
        elif self.ema.keys() != live.keys():
            raise CheckpointError(
                "the checkpoint's lookahead average does not fit this network's weights; "
                "resume with the model it was saved with"
            )
        else:  # restored on the CPU: onto the weights' devices
            self.ema = {name: self.ema[name].to(tensor) for name, tensor in live.items()}
        self._pairs = (list(self.ema.values()), list(live.values()))
        self._stepped = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step == self._stepped:  # accumulating gradients: no optimizer step this batch
            return
        self._stepped = step
        position = training_position(trainer)
        if step % self.every_n_steps == 0:
            self._pull(self.decay * position**self.power)
        if position >= 1:
            self._pull(1.0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None:
            self._pull(1.0)

    @torch.no_grad()
    def _pull(self, decay: float) -> None:
        """ema = decay * ema + (1 - decay) * w; w = ema."""
        ema, weights = self._pairs
        if decay < 1.0:
            torch._foreach_lerp_(ema, weights, 1.0 - decay)
        torch._foreach_copy_(weights, ema)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema} if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema = state_dict.get("ema")
