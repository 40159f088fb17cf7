"""Finished runs as the reports read them: config, overrides, metrics.json and logged scalars."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_lightning.errors import UsageError


@dataclass(frozen=True)
class Run:
    """One run directory written by `python -m resnet_lightning` (a single run or a sweep job)."""

    path: Path
    config: dict[str, Any]  # .hydra/config.yaml: the composed config
    overrides: dict[str, str]  # .hydra/overrides.yaml: the command line and sweep values
    metrics: dict[str, Any] | None  # metrics.json; None while running or after a failure

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str:
        return self.config["model"]["name"]


def find_runs(directory: str | Path) -> list[Run]:
    """The run in `directory`, or every job of the multirun there, in job order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(
            f"{directory} is not a directory; pass a run or multirun directory such as "
            "outputs/multirun/<date>"
        )
    if (directory / ".hydra" / "config.yaml").is_file():
        job_dirs = [directory]
    else:
        job_dirs = [p for p in directory.iterdir() if (p / ".hydra" / "config.yaml").is_file()]
    if not job_dirs:
        raise UsageError(
            f"{directory} holds no runs (no .hydra/config.yaml in it or its folders); pass a run "
            "or multirun directory such as outputs/multirun/<date>"
        )
    return [_read_run(p) for p in sorted(job_dirs, key=_job_order)]


def _job_order(path: Path) -> tuple[int, int | str]:
    """Multirun jobs by number (2 before 10), then any other folders by name."""
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def _read_run(path: Path) -> Run:
    config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
    overrides_file = path / ".hydra" / "overrides.yaml"
    lines = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return Run(path, config, parse_overrides(lines or []), metrics)


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """`["model=plain56", "+trainer.x=1"]` -> `{"model": "plain56", "trainer.x": "1"}`."""
    overrides = {}
    for line in lines:
        key, _, value = line.partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def varying_overrides(runs: list[Run]) -> list[str]:
    """The override keys whose values differ between runs (what a sweep swept), in order seen;
    not Hydra's own, nor the Optuna trial a job reported to (its job directory's name)."""
    keys = dict.fromkeys(
        k for run in runs for k in run.overrides if not k.startswith(("hydra.", "optuna_trial."))
    )
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def read_scalars(run: Run, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of `tags`, from the run's TensorBoard events or else its CSV log."""
    series: dict[str, list[tuple[int, float]]] = {tag: [] for tag in tags}
    # tensorboard/ of a run; tensorboard/<model>,<overrides>/ of a multirun job.
    found = sorted((run.path / "tensorboard").glob("**/events.out.tfevents.*"))
    tensorboard_dir = found[0].parent if found else None
    csv_file = run.path / "csv" / "metrics.csv"
    if tensorboard_dir is not None:
        events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
        events.Reload()
        available = set(events.Tags()["scalars"])
        for tag in tags:
            if tag in available:
                series[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    elif csv_file.is_file():
        with csv_file.open(newline="") as f:
            for row in csv.DictReader(f):
                for tag in tags:
                    if row.get(tag):
                        series[tag].append((int(row["step"]), float(row[tag])))
    return series
