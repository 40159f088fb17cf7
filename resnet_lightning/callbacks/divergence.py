"""Stop a run whose training loss became NaN or infinite, before it writes a checkpoint."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from resnet_lightning.errors import TrainingDivergedError


class DivergenceGuard(L.Callback):
    """Raises TrainingDivergedError, naming the first non-finite step, when the loss diverged.

    Reading the loss on the host every step would stall a GPU until it caught up, so the first
    non-finite (step, loss) is kept on the device and read at Lightning's logging steps (which
    read values back anyway), at each epoch's last batch, at the last step, before every
    validation and at the end of training: a diverged run stops before it saves a checkpoint
    or writes metrics, early stops and iteration-based validation included.

    DDP: every rank reaches the checks at the same batch and decides together, so that all of
    them stop rather than wait in an all-reduce. The checks sit in hooks where no rank runs a
    collective of its own (the progress bar gathers metrics on rank 0 alone at epoch end).
    """

    def __init__(self) -> None:
        self._first_nonfinite: tuple[torch.Tensor, torch.Tensor] | None = None
        self._step = 0  # global step of the batch in flight (its optimizer step not yet counted)
        self._lr = 0.0  # and the learning rate it was trained with

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_nonfinite = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # Read before the step: schedulers have moved on by the batch's end.
        self._step = trainer.global_step
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # None: training_step skipped the batch (on this rank only)
            self._record(loss.detach().float())
        log_every = trainer.log_every_n_steps
        if (
            (log_every > 0 and (self._step + 1) % log_every == 0)
            or batch_idx + 1 >= trainer.num_training_batches
            or 0 < trainer.max_steps <= self._step + 1
        ):
            self._stop_if_diverged(trainer, self._step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._stop_if_diverged(trainer, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Stopped early (max_time, EarlyStopping) between two checks.
        self._stop_if_diverged(trainer, trainer.global_step)

    def _record(self, loss: torch.Tensor) -> None:
        if self._first_nonfinite is None:
            self._first_nonfinite = (torch.tensor(-1, device=loss.device), torch.zeros_like(loss))
        step, value = self._first_nonfinite
        first = ~loss.isfinite() & (step < 0)
        self._first_nonfinite = (
            torch.where(first, self._step, step),
            torch.where(first, loss, value),
        )

    def _stop_if_diverged(self, trainer: L.Trainer, stopped_at: int) -> None:
        if self._first_nonfinite is None:  # None on every rank, or on none
            return
        step, value = (t.item() for t in self._first_nonfinite)  # the second read waits for nothing
        if not trainer.strategy.reduce_boolean_decision(step >= 0, all=False):
            return
        where = f"became {value} at step {step}" if step >= 0 else "diverged on another rank"
        raise TrainingDivergedError(
            f"the training loss {where}; training stopped at step {stopped_at} (epoch "
            f"{trainer.current_epoch}) and wrote no metrics: lower optimizer.lr (it was "
            f"{self._lr:g}) or clip gradients with trainer.gradient_clip_val=1.0"
        )
