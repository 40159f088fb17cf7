"""A sweep at a glance: one row per job, best first, and every job's validation curve.

python -m resnet_lightning.report outputs/multirun/<date>   # summary is the default
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .output import percent, thousands, write_report
from .runs import Run, find_runs, read_scalars, varying_overrides

METRICS = ("test/acc", "test/acc_top5", "val/acc", "params", "wall_time_s")
FORMATS = {
    "test/acc": percent,
    "test/acc_top5": percent,
    "val/acc": percent,
    "params": thousands,
    "wall_time_s": lambda s: f"{s:,.1f}",
}


def short_value(value: str) -> str:
    """An override value as a table reads it: 0.021153673722318383 -> 0.02115."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.4g}"


def summary_rows(runs: list[Run]) -> list[dict[str, object]]:
    """Per job: the overrides that differ between jobs, then its final metrics; sorted by
    test accuracy, unfinished jobs last."""
    varying = varying_overrides(runs)
    rows = []
    for run in runs:
        metrics = run.metrics or {}
        rows.append(
            {
                "job": run.name,
                **{key: run.overrides.get(key, "") for key in varying},
                **{key: metrics.get(key) for key in METRICS},
            }
        )
    return sorted(rows, key=lambda r: -r["test/acc"] if r["test/acc"] is not None else 1.0)


def job_label(run: Run, varying: list[str]) -> str:
    return ", ".join(f"{k}={run.overrides.get(k, '')}" for k in varying) or run.name


def plot_validation_curves(runs: list[Run]) -> Figure:
    """Validation accuracy against optimizer steps, one line per job; one bar per job when
    no job has more than one validation (a 1-epoch sweep's points would hide each other)."""
    varying = varying_overrides(runs)
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    curves = {job_label(run, varying): read_scalars(run, ["val/acc"])["val/acc"] for run in runs}
    curves = {label: points for label, points in curves.items() if points}
    if curves and max(len(points) for points in curves.values()) == 1:
        labels = list(curves)
        values = [100 * points[-1][1] for points in curves.values()]
        ax.bar(range(len(labels)), values)
        ax.bar_label(ax.containers[0], fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, max(values) * 1.12 or 1)
        ax.set_title("validation accuracy (one validation per job)")
    else:
        for label, points in curves.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, [100 * v for v in values], marker="o", markersize=4, label=label)
        ax.set_xlabel("optimizer steps")
        ax.set_title("validation accuracy over training")
        if ax.lines:
            ax.legend(fontsize=8)
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    return figure


def write_summary(directory: str | Path, out: Path | None = None) -> list[Path]:
    """summary.md, summary.csv and summary_val_acc.png in `out` (default: the sweep's folder)."""
    directory = Path(directory)
    out = directory if out is None else out
    runs = find_runs(directory)
    rows = summary_rows(runs)
    formats = {**FORMATS, **dict.fromkeys(varying_overrides(runs), short_value)}
    unfinished = [run.name for run in runs if run.metrics is None]
    text = (
        f"{len(runs)} job(s); the overrides that differ between them, then test accuracy of the\n"
        "best checkpoint (top-1, top-5), best validation accuracy, parameters and wall time."
    )
    notes = ""
    if unfinished:
        notes = f"No metrics.json (failed or still running): {', '.join(unfinished)}."
    figure = plot_validation_curves(runs)
    title, caption = f"Sweep summary: {directory}", "validation accuracy"
    return write_report(
        out,
        "summary",
        title,
        text,
        rows,
        formats,
        figure,
        caption,
        notes=notes,
        figure_name="summary_val_acc",
    )
