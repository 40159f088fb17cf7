"""A sweep at a glance: one row per job, best first, and every job's validation curve; for a
sweep of time budgets also test accuracy against the budget, over seeds; for a sweep with an
Optuna study also its optimization history and parameter importances.

python -m resnet_lightning.report outputs/multirun/<date>   # summary is the default
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from matplotlib.figure import Figure

from .output import Section, percent, thousands, write_report
from .runs import Run, find_runs, read_scalars, varying_overrides
from .study_figures import study_sections

METRICS = ("test/acc", "test/acc_top5", "val/acc", "params", "wall_time_s")
FORMATS = {
    "test/acc": percent,
    "test/acc_top5": percent,
    "val/acc": percent,
    "params": thousands,
    "wall_time_s": lambda s: f"{s:,.1f}",
}
# What a run with a time budget (budget=30m) adds: the budget, the time the whole command used
# and the epochs trained (a fraction: the budget ends training mid-epoch).
BUDGET_FORMATS = {
    "budget_min": lambda m: f"{m:.4g}",
    "budget_used_s": FORMATS["wall_time_s"],
    "epochs_done": lambda e: f"{e:.2f}",
}
# The overrides that set the budget (budget=30m is budget.minutes=30 by then) and those that
# only repeat a run: neither makes a line of its own in the time-to-accuracy figure.
BUDGET_OVERRIDES = ("budget.minutes", "trainer.max_time")
REPEAT_OVERRIDES = ("seed",)
TIME_TO_ACCURACY_FORMATS = {
    "budget_min": BUDGET_FORMATS["budget_min"],
    **dict.fromkeys(("test/acc mean", "test/acc min", "test/acc max"), percent),
}


def short_value(value: str) -> str:
    """An override value as a table reads it: 0.021153673722318383 -> 0.02115."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.4g}"


def has_budget(run: Run) -> bool:
    return run.metrics is not None and "budget_s" in run.metrics


def budget_minutes(run: Run) -> float | None:
    return run.metrics["budget_s"] / 60 if has_budget(run) else None


def was_pruned(run: Run) -> bool:
    return bool(run.metrics and run.metrics.get("pruned"))


def summary_rows(runs: list[Run]) -> list[dict[str, object]]:
    """Per job: the overrides that differ between jobs, then its final metrics (and its time
    budget's, when any job had one; the epoch it was pruned after, when any job was pruned);
    sorted by test accuracy, unfinished jobs last."""
    varying = varying_overrides(runs)
    budgets = any(has_budget(run) for run in runs)
    pruning = any(was_pruned(run) for run in runs)
    rows = []
    for run in runs:
        metrics = run.metrics or {}
        row = {
            "job": run.name,
            **{key: run.overrides.get(key, "") for key in varying},
            **{key: metrics.get(key) for key in METRICS},
        }
        if budgets:
            row["budget_min"] = budget_minutes(run)
            row |= {key: metrics.get(key) for key in ("budget_used_s", "epochs_done")}
        if pruning:  # None (shown as a dash) for the trials that ran to the end
            row["pruned_after_epoch"] = (
                metrics.get("pruned_after_epoch") if was_pruned(run) else None
            )
        rows.append(row)
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


def line_overrides(runs: list[Run]) -> list[str]:
    """The varying overrides that tell the time-to-accuracy lines apart: all but the budget's
    and the seed's."""
    ignored = (*BUDGET_OVERRIDES, *REPEAT_OVERRIDES)
    return [key for key in varying_overrides(runs) if key not in ignored]


