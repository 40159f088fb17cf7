"""Stop on SIGTERM, SIGINT or SIGUSR1 with a resumable checkpoint, not a lost epoch."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import FrameType

import lightning as L
import torch
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

# How long the launching process waits for the ranks it started to save and exit after a stop.
RANK_EXIT_TIMEOUT_S = 120


class CheckpointOnSignal(L.Callback):
    """On SIGTERM (what `kill` and SLURM's preemption send), SIGINT (Ctrl-C) or SIGUSR1
    (SLURM's warning before the time limit), training stops after the batch in flight and
    the run's state is saved to `path` (written atomically, by the run's CheckpointIO): the
    weights, optimizer, loop counters, the data loaders' position in the epoch and the random
    generators, so that `resume=auto` continues the epoch where it stopped and ends as an
    uninterrupted run would. `signum` then names the signal; the caller exits with 128 + it.

    In one process, Lightning stops on SIGTERM after the batch in flight; SIGINT and SIGUSR1
    are turned into it. A stop during validation writes nothing: a half-validated epoch would
    resume with partial metrics, so the previous `last.ckpt` stays and the epoch is trained
    again. Taking SIGUSR1 replaces Lightning's SLURM auto-requeue handler: the job ends with
    the checkpoint, to be resubmitted or requeued by the launcher (`max_num_timeout`).

    Under DDP every rank records the signals it gets, and after each training batch the ranks
    all-reduce them, so that all stop after the same batch whichever rank was signalled (the
    launching process, as `kill` and Ctrl-C reach it, or one rank alone), through Lightning's
    own stop. Lightning's DDP handler is set aside for that: it broadcasts rank 0's flag from
    inside the handler, a collective that can pair with another one on the other ranks, and
    a signal to any other rank stops that rank alone. A signal during validation stops the
    ranks after the next training batch (after the epoch's checkpoints), or before testing.
    The launching process waits for the ranks it started, which exit with 128 + the signal
    too, rather than let Lightning's process observer kill it when they do.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signum: int | None = None
        self.saved_at: tuple[int, int] | None = None  # (global step, epoch) of the checkpoint
        self.stopped_during: str | None = None  # "training", "validation" or "testing"
        self._previous: dict[int, object] = {}
        self._distributed = False
        self._launched_ranks: list[subprocess.Popen] = []  # to wait for before exiting

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning installs its SIGTERM handler, which then calls this one too.
        if stage == "fit" and not self._previous:
            self._distributed = trainer.world_size > 1
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._record)
            for signum in (signal.SIGINT, signal.SIGUSR1):
                self._previous[signum] = signal.signal(signum, self._stop_as_on_sigterm)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_lightning_handler_aside()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_lightning_handler_aside()
        # A schedule sized from trainer.estimated_stepping_batches (one-cycle, warm-up) sets
        # the training data up in configure_optimizers, before the checkpoint is restored;
        # Lightning's setup_data then returns early and never hands the loader its saved
        # position, and a mid-epoch resume would start the epoch over. Hand it over here,
        # before the first batch is drawn (a no-op unless resuming with a saved position).
        trainer.fit_loop._load_combined_loader_states()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self._distributed and self._all_ranks_agree_to_stop(trainer):
            # Lightning's stop: raised on every rank after this batch's hooks and schedulers.
            trainer._signal_connector.received_sigterm = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal during the last validation: stop before testing, with the final weights.
        if self._distributed and self._all_ranks_agree_to_stop(trainer):
            raise SIGTERMException

    def _set_lightning_handler_aside(self) -> None:
        """Under DDP, SIGTERM only records the signal (Lightning installs its handler just
        before the sanity check and training start)."""
        if self._distributed and self._previous:
            signal.signal(signal.SIGTERM, self._record)

    def _all_ranks_agree_to_stop(self, trainer: L.Trainer) -> bool:
        """A collective: whether any rank got a signal, and then the signal, on every rank."""
        signum = torch.tensor(self.signum or 0, device=trainer.strategy.root_device)
        signum = int(trainer.strategy.reduce(signum, reduce_op="max"))
        if not signum:
            return False
        self.signum = signum
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            # Lightning's observer thread watches this list, and SIGKILLs this process when a
            # rank in it exits non-zero: they now exit with 128 + signum, waited for here.
            self._launched_ranks = list(launcher.procs)
            launcher.procs.clear()
        return True

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def _stop_as_on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._record(signum, frame)
        if not self._distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's stop

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        try:
            if isinstance(exception, SIGTERMException):
                self._save_on_stop(trainer)
        finally:
            self._wait_for_launched_ranks()

    def _save_on_stop(self, trainer: L.Trainer) -> None:
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

    def _wait_for_launched_ranks(self) -> None:
        """The launching process exits after the ranks it started: none is left running."""
        for rank in self._launched_ranks:
            try:
                rank.wait(timeout=RANK_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rank.kill()
                rank.wait()
        self._launched_ranks.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
