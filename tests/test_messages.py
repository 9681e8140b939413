"""Messages a user can read: no object reprs, memory addresses or repeated lines on stderr.

Scans the CLI's output over the export of small zoo models, whose unfoldable-site warnings once
printed ``<built-in method cat of type object at 0x…>`` fourteen times for a DenseNet-121; the
bad-input matrix's stderr is scanned by the same rule in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

import ibnify
from ibnify.cli import cli
from tests.helpers import message_problems as _problems


def test_problems_finds_what_it_should() -> None:
    """The scanner itself: the densenet line of old, an address, a repeat; a clean line."""
    old = "its input comes from <built-in method cat of type object at 0x7f1520293460>"
    assert len(_problems(old)) == 1
    assert _problems("a <function f at 0x7f00aa11bb22>\nok\nok") == [
        "a <function f at 0x7f00aa11bb22>",
        "repeated: ok",
    ]
    assert _problems("error: checkpoint 'a.safetensors' refers to 0xff bytes") == []


@pytest.mark.parametrize(
    ("name", "verify"),
    [("resnet18", True), ("densenet121", True)],  # DenseNet has 14 unfoldable sites
)
def test_zoo_export_messages_show_no_internals(
    name: str, verify: bool, tmp_path: Path, one_thread, caplog
) -> None:
    checkpoint = tmp_path / f"{name}.safetensors"
    ibnify.save(ibnify.convert(name, input_size=(3, 64, 64)), checkpoint)
    args = ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--input-size", "64"]
    with caplog.at_level(logging.WARNING):
        done = CliRunner().invoke(cli, args + ([] if verify else ["--no-verify"]))
    assert done.exit_code == 0, done.output
    assert (tmp_path / "m.onnx").is_file()
    printed = done.stderr + "\n" + "\n".join(r.getMessage() for r in caplog.records)
    assert _problems(printed) == [], printed
    assert _problems(done.stdout) == [], done.stdout
    # DenseNet's 14 unfoldable sites: one summary warning naming torch.cat, not 14 lines.
    unfolded = [line for line in printed.splitlines() if "unfolded" in line]
    if name == "densenet121":
        assert unfolded == [
            "14 IBN sites exported unfolded (its input comes from torch.cat, not from a Conv2d)"
        ]
    else:
        assert unfolded == []