def time_to_accuracy_rows(runs: list[Run], keys: list[str]) -> list[dict[str, object]]:
    """Per value of the overrides `keys` and per budget: the mean, lowest and highest test
    accuracy of the jobs there (those that differ only in seed) and their number, n."""
    groups: dict[tuple[str, ...], dict[float, list[float]]] = {}
    for run in runs:
        line = groups.setdefault(tuple(run.overrides.get(key, "") for key in keys), {})
        line.setdefault(budget_minutes(run), []).append(run.metrics["test/acc"])
    return [
        {
            **dict(zip(keys, values, strict=True)),
            "budget_min": minutes,
            "test/acc mean": mean(accuracies),
            "test/acc min": min(accuracies),
            "test/acc max": max(accuracies),
            "n": len(accuracies),
        }
        for values, line in groups.items()
        for minutes, accuracies in sorted(line.items())
    ]


def plot_time_to_accuracy(rows: list[dict[str, object]], keys: list[str]) -> Figure:
    """Test accuracy against the budget, one line per value of `keys`: each point the mean
    over seeds, its bar from the lowest to the highest, n in the legend (or at each point
    where it differs along a line); the budgets on a log scale, ticked where they are."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    lines: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        label = ", ".join(f"{key}={short_value(row[key])}" for key in keys) or "all jobs"
        lines.setdefault(label, []).append(row)
    for label, points in lines.items():
        budgets = [p["budget_min"] for p in points]
        means = [100 * p["test/acc mean"] for p in points]
        below = [m - 100 * p["test/acc min"] for m, p in zip(means, points, strict=True)]
        above = [100 * p["test/acc max"] - m for m, p in zip(means, points, strict=True)]
        counts = sorted({p["n"] for p in points})
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        ax.errorbar(
            budgets,
            means,
            yerr=[below, above],
            marker="o",
            markersize=4,
            capsize=3,
            label=f"{label} (n={n} seeds)",
        )
        if len(counts) > 1:
            for x, y, p in zip(budgets, means, points, strict=True):
                ax.annotate(f"n={p['n']}", (x, y), (4, 4), textcoords="offset points", fontsize=7)
    ticks = sorted({row["budget_min"] for row in rows})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [BUDGET_FORMATS["budget_min"](t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("time budget of the whole command (minutes, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy against the time budget (mean over seeds, min–max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def time_to_accuracy_section(runs: list[Run]) -> Section:
    """The jobs with a time budget: their accuracy against it, as a table and a figure."""
    timed = [run for run in runs if has_budget(run)]
    keys = line_overrides(timed)
    rows = time_to_accuracy_rows(timed, keys)
    per = f" and per {', '.join(keys)}" if keys else ""
    text = (
        f"Test accuracy against the time budget of the whole command: per budget{per}, the\n"
        "mean over the jobs that differ only in seed, the lowest and the highest, and n, the\n"
        "number of those jobs."
    )
    formats = {**TIME_TO_ACCURACY_FORMATS, **dict.fromkeys(keys, short_value)}
    caption = "test accuracy against the time budget: mean over seeds, bars from min to max"
    figure = plot_time_to_accuracy(rows, keys)
    heading = "Time to accuracy"
    return Section("summary_time_to_accuracy", heading, text, rows, formats, figure, caption)


def write_summary(directory: str | Path, out: Path | None = None) -> list[Path]:
    """summary.md, summary.csv and summary_val_acc.png in `out` (default: the sweep's folder);
    for jobs with a time budget also summary_time_to_accuracy.csv and .png; for a sweep with an
    Optuna study also summary_optimization_history and summary_param_importances (.csv, .png)."""
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
    sections = []
    if any(has_budget(run) for run in runs):
        formats |= BUDGET_FORMATS
        text += (
            "\nThen the time budget (minutes), the time the whole command used (s) and the\n"
            "epochs it trained."
        )
        sections.append(time_to_accuracy_section(runs))
    if any(was_pruned(run) for run in runs):
        formats["pruned_after_epoch"] = str
        text += "\nThen the epoch after which the sweeper's pruner stopped the trial (—: none)."
    notes = ""
    if unfinished:
        notes = f"No metrics.json (failed or still running): {', '.join(unfinished)}."
    study, study_note = study_sections(directory)
    sections += study
    notes = "\n\n".join(note for note in (notes, study_note) if note)
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
        sections=sections,
    )
