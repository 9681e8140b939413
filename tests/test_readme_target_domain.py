"""The README's "Your own target domain" section is what the code prints: its commands run in
order in a fresh folder, and every output block the section shows appears in their output.

Slow (the full demo, two adaptations and a four-candidate search: minutes on two cores), so it
runs with ``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ibnify.cli import cli

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Your own target domain"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _section_blocks() -> list[tuple[str, list[str]]]:
    """``(language, lines)`` of each fenced block in the section, in order."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADING) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("## "))
    blocks: list[tuple[str, list[str]]] = []
    inside: list[str] | None = None
    for line in lines[start:end]:
        if line.startswith("```") and inside is None:
            inside = []
            blocks.append((line[3:].strip(), inside))
        elif line.startswith("```"):
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def _commands(lines: list[str]) -> list[list[str]]:
    """A bash block's commands: continuations joined, comments dropped."""
    text = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def test_the_target_domain_section_prints_what_the_readme_shows(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    outputs: list[str] = []
    shown: list[str] = []
    for language, lines in _section_blocks():
        if language != "bash":
            shown.append("\n".join(line.rstrip() for line in lines))
            continue
        for argv in _commands(lines):
            if argv[0] == "python":
                script = ROOT / argv[1]
                done = subprocess.run([sys.executable, str(script), *argv[2:]],
                                      capture_output=True, text=True, timeout=600)  # fmt: skip
                assert done.returncode == 0, done.stderr
                outputs.append(done.stdout)
                continue
            assert argv[0] == "ibnify", argv
            result = CliRunner().invoke(cli, argv[1:])
            assert result.exit_code == 0, (argv, result.output)
            outputs.append(result.output)
    printed = "\n".join(line.rstrip() for text in outputs for line in text.splitlines())
    assert len(shown) >= 4  # the two evaluate tables, the adapt table, the search table
    for block in shown:
        assert block in printed, block
