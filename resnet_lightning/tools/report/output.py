"""Writing a report: a markdown page with a table, the table's CSV twin and a figure as PNG (and
any further sections, each a table and a figure of its own), each file written whole."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from resnet_lightning.atomic_files import write_atomic

Row = dict[str, Any]
Formats = dict[str, Callable[[Any], str]]


def markdown_table(rows: Sequence[Row], formats: Formats = ()) -> str:
    """`rows` as a markdown table; `formats` maps a column to how its values read."""
    formats = dict(formats)
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(column: str, value: Any) -> str:
        if value is None or value == "":
            return "—"
        return formats[column](value) if column in formats else str(value)

    def is_numeric(column: str) -> bool:
        values = [r.get(column) for r in rows if r.get(column) not in (None, "")]
        return bool(values) and all(isinstance(v, int | float) for v in values)

    numeric = {c for c in columns if is_numeric(c)}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: Sequence[Row]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def png_bytes(figure: Figure, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


@dataclass(frozen=True)
class Section:
    """A further table and figure of a report, under its own heading on the report's page; its
    table is also `<name>.csv`, its figure `<name>.png`."""

    name: str
    heading: str
    text: str
    rows: Sequence[Row]
    formats: Formats
    figure: Figure
    caption: str


def write_report(
    out: Path,
    stem: str,
    title: str,
    text: str,
    rows: Sequence[Row],
    formats: Formats,
    figure: Figure,
    caption: str,
    *,
    notes: str = "",
    figure_name: str | None = None,
    sections: Sequence[Section] = (),
) -> list[Path]:
    """`<stem>.md` (the title, `text`, the table of `rows`, `notes` and the figure with its
    caption, then each of `sections`), its CSV twin `<stem>.csv`, the figure as
    `<figure_name or stem>.png` and each section's CSV and PNG, in `out`."""
    png = f"{figure_name or stem}.png"
    markdown = [f"# {title}", "", text, "", markdown_table(rows, formats), ""]
    markdown += [notes, ""] if notes else []
    markdown += [f"![{caption}]({png})", ""]
    files = {out / f"{stem}.csv": csv_text(rows), out / png: png_bytes(figure)}
    for section in sections:
        markdown += [f"## {section.heading}", "", section.text, ""]
        markdown += [markdown_table(section.rows, section.formats), ""]
        markdown += [f"![{section.caption}]({section.name}.png)", ""]
        files[out / f"{section.name}.csv"] = csv_text(section.rows)
        files[out / f"{section.name}.png"] = png_bytes(section.figure)
    return write_files({out / f"{stem}.md": "\n".join(markdown), **files})


def write_files(files: dict[Path, str | bytes]) -> list[Path]:
    """Write every file through a temporary name, so none is ever left half-written."""
    return [write_atomic(path, content) for path, content in files.items()]


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def thousands(value: int) -> str:
    return f"{value:,}"
