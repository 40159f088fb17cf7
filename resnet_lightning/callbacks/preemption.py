"""Stop on SIGTERM, SIGINT or SIGUSR1 with a resumable checkpoint, not a lost epoch."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class CheckpointOnSignal(L.Callback):
    """On SIGTERM (what `kill` and SLURM's preemption send), SIGINT (Ctrl-C) or SIGUSR1
    (SLURM's warning before the time limit), training stops after the batch in flight and
    the run's state is saved to `path` (written atomically, by the run's CheckpointIO): the
    weights, optimizer, loop counters, the data loaders' position in the epoch and the random
    generators, so that `resume=auto` continues the epoch where it stopped and ends as an
    uninterrupted run would. `signum` then names the signal; the caller exits with 128 + it.

    Lightning stops at the end of a batch on SIGTERM (all DDP ranks together: rank 0's flag is
    broadcast before each batch). SIGINT and SIGUSR1 take the same path.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signum: int | None = None
        self.saved_at: tuple[int, int] | None = None  # (global step, epoch) of the checkpoint
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has installed its SIGTERM handler by now: ours records the signal, then
        # hands it on to Lightning's.
        self.signum = None
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        lightning_handler = self._previous.get(signal.SIGTERM)
        if callable(lightning_handler):
            lightning_handler(signal.SIGTERM, frame)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        if self.signum is not None and trainer.state.fn == TrainerFn.FITTING:
            # Every rank gets here together (Lightning's stop is collective): saving is too.
            trainer.save_checkpoint(self.path)
            self.saved_at = (trainer.global_step, trainer.current_epoch)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
