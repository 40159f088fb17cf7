"""Checkpoints that survive a kill or a full disk, load without running code, and carry their run.

- `AtomicCheckpointIO`: Lightning's CheckpointIO plugin, writing to a temporary file in the
  same folder and renaming it, so `last.ckpt` is always either the old or the new complete file.
- `load_checkpoint_file`: `torch.load(weights_only=True)` with one-line errors for a corrupt
  file or one that would execute code.
- `LastCheckpoint`: Lightning's ModelCheckpoint for `last.ckpt`, which with
  `every_n_train_steps` also saves at each epoch's end.
- `RunRecord`: a callback that stores the run's resolved config and class names in every
  checkpoint, so `resnet_lightning.eval` rebuilds the model the run trained, not today's defaults,
  and the MLflow and W&B runs it logs to, so `resume=auto` continues them.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from torch import nn

from resnet_lightning.atomic_files import remove_leftovers, write_atomic
from resnet_lightning.errors import (
    DISK_FULL,
    NOT_WRITABLE,
    CheckpointError,
    is_unsafe_pickle,
    unsafe_file_message,
)

# Suffix of the temporary files a save writes; one left behind is a save that was killed.
PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs, then renames it into place.

    Lightning's own save goes through fsspec, whose local "transaction" writes the temporary
    file to /tmp and then copies it over the target when /tmp is another file system: a kill
    during that copy leaves a truncated checkpoint. Loading always uses `weights_only=True`.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        try:
            write_atomic(path, lambda file: torch.save(checkpoint, file), PARTIAL_SUFFIX)
        except (OSError, RuntimeError) as err:
            # torch's zip writer reports the OSError of a full disk as a RuntimeError.
            cause = err if isinstance(err, OSError) else err.__context__
            if not isinstance(cause, OSError) or cause.errno not in DISK_FULL + NOT_WRITABLE:
                raise
            problem = (
                "the disk is full: could not write"
                if cause.errno in DISK_FULL
                else (f"cannot write ({cause.strerror})")
            )
            raise CheckpointError(
                f"{problem} checkpoint {path} (nothing partial was left); free space or make "
                "it writable there, or point callbacks.model_checkpoint.dirpath and "
                "callbacks.last_checkpoint.dirpath at another folder, then continue with "
                "resume=auto"
            ) from err

    def load_checkpoint(
        self, path: _PATH, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        # Not only checkpoints: the ddp_spawn launcher hands rank 0's bare state dict back
        # through this plugin.
        return read_checkpoint(path, map_location)


def load_checkpoint_file(
    path: _PATH, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """A Lightning checkpoint (`read_checkpoint`), refused with one line if it is not one."""
    checkpoint = read_checkpoint(path, map_location, mmap)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt file written "
            "by a run of this framework"
        )
    return checkpoint


def read_checkpoint(path: _PATH, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Load a file saved by torch.save without executing code from it (`weights_only=True`);
    with `mmap`, tensors are read from disk only when touched."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        # torch maps only its zip format; anything else is read whole (and judged) as before.
        mmap = mmap and zipfile.is_zipfile(path)
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not is_unsafe_pickle(err):
            raise _corrupt(path, err) from err
        raise CheckpointError(unsafe_file_message(str(path), err)) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        raise _corrupt(path, err) from err
    return checkpoint


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    reason = str(err).split(". ")[0].strip() or type(err).__name__
    return CheckpointError(
        f"checkpoint {path} is corrupt or incomplete ({reason}); copy it again, or use another "
        "checkpoint of the run (its checkpoints/ folder keeps the best and last.ckpt)"
    )


def check_checkpoint_fits(module: nn.Module, checkpoint: dict[str, Any], path: _PATH) -> None:
    """Raise a one-line error when the checkpoint's weights are not those of `module`."""
    own, theirs = module.state_dict(), checkpoint["state_dict"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    mismatched = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if not (missing or unexpected or mismatched):
        return
    saved = checkpoint.get(RunRecord.CONFIG_KEY, {}).get("model", {}).get("name")
    built = getattr(getattr(module, "net", module), "model_info", None)
    built = built.name if built else type(module).__name__
    if saved and saved != built:
        raise CheckpointError(
            f"checkpoint {path} is for model={saved} but this run builds model={built}; pass "
            f"model={saved} or a checkpoint of {built}"
        )
    first = (missing or unexpected or mismatched)[0]
    raise CheckpointError(
        f"checkpoint {path} does not fit model={built} as configured ({len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(mismatched)} differently shaped weights, e.g. "
        f"{first}); use the model options the checkpoint was trained with"
    )


def remove_partial_checkpoints(folder: Path) -> None:
    """Delete the temporary files of saves that were killed before they finished."""
    remove_leftovers(folder, PARTIAL_SUFFIX)


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for `last.ckpt`. With `every_n_train_steps` it saves every N
    steps and at each epoch's end, after the epoch's validation, but never on an epoch's last
    batch: Lightning resumes a checkpoint saved on an epoch's last batch, before the epoch
    ended, by training a step that the run it came from never trained (tests/test_kill_soak.py
    found it: each `resume=auto` of a finished run added a step)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._every_n_train_steps:
            self._every_n_epochs = 1  # Lightning's constructor takes the two as exclusive

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        batch_idx = args[-1] if args else kwargs["batch_idx"]
        if batch_idx + 1 < trainer.num_training_batches:  # the epoch's end saves its last
            super().on_train_batch_end(trainer, *args, **kwargs)


class RunRecord(L.Callback):
    """Stores the run's resolved config, the data set's class names and the ids of the
    tracking runs it logs to (`{"MLFlowLogger": run id, "WandbLogger": run id}`) in every
    checkpoint.

    Args:
        config: the run's config as plain containers (`OmegaConf.to_container(cfg, resolve=True)`).
    """

    CONFIG_KEY = "run_config"
    CLASSES_KEY = "class_names"
    TRACKING_KEY = "tracking_runs"
    # Loggers whose runs live in a store of their own, which a resumed run continues (the
    # others write into the run directory, which it continues anyway), and the constructor
    # argument that names the run to continue.
    TRACKING_LOGGERS = {MLFlowLogger: "run_id", WandbLogger: "id"}

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.CONFIG_KEY] = self.config
        classes = getattr(trainer.datamodule, "classes", None)
        if classes is not None:
            checkpoint[self.CLASSES_KEY] = list(classes)
        # `version` is the run's id in both (None on ranks > 0, which log nothing).
        runs = {
            kind.__name__: logger.version
            for logger in trainer.loggers
            for kind in self.TRACKING_LOGGERS
            if isinstance(logger, kind) and logger.version
        }
        if runs:
            checkpoint[self.TRACKING_KEY] = runs
