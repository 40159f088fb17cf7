"""Parameters per stage and per layer type, from the real model: the seed's "Parameter
Distribution" figure.

    python -m resnet_lightning.report params model=resnet56 [more overrides] [--out DIR]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from matplotlib.figure import Figure
from torch import nn

from resnet_lightning.config import compose_config
from resnet_lightning.errors import UsageError
from resnet_lightning.models.summary import parameter_counts
from resnet_lightning.report.output import (
    csv_text,
    markdown_table,
    png_bytes,
    thousands,
    write_files,
)


def parameter_rows(counts: dict[str, Counter[str]]) -> list[dict[str, object]]:
    """One row per stage and a total row: parameters per layer type, total and share."""
    layer_types = sorted({t for c in counts.values() for t in c}, key=_by_total(counts))
    total = sum(sum(c.values()) for c in counts.values())
    rows = []
    for stage, c in [*counts.items(), ("total", sum(counts.values(), Counter()))]:
        stage_total = sum(c.values())
        rows.append(
            {
                "stage": stage,
                **{t: c.get(t, 0) for t in layer_types},
                "parameters": stage_total,
                "share": f"{100 * stage_total / total:.1f}%",
            }
        )
    return rows


def _by_total(counts: dict[str, Counter[str]]):
    totals = sum(counts.values(), Counter())
    return lambda layer_type: -totals[layer_type]


def plot_parameter_counts(counts: dict[str, Counter[str]], title: str) -> Figure:
    """Bars per stage, stacked by layer type, labelled with each stage's total."""
    layer_types = sorted({t for c in counts.values() for t in c}, key=_by_total(counts))
    names = list(counts)
    figure = Figure(figsize=(max(6.0, 0.8 * len(names) + 2), 4.5), layout="constrained")
    ax = figure.subplots()
    bottom = np.zeros(len(names))
    for layer_type in layer_types:
        values = np.array([counts[n].get(layer_type, 0) for n in names]) / 1e6
        ax.bar(names, values, bottom=bottom, label=layer_type)
        bottom += values
    for x, height in enumerate(bottom):
        ax.annotate(f"{height:.2f}M" if height >= 0.01 else f"{height * 1e6:,.0f}",
                    (x, height), ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.margins(y=0.1)  # room for the labels above the tallest bar
    ax.set_ylabel("parameters (millions)")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(title="layer type", fontsize=8, loc="upper left")
    return figure


def build_model(overrides: list[str]) -> tuple[nn.Module, str]:
    """The model exactly as `python -m resnet_lightning OVERRIDES` builds it (on the meta
    device: shapes only, no memory), and its name."""
    cfg = compose_config(overrides)
    cfg.model.pretrained = None  # counting needs shapes, not weights
    cfg.model.compile = False
    with torch.device("meta"):
        try:
            model = instantiate(cfg.model)
        except Exception as err:  # a bad model argument: name it, not the traceback
            raise UsageError(f"model {cfg.model.name}: {err.__cause__ or err}") from None
    return model, cfg.model.name


def write_params_report(overrides: list[str], out: Path) -> list[Path]:
    """params_<model>.md/.csv/.png in `out` for the model that `overrides` configure."""
    model, name = build_model(overrides)
    counts = parameter_counts(model)
    rows = parameter_rows(counts)
    label = " ".join(overrides) or f"model={name}"
    total = rows[-1]["parameters"]
    figure = plot_parameter_counts(counts, f"{name}: {total / 1e6:.2f}M parameters")
    stem = f"params_{name}"
    formats = {k: thousands for k in rows[0] if k not in ("stage", "share")}
    markdown = "\n".join(
        [
            f"# Parameters of {name}",
            "",
            f"`python -m resnet_lightning.report params {label}`: {total:,} parameters, per",
            "stage (the network's top-level modules) and per layer type (the module class",
            "holding them).",
            "",
            markdown_table(rows, formats),
            "",
            f"![parameters per stage]({stem}.png)",
            "",
        ]
    )
    return write_files(
        {
            out / f"{stem}.md": markdown,
            out / f"{stem}.csv": csv_text(rows),
            out / f"{stem}.png": png_bytes(figure),
        }
    )
