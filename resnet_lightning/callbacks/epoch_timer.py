"""Wall time per training epoch, read after the accelerator has finished the epoch's work."""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch

from resnet_lightning.atomic_files import write_json


class EpochTimer(L.Callback):
    """Times each training epoch (its validation included), logs it as `time/epoch_s`, and
    at the end of fit writes the times and a summary to `path` (JSON), when given.

    The first epoch also pays the warm-up: cuDNN autotuning, torch.compile's compilation,
    first allocations. `warmup_s` estimates it as the first epoch's excess over the median of
    the others, `fit_s_without_warmup` is the sum of the epochs less that.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.epoch_s: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start
        self.epoch_s.append(seconds)
        pl_module.log("time/epoch_s", seconds, on_epoch=True)

    def summary(self) -> dict[str, float | list[float]]:
        times = self.epoch_s
        typical = statistics.median(times[1:]) if len(times) > 1 else times[0]
        warmup = max(times[0] - typical, 0.0)
        return {
            "epoch_s": [round(t, 4) for t in times],
            "median_epoch_s": round(typical, 4),
            "warmup_s": round(warmup, 3),
            "fit_s": round(sum(times), 3),
            "fit_s_without_warmup": round(sum(times) - warmup, 3),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path and self.epoch_s and trainer.is_global_zero:
            write_json(self.path, self.summary())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
