"""`logger=csv`: Lightning's CSVLogger, with a metrics.csv that keeps its columns whichever
process appends to it.

Lightning's writer knows the file's columns only from the rows it wrote itself. Under
`trainer.strategy=ddp_spawn` or `ddp_fork`, `trainer.fit` and `trainer.test` each run in new
processes, each with a copy of the writer as it was before the fit: the test's copy knew none
of the fit's columns, rewrote the header without them and failed on the fit's rows
(`ValueError: dict contains fields not in fieldnames: 'train/loss_epoch', ...`). And
Lightning's writer deletes a metrics.csv it finds: a run resumed in its own directory
(`resume=auto`) lost the rows logged before it stopped; here it appends to them, as
TensorBoard's events continue.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ColumnKeepingWriter(ExperimentWriter):
    """Takes the columns from the file before each save: Lightning's writer then adds the new
    rows' columns (rewriting the file with the wider header) or appends to it as it is."""

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's deletes the metrics.csv of the run being resumed

    def save(self) -> None:
        if self.metrics and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])
        super().save()


class CSVLogger(LightningCSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ColumnKeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ColumnKeepingWriter(log_dir=self.log_dir)
        return self._experiment
