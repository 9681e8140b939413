"""export, verify and bench through the command layer (issue 23): every option refused before
the model is loaded, the ONNX recipe read through ``Recipe.from_dict``, and the input size that
verify and bench use printed with where it came from; a dynamic-size file that records none is
refused instead of being timed at 224×224."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

import ibnify
import ibnify.commands.bench
import ibnify.commands.export
import ibnify.commands.verify
import ibnify.deploy.bench
from ibnify.cli import cli
from ibnify.commands.bench import BenchFiles, bench_files
from ibnify.commands.export import ExportFiles, export_files
from ibnify.commands.verify import VerifyFiles, verify_files
from ibnify.deploy.bench import BenchOptions, _open_all
from ibnify.deploy.export import ExportOptions, export_onnx
from ibnify.deploy.verify import VerifyOptions, verify_onnx
from ibnify.errors import ExportError, IbnifyError, InvalidOptionError, VerificationError
from ibnify.models.registry import check_model_kwargs
from tests.helpers import randomize_norms

TINY = {"width": 4, "image_size": 16}


def _model(stages: tuple[int, ...] = (1, 2)) -> torch.nn.Module:
    torch.manual_seed(0)
    converted = ibnify.convert(
        "ibnify:digits_resnet", stages=stages, model_kwargs=TINY, input_size=(3, 16, 16)
    )
    return randomize_norms(converted).eval()


def _rewrite(source: Path, target: Path, **metadata: str | None) -> Path:
    """A copy of ``source`` with ``ibnify.<key>`` metadata set, or removed where None; with no
    keywords every ibnify entry is removed (a file some other tool exported)."""
    proto = onnx.load(str(source))
    entries = {p.key: p.value for p in proto.metadata_props}
    if not metadata:
        entries = {k: v for k, v in entries.items() if not k.startswith("ibnify.")}
    for key, value in metadata.items():
        entries.pop(f"ibnify.{key}", None)
        if value is not None:
            entries[f"ibnify.{key}"] = value
    del proto.metadata_props[:]
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny IBN-a checkpoint; its dynamic-size export (records 3×16×16), the same without any
    ibnify metadata, a fixed 16-px export without metadata, and a fixed 20-px export."""
    root = tmp_path_factory.mktemp("deploy_commands")
    model = _model()
    paths = {"checkpoint": ibnify.save(model, root / "m.safetensors")}
    paths["dynamic"] = root / "dynamic.onnx"
    export_onnx(model, paths["dynamic"], input_size=16, dynamic_size=True)
    paths["bare_dynamic"] = _rewrite(paths["dynamic"], root / "bare_dynamic.onnx")
    export_onnx(model, root / "fixed16.onnx", input_size=16)
    paths["bare_fixed"] = _rewrite(root / "fixed16.onnx", root / "bare_fixed.onnx")
    paths["fixed20"] = root / "fixed20.onnx"
    export_onnx(model, paths["fixed20"], input_size=20)
    return paths


