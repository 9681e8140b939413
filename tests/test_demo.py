"""The digits demo: the CLI's reduced run, and the README's full run with its claims."""

from __future__ import annotations

import json
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


def test_full_demo_meets_the_readme_claims(tmp_path: Path) -> None:
    """The README's run (seed 0): clean accuracy within 1 point of the control, and at least
    10 points less accuracy lost under darkening and low contrast (seeds 1 and 2 also do)."""
    result = run_demo(tmp_path, DemoConfig())
    report = result.report
    assert result.seconds < 180
    clean_gap = report.accuracy["ibn"]["clean"] - report.accuracy["control"]["clean"]
    assert abs(clean_gap) <= 0.01
    for shift in ("brightness_down", "contrast_down"):
        assert report.drop("ibn", shift) <= report.drop("control", shift) - 0.10, shift
    assert result.onnx["passed"]
