"""Export profiles (default, fp16, portable), the per-site fold form, honest bench, OpenVINO."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import ibnify
from ibnify.cli import cli
from ibnify.deploy.bench import bench_onnx, kernel_profile
from ibnify.deploy.export import (
    PROFILE_TOLERANCES,
    decompose_instance_norm,
    export_onnx,
    read_onnx_metadata,
)
from ibnify.deploy.fold import SplitConvIBN, SplitNextConvIBN, choose_form, fold_bn_halves
from ibnify.deploy.verify import verify_onnx
from ibnify.errors import ExportError
from tests.helpers import randomize_norms

SIZE = 64
MODELS = (("resnet18", "a"), ("resnet18", "b"), ("densenet121", "a"))
_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def _model(name: str, layout: str) -> torch.nn.Module:
    if (name, layout) not in _CACHE:
        torch.manual_seed(0)
        converted = ibnify.convert(name, layout=layout, input_size=(3, SIZE, SIZE))
        _CACHE[(name, layout)] = randomize_norms(converted).eval()
    return _CACHE[(name, layout)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every (model, profile) exported once: {(name, layout, profile): path}."""
    root = tmp_path_factory.mktemp("profiles")
    files = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared 2-core machine
    try:
        for name, layout in MODELS:
            for profile in ("default", "fp16", "portable"):
                path = root / f"{name}_{layout}_{profile}.onnx"
                export_onnx(_model(name, layout), path, input_size=SIZE, profile=profile)
                files[(name, layout, profile)] = path
    finally:
        torch.set_num_threads(threads)
    return files


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs tiny models: one torch thread (see tests/conftest.py)."""


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("profile", ["default", "fp16", "portable"])
@pytest.mark.parametrize(("name", "layout"), MODELS)
def test_each_profile_verifies_with_its_own_tolerance(exported, name, layout, profile) -> None:
    path = exported[(name, layout, profile)]
    assert read_onnx_metadata(path)["profile"] == profile
    report = verify_onnx(path, _model(name, layout), batch_sizes=(1, 3))
    assert (report.atol, report.rtol) == PROFILE_TOLERANCES[profile]
    assert report.passed and len(report.rows) == 2
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    default_ops = Counter(
        n.op_type for n in onnx.load(str(exported[(name, layout, "default")])).graph.node
    )
    sites = default_ops["InstanceNormalization"]
    assert sites == {"resnet18a": 6, "resnet18b": 3, "densenet121a": 14}[name + layout]
    if profile == "portable":
        assert ops["InstanceNormalization"] == 0 and ops["Sqrt"] == sites
        assert ops["ReduceMean"] == 2 * sites
    else:
        assert ops["InstanceNormalization"] == sites
    if profile == "fp16":
        assert report.max_abs > 1e-5, "an fp16 graph cannot match fp32 to fp32 precision"
    else:
        assert report.max_abs < 1e-4


def test_fp16_keeps_instance_norm_and_its_statistics_in_float32(exported) -> None:
    proto = onnx.load(str(exported[("resnet18", "a", "fp16")]))
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    halves = [n for n in proto.graph.node if n.op_type == "InstanceNormalization"]
    assert len(halves) == 6
    for node in halves:
        cast_in = producers[node.input[0]]
        assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == TensorProto.FLOAT
        (cast_out,) = consumers[node.output[0]]
        assert cast_out.op_type == "Cast" and cast_out.attribute[0].i == TensorProto.FLOAT16
    convs = [i for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(convs) >= 20, "the conv weights are float16"
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


@pytest.mark.parametrize(("name", "layout"), MODELS)
def test_portable_equals_default_within_1e_5(exported, name, layout) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    default = _run(exported[(name, layout, "default")], x)
    portable = _run(exported[(name, layout, "portable")], x)
    assert np.abs(portable - default).max() <= 1e-5 * max(1.0, float(np.abs(default).max()))


@pytest.mark.parametrize("opset", [17, 18])
def test_decomposed_instance_norm_matches_the_op(opset) -> None:
    rng = np.random.default_rng(1)
    scale = numpy_helper.from_array(rng.random(4, dtype=np.float32) + 0.5, "scale")
    bias = numpy_helper.from_array(rng.random(4, dtype=np.float32) - 0.5, "bias")
    node = helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-3)
    graph = helper.make_graph(
        [node],
        "in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 6])],
        [scale, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    portable = decompose_instance_norm(model)
    onnx.checker.check_model(portable)
    assert "InstanceNormalization" not in {n.op_type for n in portable.graph.node}
    x = (3 * rng.standard_normal((2, 4, 5, 6)) + 2).astype(np.float32)
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (model, portable)
    ]
    expected, got = (s.run(None, {"x": x})[0] for s in run)
    assert np.abs(got - expected).max() < 1e-5


def test_export_refuses_unknown_profile_and_form(tmp_path) -> None:
    model = _model("resnet18", "a")
    with pytest.raises(ExportError, match="profile 'int8'"):
        export_onnx(model, tmp_path / "x.onnx", input_size=SIZE, profile="int8")
    with pytest.raises(ExportError, match="fold form 'fast'"):
        export_onnx(model, tmp_path / "x.onnx", input_size=SIZE, fold_form="fast")
    with pytest.raises(ExportError, match="has 4 channels, but the model was converted for 3-ch"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(4, SIZE, SIZE))
    assert not list(tmp_path.iterdir()), "nothing written"


def test_form_rule_and_choice_are_deterministic() -> None:
    assert [choose_form(s, s) for s in (112, 56, 28, 14, 7)] == [
        "split",
        "split",
        "split",
        "concat",
        "concat",
    ]
    model = _model("resnet18", "a")
    # At 112 px resnet18's layer1 runs at 28×28 (split), layer2/3 at 14/7 (concat).
    first = fold_bn_halves(model, form="auto", input_size=(3, 112, 112))[1].forms
    second = fold_bn_halves(model, form="auto", input_size=(3, 112, 112))[1].forms
    assert first == second
    assert first == {
        "layer1.0.bn1": "split",
        "layer1.1.bn1": "split",
        "layer2.0.bn1": "concat",
        "layer2.1.bn1": "concat",
        "layer3.0.bn1": "concat",
        "layer3.1.bn1": "concat",
    }
    forced = fold_bn_halves(model, form="concat", input_size=(3, 112, 112))[1].forms
    assert set(forced.values()) == {"concat"}


@pytest.mark.parametrize("form", ["split", "concat", "auto"])
def test_every_form_keeps_the_numerics(tmp_path, form) -> None:
    model = _model("resnet18", "a")
    folded, _ = fold_bn_halves(model, form=form, input_size=(3, 112, 112))
    kinds = Counter(type(m).__name__ for m in folded.modules())
    expected = {"split": (6, 0), "concat": (0, 6), "auto": (2, 4)}[form]
    split = kinds[SplitNextConvIBN.__name__]  # each holds its SplitConvIBN head
    assert (split, kinds[SplitConvIBN.__name__] - split) == expected
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, out = model(x), folded(x)
    assert float((out - reference).abs().max() / reference.abs().max()) < 1e-5
    if form != "split":
        return  # the concat form's export is covered by tests/test_export.py
    path = tmp_path / f"{form}.onnx"
    export_onnx(model, path, input_size=112, fold_form=form)
    assert read_onnx_metadata(path)["fold_form"] == form
    assert read_onnx_metadata(path)["site_forms"] == "split:6"
    assert verify_onnx(path, model, batch_sizes=(2,)).passed
    concats = Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Concat"]
    assert concats == 6 - expected[0]


def test_bench_turns_spinning_off_when_interleaved(exported, tmp_path) -> None:
    path = exported[("resnet18", "a", "default")]
    single = bench_onnx([path], batch=1, warmup=0, runs=2)
    assert single.spinning and "spinning on" in str(single)
    pair = bench_onnx([path, path], batch=1, warmup=0, runs=4, names=["x", "y"])
    assert not pair.spinning
    assert "thread spinning off (sessions interleaved, order alternating)" in str(pair)
    ratios = np.asarray(pair.samples["x"]) / np.asarray(pair.samples["y"])
    assert pair.paired["y"] == pytest.approx(float(np.median(ratios)))
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            str(path),
            "--against",
            str(exported[("resnet18", "a", "portable")]),
            "--runs",
            "3",
            "--warmup",
            "0",
            "--kernels",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "thread spinning off" in result.stdout
    assert "onnxruntime profiler (3 runs each" in result.stdout


def test_kernel_profile_sums_per_op_type(exported) -> None:
    default = exported[("resnet18", "a", "default")]
    portable = exported[("resnet18", "a", "portable")]
    profile = kernel_profile([portable, default], runs=2, warmup=1, names=["p", "d"])
    assert profile.per_op["d"]["Conv"] > 0 and "InstanceNormalization" in profile.per_op["d"]
    assert "InstanceNormalization" not in profile.per_op["p"]
    assert "ReduceMean" in profile.per_op["p"]
    assert profile.total("d") == pytest.approx(sum(profile.per_op["d"].values()))
    extra = dict(profile.extra("p", "d", top=50))
    assert extra["InstanceNormalization"] == pytest.approx(
        -profile.per_op["d"]["InstanceNormalization"]
    )


def test_cli_export_profile_and_verify_default_tolerance(tmp_path) -> None:
    runner = CliRunner()
    checkpoint = tmp_path / "r18.safetensors"
    args = ["convert", "resnet18", "--seed", "1", "-o", str(checkpoint), "--input-size", "64"]
    assert runner.invoke(cli, args).exit_code == 0
    onnx_file = tmp_path / "r18_fp16.onnx"
    args = ["export", str(checkpoint), "-o", str(onnx_file), "--input-size", "64"]
    result = runner.invoke(cli, [*args, "--profile", "fp16", "--fold-form", "split"])
    assert result.exit_code == 0, result.output
    assert "verified in onnxruntime, profile fp16" in result.stdout
    assert read_onnx_metadata(onnx_file)["profile"] == "fp16"
    result = runner.invoke(cli, ["verify", str(onnx_file), "--against", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert "(atol 0.05, rtol 0.01)" in result.stdout and "export profile fp16" in result.stdout
    strict = ["verify", str(onnx_file), "--against", str(checkpoint), "--atol", "1e-6"]
    failed = runner.invoke(cli, [*strict, "--rtol", "1e-6"])
    assert failed.exit_code == 1 and failed.stderr.startswith("error: ")
    bad = runner.invoke(cli, [*args[:-2], "--input-size", "64", "--profile", "int8"])
    assert bad.exit_code == 2 and "int8" in bad.stderr


def test_openvino_verifies_and_benches(exported, tmp_path) -> None:
    pytest.importorskip("openvino")
    path = exported[("resnet18", "a", "default")]
    report = verify_onnx(path, _model("resnet18", "a"), batch_sizes=(1, 2), engine="openvino")
    assert report.passed and "engine openvino" in report.notes[0]
    timing = bench_onnx([path, path], batch=2, warmup=0, runs=2, engine="openvino")
    assert timing.engine == "openvino" and "openvino CPU" in str(timing)
    assert all(t.runs == 2 for t in timing.timings)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(path.read_bytes()[:5000])
    result = CliRunner().invoke(cli, ["bench", str(corrupt), "--engine", "openvino"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()  # refused before OpenVINO reads it
    assert line.startswith(f"error: {str(corrupt)!r} is not a valid ONNX model")
