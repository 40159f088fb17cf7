"""Counts the host syncs of each training step, on any device (the CPU included).

A host sync is an op whose result the Python side must wait for: reading a tensor's value
(`.item()`, `bool(t)`, `if t:`), an op whose output size depends on the data (`nonzero`,
`unique`, boolean-mask indexing), or a copy from the device to the host. On a GPU each one
stalls the host until the device has caught up, so the next step's kernels are not queued
while this step's run. The ops are counted under a TorchDispatchMode, so a run on the CPU
shows most of them; copies to the host (`.cpu()`, `.tolist()`, `.numpy()`) are seen on a GPU
only (on the CPU nothing is copied).

    python -m resnet_lightning callbacks=host_syncs  # writes host_syncs.json in the run dir
"""

from __future__ import annotations

from collections import Counter

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_lightning.atomic_files import write_json

# aten ops that make the host wait for the device's result.
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), bool(), int(), float() of a tensor
        "is_nonzero",
        "equal",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    }
)
# Copies, which sync when they bring device memory to the host.
COPY_OPS = frozenset({"_to_copy", "copy_"})
# Indexing ops that sync when an index is a boolean mask (`x[x > 0]`, `x[mask] = v`).
MASK_INDEXING_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


class SyncCount(TorchDispatchMode):
    """Counts, by op name, the host-syncing ops dispatched while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self._range_check: tuple = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name == "aminmax":
            self._range_check = out
        elif name == "_local_scalar_dense" and any(args[0] is t for t in self._range_check):
            pass  # one_hot's range check, made on the CPU only (CUDA's one_hot reads nothing)
        elif name in SYNC_OPS or (name in MASK_INDEXING_OPS and _has_mask(args[1])):
            self.ops[name] += 1
        elif name in COPY_OPS and _to_host(args, out):
            self.ops[f"{name} to host"] += 1
        return out


def _to_host(args, out) -> bool:
    """A copy from an accelerator into host memory (`_to_copy` returns it, `copy_` fills
    its first argument from its second)."""
    source = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]
    return source.device.type != "cpu" and out.device.type == "cpu"


def _has_mask(indices) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


class HostSyncCounter(L.Callback):
    """Counts host syncs from each training batch's start to its end (forward, backward,
    optimizer step and the other callbacks' batch hooks), and writes them per batch to
    `path` (JSON: {"steps": [{"epoch", "batch", "syncs", "ops"}]}) at the end of fit.

    Lightning's own read of the logged values at logging steps comes after the batch's end
    hooks, outside the window (one more sync at each logging step)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.steps: list[dict] = []
        self._mode: SyncCount | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._mode = SyncCount()
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        ops = dict(self._mode.ops)
        self._mode = None
        step = {"epoch": trainer.current_epoch, "batch": batch_idx}
        self.steps.append({**step, "syncs": sum(ops.values()), "ops": ops})

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path and trainer.is_global_zero:
            write_json(self.path, {"steps": self.steps})
