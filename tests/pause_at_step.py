"""A callback for the signal tests of a CLI run: one rank stops at a given step until the test
has signalled it, so that the signal arrives at a known step."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class PauseAtStep(L.Callback):
    """Every rank writes its pid to `<folder>/rank<global rank>.pid` when training starts;
    rank `rank`, before training the batch of step `step`, writes `<folder>/paused` and waits
    (at most `timeout_s`) until `<folder>/go` exists."""

    def __init__(self, folder: str, step: int, rank: int = 0, timeout_s: float = 300):
        self.folder = Path(folder)
        self.step, self.rank, self.timeout_s = step, rank, timeout_s

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        (self.folder / "paused").touch()
        deadline = time.monotonic() + self.timeout_s
        while not (self.folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
