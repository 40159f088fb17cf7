"""Callbacks for the distributed tests: each rank writes the training files of its shard, or
the Hydra job it runs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from torch.utils.data import DistributedSampler, Subset

from resnet_lightning.data.datamodule import EpochSeededItems


class RecordShard(L.Callback):
    """Writes `<folder>/rank<global rank>.json`: the files this rank's sampler hands out in
    the first epoch (read without moving the resumable sampler's position)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        dataset, indices = loader.dataset, list(DistributedSampler.__iter__(loader.sampler))
        while isinstance(dataset, Subset | EpochSeededItems):
            if isinstance(dataset, Subset):
                indices = [dataset.indices[i] for i in indices]
            dataset = dataset.dataset
        record = {
            "world_size": trainer.world_size,
            "files": [dataset.samples[i][0] for i in indices],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordRank(L.Callback):
    """Writes `<its job's directory>/rank<global rank>.json`: the overrides (a sweep's values
    among them) and the directory of the Hydra job this rank runs."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hydra = HydraConfig.get()
        record = {"overrides": list(hydra.overrides.task), "output_dir": hydra.runtime.output_dir}
        path = Path(hydra.runtime.output_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
