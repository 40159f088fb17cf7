"""A training loop in plain PyTorch, made fair: the baseline the benchmark holds the Trainer
against (`python -m resnet_lightning.bench`).

Nothing reads a value back every batch (that would stall a GPU each step): the loss and
accuracy add up on the device and are read once per epoch, the gradients are freed
rather than zeroed, batches move with `non_blocking`, and mixed precision is the autocast
(plus, for float16, the gradient scaler) Lightning uses for the same `precision` string.
What remains is the work any training loop must do, so the Trainer's extra time is its own.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

AUTOCAST_DTYPES = {
    "32-true": None,
    "32": None,
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
}


@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    seconds: float


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a Lightning `precision` string (disabled for 32-bit)."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(
            f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, not {precision!r}"
        )
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Reshuffle for `epoch`, as Lightning does: through the loader's sampler."""
    set_sampler_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_sampler_epoch):
        set_sampler_epoch(epoch)


def run_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    criterion: nn.Module,
    precision: str = "32-true",
    max_batches: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochResult:
    """One pass over `loader` (at most `max_batches`): a training epoch when an optimizer is
    given, else an evaluation. The time runs until the epoch's loss is read back, which waits
    for all of its work on the device."""
    device = next(model.parameters()).device
    training = optimizer is not None
    model.train(training)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    images = 0
    start = time.perf_counter()
    with torch.set_grad_enabled(training):
        # islice: no batch beyond max_batches is fetched inside the timed window.
        for x, y in itertools.islice(loader, max_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
                loss = criterion(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
            images += len(y)
    loss, acc = (loss_sum / max(images, 1)).item(), correct.item() / max(images, 1)
    return EpochResult(loss, acc, images, time.perf_counter() - start)


def fit(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    val_loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    epochs: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    precision: str = "32-true",
    max_train_batches: int | None = None,
    max_val_batches: int | None = None,
) -> list[float]:
    """Train and validate `epochs` times, the scheduler stepped per epoch; each epoch's seconds
    (training and validation, as the Trainer's epoch includes its validation)."""
    scaler = torch.amp.GradScaler() if precision == "16-mixed" else None
    seconds = []
    for epoch in range(epochs):
        set_epoch(train_loader, epoch)
        train = run_epoch(
            model, train_loader, criterion, precision, max_train_batches, optimizer, scaler
        )
        val = run_epoch(model, val_loader, criterion, precision, max_val_batches)
        if scheduler is not None:
            scheduler.step()
        seconds.append(train.seconds + val.seconds)
    return seconds
