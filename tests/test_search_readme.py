"""docs/placement.md: its claims hold on its tables, on its measured spread and on
a live run of ``examples/placement_search.py`` (on this machine's kernels, whatever they are).

The digits themselves are one machine's: another seed or CPU trains other networks. The claims
and their margins are those the guide states, taken from the spread over three seeds and two
sets of CPU kernels (``benchmarks/search_seeds.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLACEMENT = ROOT / "docs" / "placement.md"
IBN_A = ["a:1", "a:1-2", "a:1-3", "a:1-2@0.25"]


def _section() -> str:
    text = PLACEMENT.read_text()
    return text[text.index("## On the digits demo's baseline") :]


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: rows of cells, header and rule rows dropped."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set(line) <= set("|-: "):
                tables[-1].append(cells)
        previous = line
    return [t[1:] for t in tables]  # drop headers


def _number(cell: str, last: bool = False) -> float:
    """``98.8``, ``12.3–19.5`` (the low end, or the high end with ``last``), ``2.0 (gamma)``."""
    values = re.findall(r"\d+(?:\.\d+)?", cell)
    return float(values[-1] if last else values[0])


def check_stage_claims(times_content: dict[str, float]) -> None:
    """Every stage ≥ 100× its content baseline; stage 1 ≥ 2× stage 3."""
    assert min(times_content.values()) >= 100
    assert times_content["1"] >= 2 * times_content["3"]


def check_candidate_claims(clean: dict[str, float], drop: dict[str, float]) -> None:
    """IBN-b < 0.1× the control's mean drop, every IBN-a < 0.9×; 1-2 and 1-3 beat 1 alone;
    ratio 0.5 beats 0.25; clean within 2 points of the control."""
    control = drop["control"]
    assert drop["b"] < 0.1 * control
    assert all(drop[name] < 0.9 * control for name in IBN_A)
    assert drop["a:1-2"] < drop["a:1"] and drop["a:1-3"] < drop["a:1"]
    assert drop["a:1-2"] < drop["a:1-2@0.25"]
    assert all(abs(clean[name] - clean["control"]) <= 2.0 for name in clean)


def _stage_key(cell: str) -> str:
    return "0" if cell == "stem" else cell


def test_the_readme_tables_make_the_claims_they_state() -> None:
    section = _section()
    stages, candidates, spread_stages, spread = _tables(section)
    check_stage_claims({_stage_key(r[0]): _number(r[4]) for r in stages})
    check_candidate_claims(
        {r[1]: _number(r[2]) for r in candidates}, {r[1]: _number(r[3]) for r in candidates}
    )
    assert "suggested `stages=1-2`" in section
    # the measured spread, worst case of each claim over the runs
    assert min(_number(r[1]) for r in spread_stages) >= 100
    by_stage = {_stage_key(r[0]): r[1] for r in spread_stages}
    assert _number(by_stage["1"]) >= 2 * _number(by_stage["3"], last=True)
    rows = {r[0]: r for r in spread}
    assert _number(rows["b"][3], last=True) < 0.1
    assert all(_number(rows[name][3], last=True) < 0.9 for name in IBN_A)
    control_clean = _number(rows["control"][1], last=True)
    assert all(control_clean - _number(r[1]) <= 2.0 for r in spread)


@pytest.mark.slow
def test_a_live_run_of_the_example_makes_the_same_claims(tmp_path: Path) -> None:
    """The example from a fresh output folder, then rerun (the study is reused)."""
    command = [
        sys.executable,
        str(ROOT / "examples" / "placement_search.py"),
        "--out",
        str(tmp_path / "placement"),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    tables = _tables(first.stdout)
    stages, candidates = tables[1], tables[2]  # after the per-layer table
    check_stage_claims({_stage_key(r[0]): _number(r[4]) for r in stages})
    check_candidate_claims(
        {r[1]: _number(r[2]) for r in candidates}, {r[1]: _number(r[3]) for r in candidates}
    )
    assert "suggested `stages=1-2`" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    assert _tables(again.stdout)[2] == candidates  # the finished study, reused
    assert (tmp_path / "placement" / "search" / "study.journal").is_file()