def _never_load(monkeypatch) -> None:
    """Make every command's model loader fail loudly: a refusal must come before it."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ibnify.commands.export, "load", loaded)
    monkeypatch.setattr(ibnify.commands.verify, "load", loaded)
    monkeypatch.setattr(ibnify.deploy.bench, "open_engine", loaded)


def _one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- the size verify and bench use, and where it came from --------------------------------


@pytest.mark.parametrize(
    ("key", "extra", "line"),
    [
        ("dynamic", [], "input 3×16×16 (recorded in the file)"),
        ("bare_fixed", [], "input 3×16×16 (the graph's fixed shape)"),
        ("dynamic", ["--input-size", "24"], "input 3×24×24 (--input-size)"),
        ("bare_dynamic", ["--input-size", "3,24,20"], "input 3×24×20 (--input-size)"),
    ],
)
def test_bench_prints_the_size_it_ran_at_and_where_it_came_from(files, key, extra, line) -> None:
    args = ["bench", str(files[key]), "--runs", "2", "--warmup", "0", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2] == line


def test_bench_feeds_the_size_it_names(files) -> None:
    """The printed size is the size of the inputs: 224 would be the old silent default."""
    for given, expected in (
        (None, (1, 3, 16, 16)),
        (24, (1, 3, 24, 24)),
        ("20,12", (1, 3, 20, 12)),
    ):
        _, feeds, shapes = _open_all([files["dynamic"]], BenchOptions(input_size=given), True)
        assert feeds[0]["input"].shape == expected
        assert shapes[0].size == expected[1:]


@pytest.mark.parametrize(
    ("key", "extra", "notes"),
    [
        ("dynamic", [], ["input 3×16×16 (recorded in the file)", "checking 16x16 and 32x32"]),
        ("bare_fixed", [], ["input 3×16×16 (the graph's fixed shape)"]),
        ("dynamic", ["--input-size", "24"], ["input 3×24×24 (--input-size)", "24x24 and 32x32"]),
    ],
)
def test_verify_prints_the_size_it_checked_at(files, key, extra, notes) -> None:
    args = ["verify", str(files[key]), "--against", str(files["checkpoint"]), "--batch", "1"]
    result = CliRunner().invoke(cli, [*args, *extra])
    assert result.exit_code == 0, result.output
    said = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert said[1] == f"note: {notes[0]}"
    assert all(any(note in line for line in said) for note in notes[1:])
    assert ("spatial axes are dynamic" in result.stdout) == (key == "dynamic")


def test_a_dynamic_size_file_without_a_recorded_size_is_refused_in_one_line(
    files, monkeypatch
) -> None:
    path = str(files["bare_dynamic"])
    with pytest.raises(InvalidOptionError, match=r"records none; give .* with `input_size`$"):
        ibnify.deploy.bench.bench_onnx([path], runs=1)
    _never_load(monkeypatch)
    expected = (
        f"error: {path!r} has a dynamic input size (3×?×?, ? dynamic) and records none; give "
        "the size to run it at with --input-size"
    )
    bench = CliRunner().invoke(cli, ["bench", path, "--runs", "2"])
    assert _one_line(bench, 2) == expected and bench.stdout == ""
    checkpoint = str(files["checkpoint"])
    verify = CliRunner().invoke(cli, ["verify", path, "--against", checkpoint])
    assert _one_line(verify, 2) == expected and verify.stdout == ""


def test_two_files_at_different_sizes_are_refused_unless_one_size_is_given(files) -> None:
    dynamic, fixed = str(files["dynamic"]), str(files["fixed20"])
    result = CliRunner().invoke(cli, ["bench", dynamic, "--against", fixed, "--runs", "2"])
    assert _one_line(result, 2) == (
        f"error: the files would run at different sizes ({dynamic!r} input 3×16×16 (recorded "
        f"in the file), {fixed!r} input 3×20×20 (recorded in the file)); time them at one size "
        "with --input-size (each file must accept it)"
    )
    args = ["bench", dynamic, "--against", fixed, "--runs", "2", "--warmup", "0"]
    both = CliRunner().invoke(cli, [*args, "--input-size", "20"])
    assert both.exit_code == 0, both.output
    assert both.stdout.splitlines()[2] == "input 3×20×20 (--input-size)"
    wrong = CliRunner().invoke(cli, [*args, "--input-size", "24"])
    assert _one_line(wrong, 2) == (
        f"error: --input-size 3×24×24 does not fit {fixed!r}, whose input is 3×20×20"
    )


def test_sources_are_named_per_file_where_they_differ(files) -> None:
    report = ibnify.deploy.bench.bench_onnx(
        [files["dynamic"], files["bare_fixed"]], runs=2, warmup=0, names=["d", "f"]
    )
    assert report.input_line() == (
        "input 3×16×16 (d: recorded in the file, f: the graph's fixed shape)"
    )


# --- the ONNX recipe through the one gate ----------------------------------------------------


def _recipe(path: Path) -> dict:
    proto = onnx.load(str(path))
    return json.loads(next(p.value for p in proto.metadata_props if p.key == "ibnify.recipe"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model_kwargs": {"width": 4, "image_size": 16, "checkpoint_path": "/etc/passwd"}},
            "refusing model_kwargs key 'checkpoint_path': it would make the model library load "
            "weights, read a file or go online (see SECURITY.md)",
        ),
        (
            {"model_kwargs": {"width": 4, "image_size": 16, "colour": 3}},
            "refusing model_kwargs key 'colour': it is not a network-shaping argument ibnify "
            "rebuilds models with (see SECURITY.md)",
        ),
        (
            {"format": "ibnify.checkpoint/9"},
            "has recipe format 'ibnify.checkpoint/9', written by ibnify",
        ),
        ({"plans": "all of them"}, "has a damaged ibnify recipe (no "),
    ],
)
def test_verify_refuses_a_forged_onnx_recipe_in_one_line_before_loading(
    files, tmp_path, monkeypatch, change, message
) -> None:
    forged = _rewrite(
        files["dynamic"],
        tmp_path / "forged.onnx",
        recipe=json.dumps(_recipe(files["dynamic"]) | change),
    )
    _never_load(monkeypatch)
    result = CliRunner().invoke(cli, ["verify", str(forged), "--against", "never.safetensors"])
    line = _one_line(result, 1)
    assert line.startswith(f"error: ONNX file {str(forged)!r}") and message in line


def test_the_python_call_takes_the_same_gate(files, tmp_path) -> None:
    recipe = _recipe(files["dynamic"])
    recipe["model_kwargs"] = {**recipe["model_kwargs"], "pretrained_cfg_overlay": {}}
    forged = _rewrite(files["dynamic"], tmp_path / "forged.onnx", recipe=json.dumps(recipe))
    with pytest.raises(VerificationError, match="refusing model_kwargs key 'pretrained_cfg_ov"):
        verify_onnx(forged, _model(), batch_sizes=(1,), check_kwargs=check_model_kwargs)


def test_a_recipe_that_is_not_json_is_one_line_in_python_too(files, tmp_path) -> None:
    broken = _rewrite(files["dynamic"], tmp_path / "broken.onnx", recipe="{not json")
    with pytest.raises(VerificationError) as raised:
        verify_onnx(broken, _model(), batch_sizes=(1,))
    assert str(raised.value) == (
        f"ONNX file {str(broken)!r} has a damaged ibnify recipe (not JSON)"
    )
    wrong = _rewrite(files["dynamic"], tmp_path / "wrong.onnx", input_size="16")
    with pytest.raises(VerificationError, match=r"records input_size '16', not C,H,W$"):
        verify_onnx(wrong, _model(), batch_sizes=(1,))


def test_files_from_before_the_whole_recipe_still_verify(files, tmp_path) -> None:
    """Files written before ``ibnify.recipe`` carry the last plan and its source: read as the
    single-plan recipe format, compared on that plan, as before."""
    old = _rewrite(files["dynamic"], tmp_path / "old.onnx", recipe=None)
    assert "ibnify.plan" in {p.key for p in onnx.load(str(old)).metadata_props}
    assert verify_onnx(old, _model(), batch_sizes=(1,)).passed
    with pytest.raises(VerificationError, match=r"\(layout resnet-a, stages 1\); the conversion"):
        verify_onnx(old, _model(stages=(1,)), batch_sizes=(1,))
    plan = json.loads(
        next(p.value for p in onnx.load(str(old)).metadata_props if p.key == "ibnify.plan")
    )
    forged = _rewrite(old, tmp_path / "old_forged.onnx", plan=json.dumps(plan | {"stages": "x"}))
    with pytest.raises(VerificationError, match=r"has a damaged ibnify recipe \("):
        verify_onnx(forged, _model(), batch_sizes=(1,))


# --- every check() refusal comes before the model ---------------------------------------------


def test_export_refuses_every_option_before_loading(files, tmp_path, monkeypatch) -> None:
    _never_load(monkeypatch)
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"old")
    checkpoint = files["checkpoint"]
    cases = [
        (
            ExportFiles(checkpoint, tmp_path / "a.onnx", ExportOptions(opset=30)),
            ExportError,
            "opset 30",
        ),
        (
            ExportFiles(checkpoint, tmp_path / "a.onnx", ExportOptions(profile="int8")),
            ExportError,
            "export profile 'int8' is not one of default, fp16, portable",
        ),
        (
            ExportFiles(checkpoint, tmp_path / "a.onnx", ExportOptions(input_size="3,y")),
            InvalidOptionError,
            "'3,y' is not a size like 224 or 3,224,224",
        ),
        (ExportFiles(checkpoint, taken), IbnifyError, "already exists; pass `force=True`"),
        (ExportFiles(checkpoint, tmp_path / "a.pt"), IbnifyError, "does not end in .onnx"),
        (ExportFiles(checkpoint, "/proc/a.onnx"), IbnifyError, "'/proc' is not writable"),
    ]
    for record, kind, message in cases:
        with pytest.raises(kind, match=re.escape(message)):
            export_files(record)
    assert taken.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "taken.onnx"
    ]


def test_export_refuses_another_channel_count_before_exporting(
    files, tmp_path, monkeypatch
) -> None:
    def never(*args, **kwargs):
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", never)
    out = tmp_path / "m.onnx"
    args = ["export", str(files["checkpoint"]), "-o", str(out), "--input-size", "1,16,16"]
    assert _one_line(CliRunner().invoke(cli, args), 1) == (
        "error: --input-size 1×16×16 has 1 channel, but the model was converted for 3-channel "
        "images (3×16×16)"
    )
    assert not out.exists()


def test_verify_and_bench_refuse_every_option_before_loading(files, tmp_path, monkeypatch) -> None:
    _never_load(monkeypatch)
    fixed = files["bare_fixed"]
    verify_cases = [
        (VerifyOptions(batch_sizes=(0,)), InvalidOptionError, "`batch_sizes` must be whole"),
        (VerifyOptions(atol=-1.0), InvalidOptionError, "`atol` must be a number ≥ 0, got -1.0"),
        (VerifyOptions(engine="tvm"), InvalidOptionError, "`engine` 'tvm' is not one of"),
        (VerifyOptions(images=tmp_path / "no"), InvalidOptionError, "`images` folder"),
        (VerifyOptions(input_size=24), InvalidOptionError, "3×24×24 does not fit"),
    ]
    for options, kind, message in verify_cases:
        with pytest.raises(kind, match=re.escape(message)):
            verify_files(VerifyFiles(fixed, files["checkpoint"], options))
    with pytest.raises(VerificationError, match="does not exist or is not a file"):
        verify_files(VerifyFiles(tmp_path / "none.onnx", files["checkpoint"]))
    bench_cases = [
        (BenchOptions(batch=0), "`batch`, `threads` and `runs` must be ≥ 1 and `warmup` ≥ 0"),
        (BenchOptions(engine="tvm"), "`engine` 'tvm' is not one of"),
        (BenchOptions(input_size="3,24"), "3×3×24 does not fit"),
    ]
    for options, message in bench_cases:
        with pytest.raises(InvalidOptionError, match=re.escape(message)):
            bench_files(BenchFiles([fixed], options))
    # through the CLI: a usage error, the flag named
    result = CliRunner().invoke(
        cli, ["verify", str(fixed), "--against", "x.safetensors", "--input-size", "24"]
    )
    assert _one_line(result, 2) == (
        f"error: --input-size 3×24×24 does not fit {str(fixed)!r}, whose input is 3×16×16"
    )


def test_an_unconverted_checkpoint_exports_its_recipe_and_verifies_against_itself_only(
    files, tmp_path: Path
) -> None:
    """A model saved with no plan (the demo's control) records its recipe in the ONNX file, so
    verify checks the file against it and refuses a converted model's file for it."""
    torch.manual_seed(0)
    plain = ibnify.models.build_model("ibnify:digits_resnet", **TINY)[0]
    control = ibnify.save(
        randomize_norms(plain).eval(),
        tmp_path / "control.safetensors",
        source="ibnify:digits_resnet",
        model_kwargs=TINY,
    )
    path = tmp_path / "control.onnx"
    export_onnx(ibnify.load(control), path, input_size=16, dynamic_size=True)
    stored = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    recipe = json.loads(stored["ibnify.recipe"])
    assert recipe["plans"] == [] and recipe["source"] == "ibnify:digits_resnet"
    assert "ibnify.plan" not in stored and stored["ibnify.source"] == "ibnify:digits_resnet"
    ok = CliRunner().invoke(cli, ["verify", str(path), "--against", str(control)])
    assert ok.exit_code == 0, ok.output
    assert "input 3×16×16 (recorded in the file)" in ok.output
    mixed = CliRunner().invoke(cli, ["verify", str(files["dynamic"]), "--against", str(control)])
    assert "the conversion differs" in _one_line(mixed, 1)
    other = CliRunner().invoke(cli, ["verify", str(path), "--against", str(files["checkpoint"])])
    assert "the conversion differs" in _one_line(other, 1)
