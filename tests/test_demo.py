"""The digits demo: the CLI's reduced run, and the README's full run with its claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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
    # The written checkpoints rebuild: the IBN model by recipe, the control and the baseline
    # with no plan at all (issue 23: no made-up "none" plan), by name.
    assert type(ibnify.load(tmp_path / "ibn.safetensors").layer1[0].bn1).__name__ == "IBN"
    assert [p.layout for p in ibnify.read_recipe(tmp_path / "ibn.safetensors").plans] == [
        "resnet-a"
    ]
    for name in ("control", "baseline"):
        recipe = ibnify.read_recipe(tmp_path / f"{name}.safetensors")
        assert (recipe.plans, recipe.source, recipe.num_classes) == (
            (),
            "ibnify:digits_resnet",
            10,
        )
    control = ibnify.load(tmp_path / "control.safetensors")
    assert type(control.layer1[0].bn1).__name__ == "BatchNorm2d"
    assert not any(type(m).__name__ == "IBN" for m in control.modules())
    again = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path)])
    assert again.exit_code == 1 and "--force" in again.output


README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = "### The demo (the main command)"
DEMO_GUIDE = README.parent / "docs" / "demo.md"  # the spread table and how to read it
# The README's claims about the demo (see claims_hold). Measured over seeds 0-4 under two CPU
# capabilities (benchmarks/demo_spread.py): clean gap -0.2..+0.3 points, mean-drop ratio
# 0.44..0.85, gains 4.3..42.6 (brightness_down) and 18.3..52.4 (contrast_down) points; gamma
# improves at 8 of 10 runs only, so the README claims nothing for it. The bounds keep a margin.
CLEAN_BAND = 1.0
MAX_MEAN_RATIO = 0.9
MIN_KEY_GAIN = 2.0
CLAIMED_SHIFTS = ("brightness_down", "contrast_down")


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


def _rows(table: str) -> list[str]:
    """A markdown table's first column (the shift names), header included."""
    return [line.split("|")[1].strip() for line in table.splitlines() if "---" not in line]


def test_readme_demo_table_has_the_rows_and_lines_the_demo_prints(full_demo) -> None:
    """The README shows one machine's run: the same rows, columns and lines as the demo prints
    here, not the same digits (another CPU's kernels train another network; the spread is
    measured by benchmarks/demo_spread.py and shown beside the table)."""
    shown_table = readme_tables(DEMO)[0]
    printed_table = full_demo.report.table()
    assert _rows(shown_table) == _rows(printed_table)
    assert shown_table.splitlines()[0] == printed_table.splitlines()[0]  # the columns
    printed = full_demo.summary().splitlines()
    shown = readme_block_lines(DEMO)
    words = ("clean accuracy", "brightness_down:", "contrast_down:", "gamma:", "exported")
    assert [w for w in words if any(line.startswith(w) for line in shown)] == list(words)
    assert [w for w in words if any(line.startswith(w) for line in printed)] == list(words)
    assert any(line.startswith("ran with torch ") for line in shown)
    assert shown[-1].startswith("demo finished in ")


def test_demo_prints_what_its_figures_depend_on(full_demo) -> None:
    """The line under the table names the torch version, the CPU capability and the threads."""
    line = next(x for x in full_demo.summary().splitlines() if x.startswith("ran with"))
    capability = torch.backends.cpu.get_cpu_capability()
    assert line.startswith(f"ran with torch {torch.__version__}, CPU capability {capability}, ")
    assert ", 1 thread;" in line
    recorded = json.loads(full_demo.files["report"].read_text())["demo"]["platform"]
    assert recorded == {"torch": torch.__version__, "cpu_capability": capability, "threads": 1}


def claims_hold(clean_gap: float, mean_ratio: float, key_gains: dict[str, float]) -> list[str]:
    """The README's words about the demo, as checks (points; ratio of mean drops): the clean
    accuracy within CLEAN_BAND of the control, a mean drop at most MAX_MEAN_RATIO of the
    control's, and at least MIN_KEY_GAIN points less lost under each of CLAIMED_SHIFTS."""
    broken = []
    if abs(clean_gap) > CLEAN_BAND:
        broken.append(f"clean gap {clean_gap:+.1f} points")
    if mean_ratio > MAX_MEAN_RATIO:
        broken.append(f"mean drop ratio {mean_ratio:.2f}")
    broken += [f"{k} gain {v:.1f}" for k, v in key_gains.items() if v < MIN_KEY_GAIN]
    return broken


def test_full_demo_meets_the_readme_claims(full_demo) -> None:
    """The README's run (seed 0) on this machine's kernels makes every claim the README's words
    make, and verifies its ONNX export on all 599 test digits."""
    report = full_demo.report
    gap = 100 * (report.accuracy["ibn"]["clean"] - report.accuracy["control"]["clean"])
    ratio = report.mean_drop("ibn") / report.mean_drop("control")
    gains = {s: 100 * (report.drop("control", s) - report.drop("ibn", s)) for s in CLAIMED_SHIFTS}
    assert claims_hold(gap, ratio, gains) == []
    assert full_demo.onnx["passed"] and "599/599 real test digits" in full_demo.onnx["line"]
    assert full_demo.seconds < 300


def _spread_rows(text: str) -> list[dict[str, str]]:
    """The per-run rows of the demo-spread table in ``text`` (min/max rows left out)."""
    lines = [x for x in text.splitlines() if x.startswith("| kernels |")]
    assert len(lines) == 1, "no demo-spread table found"
    after = text[text.index(lines[0]) :].splitlines()
    table = after[: next((i for i, x in enumerate(after) if not x.startswith("|")), len(after))]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = []
    for line in table[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return [row for row in rows if not row["kernels"].startswith("**")]


def test_readme_spread_is_what_demo_spread_wrote_and_every_run_makes_the_claims() -> None:
    """The spread table of the demo guide (docs/demo.md) is the one benchmarks/demo_spread.py
    wrote (seeds 0-4, two CPU capabilities), and the README's claims hold at every run of it:
    the claims are what holds everywhere, the digits are one machine's."""
    results = (README.parent / "benchmarks" / "RESULTS.md").read_text()
    shown = _spread_rows(DEMO_GUIDE.read_text(encoding="utf-8"))
    assert shown == _spread_rows(results)
    assert len(shown) == 10 and len({row["kernels"] for row in shown}) == 2
    for row in shown:
        gains = {s: float(row[f"{s} control"]) - float(row[f"{s} ibn"]) for s in CLAIMED_SHIFTS}
        gap = float(row["clean ibn"]) - float(row["clean control"])
        assert claims_hold(gap, float(row["ibn / control"]), gains) == [], row
