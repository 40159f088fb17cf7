"""Parameters per stage and per layer type, from the real model: the "Parameter Distribution"
figure.

    python -m resnet_lightning.report params model=resnet56 [more overrides] [--out DIR]
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from resnet_lightning.callbacks.figures import layer_types_by_size, plot_parameter_counts
from resnet_lightning.models.complexity import parameter_counts
from resnet_lightning.training.config import compose_config, instantiate_group

from .output import thousands, write_report


def parameter_rows(counts: dict[str, Counter[str]]) -> list[dict[str, object]]:
    """One row per stage and a total row: parameters per layer type, total and share."""
    layer_types = layer_types_by_size(counts)
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


def build_model(overrides: list[str]) -> tuple[nn.Module, str]:
    """The model exactly as `python -m resnet_lightning OVERRIDES` builds it (on the meta
    device: shapes only, no memory), and its name."""
    cfg = compose_config(overrides)
    cfg.model.pretrained = None  # counting needs shapes, not weights
    cfg.model.compile = False
    with torch.device("meta"):
        model = instantiate_group(cfg, "model")
    return model, cfg.model.name


def file_label(overrides: list[str], name: str) -> str:
    """The overrides as a file name, so that two models' reports do not overwrite each other:
    [model=resnet50, model.stem=imagenet] -> resnet50_stem-imagenet."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "model":
            continue
        parts.append(f"{key.removeprefix('model.')}-{value}")
    label = "_".join([name, *parts])
    return re.sub(r"[^A-Za-z0-9._-]+", "", label.replace("/", "-").replace(",", "-"))


def write_params_report(overrides: list[str], out: Path) -> list[Path]:
    """params_<model>[_<key>-<value>...].md/.csv/.png in `out` for the model that `overrides`
    configure (named after them, so that reports of the same model do not overwrite others)."""
    model, name = build_model(overrides)
    counts = parameter_counts(model)
    rows = parameter_rows(counts)
    label = " ".join(overrides) or f"model={name}"
    total = rows[-1]["parameters"]
    figure = plot_parameter_counts(counts, f"{name}: {total / 1e6:.2f}M parameters")
    stem = "params_" + file_label(overrides, name)
    formats = {k: thousands for k in rows[0] if k not in ("stage", "share")}
    text = (
        f"`python -m resnet_lightning.report params {label}`: {total:,} parameters, per\n"
        "stage (the network's top-level modules) and per layer type (the module class\n"
        "holding them)."
    )
    title, caption = f"Parameters of {name}", "parameters per stage"
    return write_report(out, stem, title, text, rows, formats, figure, caption)
