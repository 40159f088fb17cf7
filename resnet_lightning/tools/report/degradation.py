"""Training and validation error against iterations, plain nets beside ResNets: the paper's
Figure 6 (He et al. 2015) from a sweep such as `experiment=degradation`.

    python -m resnet_lightning.report degradation outputs/multirun/<date>_degradation
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from resnet_lightning.errors import UsageError
from resnet_lightning.models import get_model_info

from .output import percent, write_report
from .runs import Run, find_runs, read_scalars

# The training error is each epoch's mean over the augmented batches, as the paper's thin
# curves; the bold ones are error on held-out images (here the 5k validation split).
TRAIN, HELD_OUT = "train/acc", "val/acc"


def error_curves(run: Run) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(iteration, error in %)]} for the training and validation accuracy."""
    return {
        tag: [(step, 100 * (1 - acc)) for step, acc in points]
        for tag, points in read_scalars(run, [TRAIN, HELD_OUT]).items()
    }


def family(run: Run) -> str:
    """The model's family in the zoo (Plain (CIFAR), ResNet (CIFAR), ...), else its name."""
    try:
        return get_model_info(run.model).family
    except ValueError:  # a run of a model this checkout does not have
        return run.model


def plot_degradation(runs: list[Run], curves: dict[str, dict]) -> Figure:
    """One panel per model family (plain, ResNet); dashed training, solid validation error."""
    families = list(dict.fromkeys(family(run) for run in runs))
    figure = Figure(figsize=(6 * len(families), 4.5), layout="constrained")
    axes = figure.subplots(1, len(families), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, families, strict=True):
        members = [run for run in runs if family(run) == name]
        for run in members:
            (line,) = ax.plot(*_steps_values(curves[run.name][HELD_OUT]), lw=2, label=run.model)
            ax.plot(*_steps_values(curves[run.name][TRAIN]), ls="--", lw=1, color=line.get_color())
        ax.set_title(name)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(title="solid: validation, dashed: training", fontsize=8, title_fontsize=8)
    axes[0].set_ylabel("error (%)")
    return figure


def _steps_values(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [step for step, _ in points], [value for _, value in points]


def degradation_rows(runs: list[Run], curves: dict[str, dict]) -> list[dict[str, object]]:
    rows = []
    for run in runs:
        train, held_out = curves[run.name][TRAIN], curves[run.name][HELD_OUT]
        metrics = run.metrics or {}
        test_acc = metrics.get("test/acc")
        rows.append(
            {
                "model": run.model,
                "family": family(run),
                "iterations": metrics.get("steps"),
                "train error": train[-1][1] / 100 if train else None,
                "val error": held_out[-1][1] / 100 if held_out else None,
                "test error": 1 - test_acc if test_acc is not None else None,
                "job": run.name,
            }
        )
    return rows


def write_degradation_report(directory: str | Path, out: Path | None = None) -> list[Path]:
    """degradation.md, degradation.csv and degradation.png in `out` (default: the sweep)."""
    directory = Path(directory)
    out = directory if out is None else out
    runs = find_runs(directory)
    curves = {run.name: error_curves(run) for run in runs}
    if not any(c[TRAIN] or c[HELD_OUT] for c in curves.values()):
        raise UsageError(
            f"no run in {directory} logged {TRAIN} or {HELD_OUT}; run the sweep with "
            "logger=tensorboard or logger=csv"
        )
    rows = degradation_rows(runs, curves)
    formats = {k: percent for k in ("train error", "val error", "test error")}
    text = (
        "Final training error (mean of the last epoch, augmented), validation error (last\n"
        "evaluation) and test error (best checkpoint) of each job; the figure shows them\n"
        "against iterations as He et al. 2015, Figure 6."
    )
    title = f"Plain against residual: {directory}"
    figure = plot_degradation(runs, curves)
    caption = "training and validation error"
    return write_report(out, "degradation", title, text, rows, formats, figure, caption)
