"""Shared helper for benchmark scripts: update one section of benchmarks/RESULTS.md in place.

Each script owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, so scripts
can run in any order without overwriting each other's figures. The file is written atomically.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = (
    "# Benchmark results\n\n"
    "Written by the scripts in `benchmarks/`; each section says the command that produced it.\n"
    "Ratios are measured side by side in one run; absolute times vary from run to run.\n"
)


def machine_line() -> str:
    """One line describing where the figures were measured."""
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


def update_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``markdown``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else _HEADER
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        before = text[: text.index(start)]
        after = text[text.index(end) + len(end) :]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
