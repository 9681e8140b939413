"""Issue 16/17 deploy seams: ``ExportOptions``, the opset range checked before any export, a
verify table that shows the tested criterion, the vacuous-pass warning, bench without a stray
``timing`` line."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.onnx import _constants as onnx_constants

import ibnify
from ibnify.cli import cli
from ibnify.constants import ONNX_OPSETS
from ibnify.deploy.export import ExportOptions, export_onnx, read_onnx_metadata
from ibnify.deploy.verify import verify_onnx
from ibnify.errors import ExportError
from tests.helpers import randomize_norms

SIZE = (3, 16, 16)
OPSET_ERROR = (
    "opset 30 is outside the range ibnify exports (17 to 20: 17 is the first with "
    "InstanceNormalization and Split sizes as an input, 20 the newest torch's exporter writes)"
)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ibnify.convert("ibnify:digits_resnet", model_kwargs={"width": 4, "image_size": 16})
    return randomize_norms(model).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny IBN-a digits model, its ONNX file (keyword form) and checkpoint."""
    folder = tmp_path_factory.mktemp("deploy")
    model = _tiny()
    export_onnx(model, folder / "tiny.onnx", input_size=SIZE, profile="portable")
    ibnify.save(model, folder / "tiny.safetensors")
    return model, folder


def test_export_options_record_equals_keywords(exported, tmp_path) -> None:
    model, folder = exported
    options = ExportOptions(input_size=SIZE, profile="portable")
    report = export_onnx(model, tmp_path / "options.onnx", options=options)
    assert report.metadata == read_onnx_metadata(folder / "tiny.onnx")
    assert report.metadata["profile"] == "portable" and report.opset == options.opset == 18
    with pytest.raises(TypeError, match=r"^export_onnx\(\) takes options= or option keywords"):
        export_onnx(model, tmp_path / "both.onnx", options=options, opset=17)
    with pytest.raises(TypeError, match=r"^export_onnx\(\) got unknown option 'opst'; options: "):
        export_onnx(model, tmp_path / "typo.onnx", opst=17)


def test_opset_out_of_range_fails_before_torch_exports(monkeypatch, tmp_path) -> None:
    def never(*args, **kwargs):
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", never)
    chosen = ({"opset": 30, "input_size": SIZE}, {"options": ExportOptions(SIZE, opset=30)})
    for options in chosen:
        with pytest.raises(ExportError) as error:
            export_onnx(_tiny(), tmp_path / "x.onnx", **options)
        assert str(error.value) == OPSET_ERROR
    assert not (tmp_path / "x.onnx").exists()


def test_opset_range_is_torchs_torchscript_range() -> None:
    assert ONNX_OPSETS[-1] == onnx_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    assert ONNX_OPSETS[0] == 17


def test_cli_export_opset_30_is_one_line(exported, tmp_path) -> None:
    _, folder = exported
    args = ["export", str(folder / "tiny.safetensors"), "-o", str(tmp_path / "x.onnx")]
    result = CliRunner().invoke(cli, [*args, "--opset", "30"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"error: {OPSET_ERROR}"]  # the library's own line


def test_verify_table_shows_the_tested_criterion(exported) -> None:
    model, folder = exported
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layer1[0].bn1.IN.weight.mul_(1.5)
    report = verify_onnx(folder / "tiny.onnx", changed, batch_sizes=(1,), raise_on_failure=False)
    text = str(report).splitlines()
    assert text[0].endswith(
        "passes where |engine - torch| <= atol + rtol * |torch| (atol 0.0001, rtol 0.001)"
    )
    header = next(line for line in text if line.startswith("input"))
    assert header.split() == ["input", "output", "shape", "max", "abs", "err/tol", "ok"]
    row = report.rows[0]
    # err/tol is exactly the quantity the pass rule bounds by 1.
    x = torch.randn(1, *SIZE, generator=torch.Generator().manual_seed(0))
    ort_out = ibnify.deploy.ort.ort_session(folder / "tiny.onnx").run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = changed(x).double().numpy()
    diff = np.abs(ort_out[0].astype(np.float64) - ref)
    expected = float((diff / (1e-4 + 1e-3 * np.abs(ref))).max())
    assert row.max_ratio == pytest.approx(expected, rel=1e-9)
    assert row.max_ratio > 1 and not row.passed
    assert "err/tol" in report.failure_message() and "> 1" in report.failure_message()
    good = verify_onnx(folder / "tiny.onnx", model, batch_sizes=(1,))
    assert good.passed and all(r.max_ratio <= 1 for r in good.rows)
    assert good.vacuous_warning() is None and "warning:" not in str(good)


def test_verify_warns_when_outputs_are_too_small_to_test(tmp_path, caplog) -> None:
    model = _tiny()
    with torch.no_grad():  # outputs ~1e-8, as a random-init model's can be
        model.fc.weight.mul_(1e-7)
        model.fc.bias.zero_()
    path = tmp_path / "small.onnx"
    export_onnx(model, path, input_size=SIZE)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layer1[0].bn1.IN.weight.mul_(3.0)  # a different network: still passes
    with caplog.at_level(logging.WARNING, logger="ibnify.deploy.verify"):
        report = verify_onnx(path, broken, batch_sizes=(1,))
    warning = (
        "output 'output' stays within atol 0.0001 of zero, so this check would pass for any "
        "file; verify a trained model, or lower atol"
    )
    assert report.passed and report.vacuous_warning() == warning
    assert f"warning: {warning}" in str(report).splitlines()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]
    with pytest.raises(ibnify.errors.VerificationError):  # lowering atol makes it a real test
        verify_onnx(path, broken, batch_sizes=(1,), atol=1e-12)


def test_bench_prints_no_stray_timing_line(exported) -> None:
    _, folder = exported
    result = CliRunner().invoke(
        cli, ["bench", str(folder / "tiny.onnx"), "--runs", "3", "--warmup", "0"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "onnxruntime CPU, 2 threads, batch 1"
    assert lines[2] == "input 3×16×16 (recorded in the file)"  # the size it ran at, and why
    assert len(lines) == 4 and lines[3].startswith("tiny.onnx  median")
    assert not any(line.strip() == "timing" for line in lines)
