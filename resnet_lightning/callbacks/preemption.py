"""Stop on SIGTERM, SIGINT or SIGUSR1 with a resumable checkpoint, not a lost epoch."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnSignal(L.Callback):
    """On SIGTERM (what `kill` and SLURM's preemption send), SIGINT (Ctrl-C) or SIGUSR1
    (SLURM's warning before the time limit), training stops after the batch in flight and
    the run's state is saved to `path` (written atomically, by the run's CheckpointIO): the
    weights, optimizer, loop counters, the data loaders' position in the epoch and the random
    generators, so that `resume=auto` continues the epoch where it stopped and ends as an
    uninterrupted run would. `signum` then names the signal; the caller exits with 128 + it.

    Lightning stops on SIGTERM (all DDP ranks together: rank 0's flag is broadcast before each
    batch); SIGINT and SIGUSR1 are turned into it. A stop during validation writes nothing:
    a half-validated epoch would resume with partial metrics, so the previous `last.ckpt`
    stays and the epoch is trained again. Taking SIGUSR1 replaces Lightning's SLURM
    auto-requeue handler: the job ends with the checkpoint, to be resubmitted or requeued by
    the launcher (`max_num_timeout`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signum: int | None = None
        self.saved_at: tuple[int, int] | None = None  # (global step, epoch) of the checkpoint
        self.stopped_during: str | None = None  # "training", "validation" or "testing"
        self._previous: dict[int, object] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning installs its SIGTERM handler, which then calls this one too.
        if stage == "fit" and not self._previous:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._record)
            for signum in (signal.SIGINT, signal.SIGUSR1):
                self._previous[signum] = signal.signal(signum, self._stop_as_on_sigterm)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A schedule sized from trainer.estimated_stepping_batches (one-cycle, warm-up) sets
        # the training data up in configure_optimizers, before the checkpoint is restored;
        # Lightning's setup_data then returns early and never hands the loader its saved
        # position, and a mid-epoch resume would start the epoch over. Hand it over here,
        # before the first batch is drawn (a no-op unless resuming with a saved position).
        trainer.fit_loop._load_combined_loader_states()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def _stop_as_on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._record(signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's stop, handed on to its DDP ranks

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException):
            return
        if self.signum is None:  # stopped because another rank was signalled
            self.signum = signal.SIGTERM
        if trainer.state.fn != TrainerFn.FITTING:
            self.stopped_during = "testing"
        elif trainer.state.stage == RunningStage.VALIDATING:
            self.stopped_during = "validation"
        else:
            self.stopped_during = "training"
            # Every rank gets here together (Lightning's stop is collective): saving is too.
            trainer.save_checkpoint(self.path)
            self.saved_at = (trainer.global_step, trainer.current_epoch)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
