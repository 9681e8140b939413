"""The command layer (issue 23): one input resolver, options records checked before any model
is built, library messages that name Python parameters and a CLI that shows them as flags."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import ibnify
from ibnify.cli import cli
from ibnify.cli._group import PARAMETER_FLAGS, to_flags
from ibnify.commands.adapt import AdaptFiles, adapt_files
from ibnify.commands.evaluate import EvaluateFiles, evaluate_files
from ibnify.commands.finetune import FinetuneFiles, finetune_files
from ibnify.commands.inputs import InputRequest, resolve_inputs
from ibnify.errors import InvalidOptionError
from ibnify.models.registry import build_model
from ibnify.train.config import FinetuneConfig

PACKAGE = Path(ibnify.__file__).parent
TINY = {"width": 4, "image_size": 8}

# Library modules still allowed to name a flag in a string, each with its reason.
FLAG_TEXT_ALLOWED = {
    # A report line that the CLI prints as it is (not an error): it names the flag that made it.
    "deploy/export.py": "export summary line names --no-fold",
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of string constants that stand alone as statements (docstrings, attribute notes)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def _flag_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and re.search(r"--[a-z]", node.value)
    ]


def test_no_library_module_names_a_flag_outside_the_allowlist() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name.startswith(("cli/", *FLAG_TEXT_ALLOWED)):
            continue
        strings = _flag_strings(path)
        if strings:
            found[name] = strings
    assert found == {}
    # The scan finds what it must: the allowlisted summary line, and a planted message.
    assert _flag_strings(PACKAGE / "deploy/export.py") == ["BN halves not folded (--no-fold)"]


def test_the_scan_catches_a_flag_in_a_message(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        '"""Docstrings may name --flags."""\n'
        "def f(x):\n"
        '    """So may this --one."""\n'
        '    raise ValueError(f"give --weights {x}")\n'
    )
    assert _flag_strings(module) == ["give --weights "]


def test_to_flags_rewrites_parameters_by_the_one_table() -> None:
    cases = {
        "give either `weights` or `pretrained`, not both": (
            "give either --weights or --pretrained, not both"
        ),
        "a 10-class head with `num_classes=10`": "a 10-class head with --num-classes 10",
        "exists; pass `force=True` to overwrite": "exists; pass --force to overwrite",
        "give either `data=DIR` or `dataset=digits`": "give either --data DIR or --dataset digits",
        "pass the original model as `teacher`": "pass the original model as --distill-from",
        "or use a new `out_dir`": "or use a new --out",
        # names outside the table, and code in backquotes, stay as written
        "`model_kwargs` of `ibnify.load(path)`": "`model_kwargs` of `ibnify.load(path)`",
    }
    assert {message: to_flags(message) for message in cases} == cases


def test_every_flag_of_the_table_is_an_option_of_some_command() -> None:
    options = {
        opt
        for command in cli.commands.values()
        for param in command.params
        for opt in param.opts
        if opt.startswith("--")
    }
    assert sorted(set(PARAMETER_FLAGS.values()) - options) == []


def test_the_python_api_names_parameters_not_flags(tmp_path: Path) -> None:
    with pytest.raises(ibnify.IbnifyError) as raised:
        ibnify.api.resolve_model("resnet18", tmp_path / "w.pth", pretrained=True)
    assert str(raised.value) == "give either `weights` or `pretrained`, not both"


def _checkpoint(tmp_path: Path, input_size: tuple[int, int, int] | None) -> Path:
    torch.manual_seed(0)
    model, source = build_model("ibnify:digits_resnet", **TINY)
    converted = ibnify.convert(
        model, stages=(1,), arch=source, model_kwargs=TINY, input_size=input_size
    )
    return ibnify.save(converted, tmp_path / "m.safetensors")


def _folder(root: Path) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (30, 30), (40 * i, 90, 200)).save(root / label / f"{i}.png")
    return root


def test_the_resolver_decides_the_size_once_given_over_recorded(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, (3, 12, 12))
    folder = _folder(tmp_path / "images")
    recorded = resolve_inputs(InputRequest(data=folder), path)
    assert recorded.input_size == (3, 12, 12)
    assert recorded.data("test").dataset[0][0].shape == (3, 12, 12)
    given = resolve_inputs(InputRequest(data=folder, input_size=20), recorded.model)
    assert given.model is recorded.model and given.input_size == (3, 20, 20)
    assert given.data("test").dataset[0][0].shape == (3, 20, 20)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (InputRequest(), "give either `data=DIR` or `dataset=digits`"),
        (InputRequest("x", "digits"), "give either `data=DIR` or `dataset=digits`"),
        (InputRequest(dataset="mnist"), "unknown dataset 'mnist'"),
    ],
)
def test_the_request_is_refused_before_the_checkpoint_is_read(
    request_: InputRequest, message: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no.safetensors"  # reading it would fail with another message
    with pytest.raises(InvalidOptionError, match=re.escape(message)):
        resolve_inputs(request_, missing)


def test_finetune_refuses_an_unwritable_out_before_loading(tmp_path: Path) -> None:
    missing = tmp_path / "no.safetensors"
    run = FinetuneFiles(missing, InputRequest(dataset="digits"))
    with pytest.raises(InvalidOptionError) as raised:
        finetune_files(run, FinetuneConfig(out_dir="/proc/run"))
    assert str(raised.value) == "output directory '/proc' is not writable"
    result = CliRunner().invoke(
        cli, ["finetune", str(missing), "--dataset", "digits", "--out", "/proc/run"]
    )
    assert (result.exit_code, result.output) == (
        1,
        "error: output directory '/proc' is not writable\n",
    )


def test_evaluate_refuses_an_existing_plot_before_loading(tmp_path: Path) -> None:
    plot = tmp_path / "p.png"
    plot.write_bytes(b"old")
    missing = tmp_path / "no.safetensors"
    with pytest.raises(ibnify.IbnifyError, match=r"already exists; pass `force=True`"):
        evaluate_files(EvaluateFiles([missing], InputRequest(dataset="digits"), plot=plot))
    result = CliRunner().invoke(
        cli, ["evaluate", str(missing), "--dataset", "digits", "--plot", str(plot)]
    )
    assert (result.exit_code, result.output) == (
        1,
        f"error: output file {str(plot)!r} already exists; pass --force to overwrite\n",
    )
    assert plot.read_bytes() == b"old"


def test_an_os_error_names_the_users_path_never_a_temp_file(tmp_path: Path, monkeypatch) -> None:
    from ibnify.cli._group import os_error_line

    temp, target = tmp_path / ".m.safetensors.0a1b2c3d.tmp", tmp_path / "m.safetensors"
    renamed = PermissionError(1, "Operation not permitted", str(temp), None, str(target))
    assert os_error_line(renamed) == (
        f"Operation not permitted: {str(target)!r} (rerun with --debug for the traceback)"
    )
    alone = PermissionError(13, "Permission denied", str(temp))
    assert os_error_line(alone) == (
        f"Permission denied: {str(target)!r} (rerun with --debug for the traceback)"
    )
    # End to end: the rename of convert's atomic write fails as on an immutable file.
    real_replace = os.replace

    def refuse(source: str, destination: str) -> None:
        if str(destination).endswith("m.safetensors"):
            raise PermissionError(1, "Operation not permitted", str(source), None, destination)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", refuse)
    small = ["--input-size", "16", "--num-classes", "3"]
    result = CliRunner().invoke(cli, ["convert", "ibnify:digits_resnet", "-o", str(target), *small])
    assert result.exit_code == 1 and ".tmp" not in result.output
    assert result.output.splitlines()[-1] == (
        f"error: output {str(target)!r} is not writable (operation not permitted)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_adapt_checks_its_options_before_importing_torch(tmp_path: Path) -> None:
    """A bad --prior or a taken output is refused before torch (or any model) loads."""
    code = (
        "import sys; from click.testing import CliRunner; from ibnify.cli import cli; "
        f"r = CliRunner().invoke(cli, ['adapt', 'no.safetensors', '--data', {str(tmp_path)!r}, "
        "'-o', 'x.safetensors', '--prior', '2']); "
        "print(r.exit_code, r.output.strip(), 'torch' in sys.modules)"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "1 error: prior must be between 0 and 1, got '2' False"


def test_adapt_refuses_a_taken_output_before_reading_the_checkpoint(tmp_path: Path) -> None:
    taken = tmp_path / "a.safetensors"
    taken.write_bytes(b"old")
    missing = tmp_path / "no.safetensors"
    with pytest.raises(ibnify.IbnifyError, match="already exists; pass `force=True`"):
        adapt_files(AdaptFiles(missing, tmp_path, taken))
    with pytest.raises(ibnify.IbnifyError, match=r"is not a \.safetensors file name"):
        adapt_files(AdaptFiles(missing, tmp_path, tmp_path / "a.pt"))
    assert taken.read_bytes() == b"old"
