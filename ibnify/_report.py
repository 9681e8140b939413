"""Output helpers shared by the report classes: Markdown tables, stage ranges, PNG figures."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._io import atomic_write_bytes

__all__ = ["markdown_table", "new_figure", "save_png", "stage_range_text"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a Markdown table, every column padded to its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(header), separator, *map(line, rows)]


def stage_range_text(stages: Sequence[int]) -> str:
    """``1-3`` for consecutive stages (1, 2, 3), else ``1,3``: how ``--stages`` is written."""
    stages = list(stages)
    if len(stages) > 1 and stages == list(range(stages[0], stages[-1] + 1)):
        return f"{stages[0]}-{stages[-1]}"
    return ",".join(str(s) for s in stages)


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas (no display needed), 110 dpi."""
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Lay out ``figure`` and write it to ``path`` as PNG, atomically."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(Path(path), buffer.getvalue())
