"""The `plan` and `convert` commands, through click's runner and the real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ibnify
from ibnify.cli import cli

SMALL = ["--input-size", "64"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_plan_table_lists_sites_and_delta(runner) -> None:
    result = runner.invoke(cli, ["plan", "resnet50", "--stages", "1-3", *SMALL])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("ConversionPlan(tv:resnet50, layout=resnet-a, stages=1,2,3")
    site_rows = [line for line in lines if line.startswith("layer") and " ibn " in line]
    assert len(site_rows) == 13
    assert site_rows[0].split()[:6] == ["layer1.0.bn1", "ibn", "64", "1", "32", "32"]
    assert lines[-1] == "13 sites; per stage: 1: 3, 2: 4, 3: 6; parameter delta +0"


def test_plan_json_and_verbose(runner) -> None:
    result = runner.invoke(cli, ["plan", "resnet18", "--stages", "1,2", "--json", *SMALL])
    data = json.loads(result.output)
    assert [s["name"] for s in data["sites"]] == [
        "layer1.0.bn1",
        "layer1.1.bn1",
        "layer2.0.bn1",
        "layer2.1.bn1",
    ]
    verbose = runner.invoke(cli, ["plan", "resnet18", "-v", *SMALL])
    assert "layer1.0.downsample" not in verbose.output  # resnet18 layer1 has no downsample
    assert "layer2.0.downsample.1  2      shortcut (downsample) BN" in verbose.output


def test_convert_writes_a_loadable_checkpoint(runner, tmp_path) -> None:
    out = tmp_path / "r18.safetensors"
    args = ["convert", "resnet18", "--layout", "b", "--seed", "1", "-o", str(out), *SMALL]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith(f"wrote {out}")
    loaded = ibnify.load(out)
    assert isinstance(loaded.bn1, torch.nn.InstanceNorm2d)
    again = runner.invoke(cli, args)
    assert again.exit_code == 1
    assert again.output.strip().startswith("error: output file") and "--force" in again.output
    forced = runner.invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["plan", "resnet18", "--stages", "3-1"], 2, "runs backwards"),
        (["plan", "resnet18", "--stages", "5"], 1, "stage 5 is out of range"),
        (["plan", "resnet18", "--ratio", "1"], 2, "not strictly between 0 and 1"),
        (["plan", "resnet18", "--ratio", "nan"], 2, "not strictly between 0 and 1"),
        (["plan", "resnet5O"], 1, "did you mean"),
        (["plan", "resnet18", "--layout", "z"], 2, "is not one of"),
        (["convert", "resnet18"], 2, "Missing option '-o'"),
    ],
)
def test_errors_are_one_line(runner, args, code, message) -> None:
    result = runner.invoke(cli, [*args, *SMALL])
    assert result.exit_code == code
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_export_verbose_lists_each_unfolded_site(runner, tmp_path) -> None:
    """DenseNet's norm1 follows a Concat, so its IBN sites stay unfolded; -v names each one."""
    checkpoint = tmp_path / "d121.safetensors"
    ibnify.save(ibnify.convert("densenet121", stages=(1,), input_size=(3, 32, 32)), checkpoint)
    args = ["export", str(checkpoint), "-o", str(tmp_path / "d121.onnx"), "--input-size", "32"]
    result = runner.invoke(cli, [*args, "--no-verify", "--verbose"])
    assert result.exit_code == 0, result.output
    reason = "its input comes from torch.cat, not from a Conv2d"
    assert result.output.splitlines()[-3:] == [
        f"  2 sites left unfolded: {reason}",  # the summary, as without --verbose
        f"  unfolded features.denseblock1.denselayer1.norm1: {reason}",
        f"  unfolded features.denseblock1.denselayer4.norm1: {reason}",
    ]


def test_help_on_every_command(runner) -> None:
    for command in cli.commands:
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and "Usage: ibnify " + command in result.output


def test_real_console_script(tmp_path) -> None:
    """Once through the installed `ibnify` entry point, as a user runs it."""
    script = Path(sys.executable).with_name("ibnify")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ibnify"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, env=env)
    assert (
        version.returncode == 0
        and version.stdout.strip() == f"ibnify, version {ibnify.__version__}"
    )
    out = tmp_path / "r18.safetensors"
    done = subprocess.run(
        [*command, "convert", "resnet18", "-o", str(out), *SMALL],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "6 sites; per stage: 1: 2, 2: 2, 3: 2; parameter delta +0" in done.stdout
    assert ibnify.read_recipe(out).source == "tv:resnet18"
    bad = subprocess.run(
        [*command, "convert", "nosuchnet", "-o", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: unknown model 'nosuchnet'")
    assert not (tmp_path / "x.safetensors").exists()
