"""The digits demo: the CLI's reduced run, and the README's full run with its claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ibnify
from ibnify.cli import cli
from ibnify.demo import DemoConfig, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_demo_quick_runs_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("robustness.png", "robustness.json", "ibn.safetensors", "ibn.onnx"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "robustness.json").read_text())
    assert report["models"] == ["baseline", "control", "ibn"]
    accuracy = report["accuracy"]
    # Real digits, a working pipeline: all three models learn the task.
    assert min(accuracy[m]["clean"] for m in report["models"]) > 0.9
    # The IBN model loses less under darkening and low contrast than its all-BN control.
    for shift in ("brightness_down", "contrast_down"):
        assert report["drop"]["ibn"][shift] < report["drop"]["control"][shift], shift
    assert "PASS" in result.output and "599/599" in result.output
    # The written checkpoints rebuild: the IBN model by recipe, the control with no change.
    assert type(ibnify.load(tmp_path / "ibn.safetensors").layer1[0].bn1).__name__ == "IBN"
    control = ibnify.load(tmp_path / "control.safetensors")
    assert type(control.layer1[0].bn1).__name__ == "BatchNorm2d"
    again = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path)])
    assert again.exit_code == 1 and "--force" in again.output


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_tables(heading: str) -> list[str]:
    """The markdown tables (runs of ``|`` lines) in the README section under ``heading``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    tables: list[list[str]] = []
    for previous, line in zip(lines[start - 1 : end], lines[start:end], strict=False):
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
    return ["\n".join(table) for table in tables]


def readme_block_lines(heading: str) -> list[str]:
    """The lines of the first fenced block after the first table under ``heading``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    table = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    fence = next(i for i in range(table, len(lines)) if lines[i].startswith("```"))
    close = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    return lines[fence + 1 : close]


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    """The README's run (seed 0, default sizes), run once for every test below."""
    return run_demo(tmp_path_factory.mktemp("demo"), DemoConfig())


def test_readme_demo_table_is_what_the_demo_prints(full_demo) -> None:
    """The README shows the table the demo prints today, digit for digit (seeded, one thread),
    and the comparison lines under it; only the run time may differ."""
    printed = full_demo.summary().splitlines()
    assert readme_tables("### The demo (the main command)")[0] == full_demo.report.table(), (
        "README.md's demo table differs from what `ibnify demo` prints; update the README"
    )
    shown = readme_block_lines("### The demo (the main command)")
    words = ("clean accuracy", "brightness_down:", "contrast_down:", "gamma:")
    assert [line for line in shown if line.startswith(words)] == [
        line for line in printed if line.startswith(words)
    ]
    # The README wraps the ONNX line in two.
    exported = " ".join(line for line in shown if line.startswith(("exported", "599/599")))
    assert exported == next(line for line in printed if line.startswith("exported"))
    assert shown[-1].startswith("demo finished in ") and len(shown) == 7


def test_full_demo_meets_the_readme_claims(full_demo) -> None:
    """The README's run (seed 0): clean accuracy within 1 point of the control, and at least
    10 points less accuracy lost under darkening and low contrast (seeds 1 and 2 also do)."""
    result = full_demo
    report = result.report
    assert result.seconds < 180
    clean_gap = report.accuracy["ibn"]["clean"] - report.accuracy["control"]["clean"]
    assert abs(clean_gap) <= 0.01
    for shift in ("brightness_down", "contrast_down"):
        assert report.drop("ibn", shift) <= report.drop("control", shift) - 0.10, shift
    assert result.onnx["passed"]


@pytest.mark.slow  # trains the baseline and fine-tunes six models: 1-2 minutes on 2 cores
def test_readme_placement_tables_are_what_the_example_prints(tmp_path: Path) -> None:
    """The README's two placement tables (divergence per stage, ranked candidates) are what
    ``examples/placement_search.py`` prints today (seeded, one thread)."""
    script = README.parent / "examples" / "placement_search.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "placement")],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    printed: list[list[str]] = []
    previous = ""
    for line in result.stdout.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                printed.append([])
            printed[-1].append(line)
        previous = line
    # The per-layer divergence table comes first; the README shows the per-stage one.
    assert len(printed) == 3 and printed[0][0].startswith("| # | layer")
    assert readme_tables("### On the digits demo's baseline") == [
        "\n".join(table) for table in printed[1:]
    ], "README.md's placement tables differ from examples/placement_search.py's; update them"
