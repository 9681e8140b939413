"""Formulas against hand-computed cases, and CLI options that must reach the library.

Each shift on a tiny tensor with values that do and do not clip; drop and mean drop on a report
written by hand; the fold of a BN half (non-default eps, conv bias) into its conv; verify's
error figures and its pass criterion exactly at the boundary; and for plan, convert, export,
verify, bench and evaluate, every option given a non-default value and seen by the library.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ibnify.api
import ibnify.commands.bench
import ibnify.commands.evaluate
import ibnify.commands.export
import ibnify.commands.verify
import ibnify.deploy.bench
import ibnify.deploy.export
import ibnify.deploy.verify
import ibnify.evaluation
import ibnify.models.checkpoint
from ibnify.cli import cli
from ibnify.commands.inputs import InputRequest
from ibnify.core.layers import IBN
from ibnify.data.images import ImageData
from ibnify.data.shifts import SHIFTS, apply_shift
from ibnify.deploy.bench import BenchOptions
from ibnify.deploy.export import ExportOptions, _check_graph
from ibnify.deploy.fold import FoldedIBN, fold_bn_halves
from ibnify.deploy.record import SIZE_RECORDED, InputShape
from ibnify.deploy.verify import (
    RecordedMetadata,
    VerificationReport,
    VerifyOptions,
    _comparison,
    _tolerance,
)
from ibnify.errors import ExportError, VerificationError
from ibnify.evaluation import RobustnessReport
from ibnify.models.registry import check_model_kwargs

__all__: list[str] = []

pytestmark = pytest.mark.usefixtures("one_thread")

# One image, 3 channels of 2×2: values near 0, mid and near 1 so that clipping shows.
X = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]], [[0.95, 0.2], [0.6, 0.05]], [[0.0, 1.0], [0.4, 0.7]]]])
MEAN = X.mean()  # the per-image mean over C, H, W: 5.7 / 12 = 0.475
O50 = 50 / 255


def _by_hand(name: str) -> torch.Tensor:
    """Each shift written out element by element from its documented formula."""
    out = X.clone()
    for index, v in np.ndenumerate(X.numpy()):
        v, m = float(v), float(MEAN)
        channel = index[1]
        out[index] = {
            "brightness_up": min(v * 1.4, 1.0),
            "brightness_down": v * 0.5,
            "contrast_up": min(max(m + 1.5 * (v - m), 0.0), 1.0),
            "contrast_down": m + 0.5 * (v - m),
            "rgb_plus_50": min(v + O50, 1.0),
            "r_plus_50": min(v + O50, 1.0) if channel == 0 else v,
            "gamma": v**2,
        }[name]
    return out


@pytest.mark.parametrize(
    "name",
    [
        "brightness_up",
        "brightness_down",
        "contrast_up",
        "contrast_down",
        "rgb_plus_50",
        "r_plus_50",
        "gamma",
    ],
)
def test_pixel_shift_equals_its_formula_by_hand(name: str) -> None:
    torch.testing.assert_close(apply_shift(name, X), _by_hand(name), atol=1e-6, rtol=0)


def test_blur_is_a_normalised_5x5_gaussian_of_sigma_1_with_reflected_borders() -> None:
    image = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6) % 7 / 7
    image = image.expand(1, 3, 6, 6).contiguous()
    weights = [math.exp(-(d**2) / 2) for d in (-2, -1, 0, 1, 2)]
    weights = [w / sum(weights) for w in weights]
    padded = np.pad(image[0, 0].numpy().astype(np.float64), 2, mode="reflect")
    expected = np.zeros((6, 6))
    for i in range(6):
        for j in range(6):
            expected[i, j] = sum(
                weights[a] * weights[b] * padded[i + a, j + b] for a in range(5) for b in range(5)
            )
    got = apply_shift("blur", image)
    for channel in range(3):
        np.testing.assert_allclose(got[0, channel].numpy(), expected, atol=1e-6)


def test_noise_is_seeded_gaussian_of_std_0_08_clipped() -> None:
    seed, batch_index = 3, 5
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_index)
    expected = (X + torch.randn(X.shape, generator=generator) * 0.08).clamp(0.0, 1.0)
    got = apply_shift("noise", X, seed=seed, batch_index=batch_index)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert set(SHIFTS) == {
        "brightness_up",
        "brightness_down",
        "contrast_up",
        "contrast_down",
        "rgb_plus_50",
        "r_plus_50",
        "gamma",
        "blur",
        "noise",
    }, "a new shift needs its hand-computed case here"


def test_drop_and_mean_drops_by_hand() -> None:
    report = RobustnessReport(
        models=["ibn", "base"],
        shifts=["clean", "blur", "noise", "gamma"],
        accuracy={
            "ibn": {
                "clean": 0.9,
                "blur": 0.6,
                "noise": 0.75,
                "gamma": 0.95,
                "art": 0.3,
                "web": 0.8,
            },
            "base": {"clean": 0.8, "blur": 0.2, "noise": 0.8, "gamma": 0.5, "art": 0.1, "web": 0.7},
        },
        domains=["art", "web"],
    )
    assert report.drop("ibn", "blur") == pytest.approx(0.3)
    assert report.drop("ibn", "gamma") == pytest.approx(-0.05)  # better than clean: negative
    assert report.mean_drop("ibn") == pytest.approx((0.3 + 0.15 - 0.05) / 3)
    assert report.mean_drop("base") == pytest.approx((0.6 + 0.0 + 0.3) / 3)
    assert report.mean_domain_drop("ibn") == pytest.approx((0.6 + 0.1) / 2)
    assert report.mean_domain_drop("base") == pytest.approx((0.7 + 0.1) / 2)
    data = report.to_dict()
    assert data["drop"]["ibn"] == pytest.approx({"blur": 0.3, "noise": 0.15, "gamma": -0.05})
    assert data["domain_drop"]["base"] == pytest.approx({"art": 0.7, "web": 0.1})
    rows = {line.split("|")[1].strip(): line for line in report.table().splitlines()[2:]}
    assert "95.0 (+5.0)" in rows["gamma"] and "20.0 (-60.0)" in rows["blur"]
    assert [c.strip() for c in rows["mean drop"].split("|")[2:4]] == ["-13.3", "-30.0"]
    assert [c.strip() for c in rows["mean domain drop"].split("|")[2:4]] == ["-35.0", "-40.0"]


class _ConvIBN(nn.Module):
    def __init__(self, order: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1, bias=True)
        self.norm = IBN(10, ratio=0.4, order=order, eps=0.05)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


@pytest.mark.parametrize("order", ["in_first", "bn_first"])
def test_fold_scales_the_bn_channels_of_the_conv_by_the_formula(order: str) -> None:
    torch.manual_seed(4)
    model = _ConvIBN(order).train()
    bn = model.norm.BN
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.2, 2.0)
    weight, bias = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    folded, report = fold_bn_halves(model, split_conv=False)
    assert report.folded == [("norm", "conv")] and model.training
    assert torch.equal(model.conv.weight, weight), "the caller's conv is untouched"
    assert isinstance(folded.norm, FoldedIBN) and not folded.training
    bns, ins = model.norm.bn_slice(), model.norm.in_slice()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + 0.05)
    new_w, new_b = folded.conv.weight.double(), folded.conv.bias.double()
    torch.testing.assert_close(
        new_w[bns], weight[bns].double() * scale.view(-1, 1, 1, 1), atol=1e-6, rtol=1e-6
    )
    expected_bias = (bias[bns].double() - bn.running_mean.double()) * scale + bn.bias.double()
    torch.testing.assert_close(new_b[bns], expected_bias, atol=1e-6, rtol=1e-6)
    assert torch.equal(folded.conv.weight[ins], weight[ins])
    assert torch.equal(folded.conv.bias[ins], bias[ins])
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def _row(got: list[float], want: list[float], atol: float, rtol: float):
    return _comparison(
        "c", "out", np.array(got, np.float32), np.array(want, np.float32), atol, rtol
    )


def test_verify_pass_criterion_holds_at_the_boundary_and_not_a_step_beyond() -> None:
    # allowed = atol + rtol * |want| = 0.5 + 0.25 * 2 = 1.0 for want 2; 0.5 for want 0
    exact = _row([3.0, 0.25], [2.0, 0.0], atol=0.5, rtol=0.25)
    assert exact.passed and exact.max_abs == 1.0 and exact.max_ratio == 1.0
    above = float(np.nextafter(np.float32(3.0), np.float32(4.0)))
    beyond = _row([above, 0.25], [2.0, 0.0], atol=0.5, rtol=0.25)
    assert not beyond.passed and beyond.max_ratio > 1.0
    below = _row([1.5, -0.5], [2.0, 0.0], atol=0.5, rtol=0.25)  # |diff| 0.5 of 1.0; 0.5 of 0.5
    assert below.passed and below.max_abs == 0.5 and below.max_ratio == 1.0
    mixed = _row([2.4, 0.1], [2.0, 0.0], atol=0.5, rtol=0.25)  # ratios 0.4 and 0.2
    assert mixed.max_abs == pytest.approx(0.4, abs=1e-6)
    assert mixed.max_ratio == pytest.approx(0.4, abs=1e-6)
    assert not _row([float("nan"), 0.0], [2.0, 0.0], atol=0.5, rtol=0.25).passed
    assert _row([0.0, 0.0], [0.1, -0.2], atol=0.5, rtol=0.0).vacuous
    assert not _row([2.0, 0.0], [2.0, 0.0], atol=0.5, rtol=0.25).vacuous
    report = VerificationReport(path=None, atol=0.5, rtol=0.25)  # type: ignore[arg-type]
    assert not report.passed, "no checks is no pass"
    report.rows = [exact, below]
    assert report.passed and report.max_abs == 1.0
    report.rows.append(beyond)
    assert not report.passed


class _Stop(Exception):
    """Raised by a stand-in once it has recorded its call: the command need not go on."""


class _Recorder:
    """Stands in for a library function: records its arguments, then stops the command."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        raise _Stop()


def test_plan_and_convert_options_reach_the_library(monkeypatch, tmp_path) -> None:
    planned = _Recorder()
    monkeypatch.setattr(ibnify.api, "plan", planned)
    runner = CliRunner()
    options = ["--layout", "b", "--stages", "1,2", "--input-size", "3,48,40", "--num-classes", "7"]
    result = runner.invoke(cli, ["plan", "resnet34", *options, "--ratio", "0.25"])
    assert isinstance(result.exception, _Stop), result.output
    ((args, kwargs),) = planned.calls
    assert args == ("resnet34",) and kwargs["model_kwargs"] == {"num_classes": 7}
    chosen = kwargs["options"]
    assert (chosen.layout, tuple(chosen.stages), chosen.ratio, tuple(chosen.input_size)) == (
        "b",
        (1, 2),
        0.25,
        (3, 48, 40),
    )

    converting = _Recorder()
    monkeypatch.setattr(ibnify.api, "convert_named", converting)
    weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    out = tmp_path / "out.safetensors"
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", lambda s: seeds.append(s))
    result = runner.invoke(
        cli,
        ["convert", "resnet34", *options, "--weights", str(weights), "-o", str(out), "--seed", "9"],
    )
    assert isinstance(result.exception, _Stop), result.output
    ((args, kwargs),) = converting.calls
    assert args == ("resnet34",) and kwargs["weights"] == str(weights)
    assert kwargs["pretrained"] is False and kwargs["model_kwargs"] == {"num_classes": 7}
    assert (kwargs["options"].layout, tuple(kwargs["options"].stages)) == ("b", (1, 2))
    assert seeds == [9]
    result = runner.invoke(cli, ["convert", "resnet34", "--pretrained", "-o", str(out)])
    assert converting.calls[-1][1]["pretrained"] is True


def test_export_options_reach_the_library(monkeypatch, tmp_path) -> None:
    exported = _Recorder()
    monkeypatch.setattr(ibnify.commands.export, "export_files", exported)
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    result = runner.invoke(
        cli,
        [
            "export",
            "ck.safetensors",
            "-o",
            str(out),
            "--opset",
            "17",
            "--input-size",
            "3,40,48",
            "--static-batch",
            "--dynamic-size",
            "--no-fold",
            "--profile",
            "fp16",
            "--fold-form",
            "split",
            "--no-verify",
        ],
    )
    assert isinstance(result.exception, _Stop), result.output
    (((files,), kwargs),) = exported.calls
    assert kwargs == {} and (files.checkpoint, files.output) == ("ck.safetensors", str(out))
    assert files.options == ExportOptions(
        input_size=(3, 40, 48),
        opset=17,
        dynamic_batch=False,
        fold=False,
        dynamic_size=True,
        profile="fp16",
        fold_form="split",
    )
    assert (files.verify, files.force) == (False, False)
    runner.invoke(cli, ["export", "ck.safetensors", "-o", str(out), "--force"])
    files = exported.calls[-1][0][0]
    assert (files.verify, files.force) == (True, True), "verification runs unless --no-verify"
    assert files.options == ExportOptions(), "the defaults are the library's"


def test_verify_options_reach_the_library(monkeypatch, tmp_path) -> None:
    verified = _Recorder()
    runner = CliRunner()
    monkeypatch.setattr(ibnify.commands.verify, "verify_files", verified)
    monkeypatch.setattr(ibnify.commands.verify.VerifyFiles, "check", lambda self: None)
    images = tmp_path / "imgs"
    images.mkdir()
    result = runner.invoke(
        cli,
        [
            "verify",
            "m.onnx",
            "--against",
            "ck.safetensors",
            "--batch",
            "2,5",
            "--atol",
            "0.003",
            "--rtol",
            "0.02",
            "--images",
            str(images),
            "--engine",
            "onnxruntime",
            "--input-size",
            "3,40,48",
        ],
    )
    assert isinstance(result.exception, _Stop), result.output
    (((files,), kwargs),) = verified.calls
    assert kwargs == {} and (files.onnx_file, files.against) == ("m.onnx", "ck.safetensors")
    assert files.options == VerifyOptions(
        batch_sizes=(2, 5),
        atol=0.003,
        rtol=0.02,
        images=str(images),
        raise_on_failure=False,
        engine="onnxruntime",
        input_size="3,40,48",
    )
    assert files.chosen.check_kwargs is check_model_kwargs  # the gate ibnify.load uses


def test_bench_options_reach_the_library(monkeypatch) -> None:
    runner = CliRunner()
    benched, bench_files = _Recorder(), ibnify.commands.bench.bench_files
    monkeypatch.setattr(ibnify.commands.bench, "bench_files", benched)
    monkeypatch.setattr(ibnify.commands.bench.BenchFiles, "check", lambda self: None)
    result = runner.invoke(
        cli,
        [
            "bench",
            "a.onnx",
            "--against",
            "b.onnx",
            "--threads",
            "3",
            "--batch",
            "4",
            "--warmup",
            "2",
            "--runs",
            "7",
            "--input-size",
            "32",
        ],
    )
    assert isinstance(result.exception, _Stop), result.output
    (((files, _progress), kwargs),) = benched.calls
    assert kwargs == {} and files.paths == ["a.onnx", "b.onnx"] and not files.kernels
    assert files.options == BenchOptions(
        batch=4, threads=3, warmup=2, runs=7, engine="onnxruntime", input_size="32"
    )
    args = ["bench", "a.onnx", "--threads", "3", "--batch", "4", "--runs", "30", "--kernels"]
    assert isinstance(runner.invoke(cli, args).exception, _Stop)
    files = benched.calls[-1][0][0]
    assert files.kernels and files.options == BenchOptions(batch=4, threads=3, runs=30)
    # the kernel profile runs at most 20 times, at the size the timing used
    profiled = _Recorder()
    monkeypatch.setattr(ibnify.commands.bench, "bench_onnx", lambda *a, **k: "timed")
    monkeypatch.setattr(ibnify.commands.bench, "kernel_profile", profiled)
    with pytest.raises(_Stop):
        bench_files(files)
    assert profiled.calls == [
        ((["a.onnx"],), {"batch": 4, "threads": 3, "runs": 20, "input_size": None})
    ]


def test_evaluate_options_reach_the_library(monkeypatch, tmp_path) -> None:
    evaluated = _Recorder()
    monkeypatch.setattr(ibnify.commands.evaluate, "evaluate_files", evaluated)
    folder = tmp_path / "data"
    folder.mkdir()
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "a.safetensors",
            "b.safetensors",
            "--data",
            str(folder),
            "--domain",
            f"art={folder}",
            "--shift",
            "blur,noise",
            "--input-size",
            "3,40,40",
            "--batch-size",
            "5",
            "--workers",
            "1",
            "--seed",
            "4",
        ],
    )
    assert isinstance(result.exception, _Stop), result.output
    (((run,), kwargs),) = evaluated.calls
    assert kwargs == {} and run.checkpoints == ("a.safetensors", "b.safetensors")
    assert run.inputs == InputRequest(str(folder), None, (3, 40, 40))
    assert (run.chosen_shifts, run.batch_size, run.seed, run.workers) == ("blur,noise", 5, 4, 1)
    assert run.domains == (f"art={folder}",)
    CliRunner().invoke(cli, ["evaluate", "a.safetensors", "--dataset", "digits"])
    assert evaluated.calls[-1][0][0].inputs.dataset == "digits"
    assert evaluated.calls[-1][0][0].chosen_shifts == "all"


def _snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    """Each submodule's train flag, each parameter's requires_grad, and every tensor's value."""
    return (
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _same(model: nn.Module, snapshot: tuple[dict, dict, dict]) -> bool:
    modes, grads, state = snapshot
    now = _snapshot(model)
    return (
        now[0] == modes
        and now[1] == grads
        and now[2].keys() == state.keys()
        and all(torch.equal(v, now[2][k]) for k, v in state.items())
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, tuple[dict, dict, dict], Path]:
    """A converted resnet18 in train mode with a frozen (eval, no grad) first stage, a
    snapshot of it taken before it was exported, and the exported file."""
    model = ibnify.convert("resnet18", input_size=(3, 32, 32), model_kwargs={"num_classes": 4})
    model.train()
    model.layer1.eval().requires_grad_(False)
    model.layer2[0].bn2.eval()
    snapshot = _snapshot(model)
    path = tmp_path_factory.mktemp("export") / "m.onnx"
    ibnify.deploy.export.export_onnx(model, path, input_size=32)
    return model, snapshot, path


def test_export_evaluate_and_fold_leave_the_model_and_each_modules_mode_alone(exported) -> None:
    model, snapshot, _ = exported
    assert _same(model, snapshot), "export_onnx"
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = ImageData(
        torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2, 3, 0, 1])),
        (0.5,) * 3,
        (0.25,) * 3,
    )
    ibnify.evaluation.evaluate({"m": model}, data, shifts="blur,noise", batch_size=4)
    assert _same(model, snapshot), "evaluate"
    fold_bn_halves(model, input_size=(3, 32, 32))
    assert _same(model, snapshot), "fold_bn_halves"


def test_verify_tolerance_is_the_recorded_profiles_unless_given() -> None:
    fp16 = RecordedMetadata(profile="fp16")
    assert _tolerance(fp16, None, None) == (5e-2, 1e-2, "fp16")
    assert _tolerance(fp16, 0.3, None) == (0.3, 1e-2, "fp16")
    assert _tolerance(fp16, None, 0.0) == (5e-2, 0.0, "fp16")
    assert _tolerance(RecordedMetadata(), None, None) == (1e-4, 1e-3, "default")


def test_export_refuses_a_graph_without_instance_norm_or_with_training_batchnorm() -> None:
    def graph(*nodes: onnx.NodeProto) -> onnx.ModelProto:
        io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
        return onnx.helper.make_model(onnx.helper.make_graph(list(nodes), "g", io[:1], io[1:]))

    relu = onnx.helper.make_node("Relu", ["x"], ["y"])
    _check_graph(graph(relu), expect_instance_norm=False)
    with pytest.raises(ExportError, match="holds no InstanceNormalization"):
        _check_graph(graph(relu), expect_instance_norm=True)
    inputs = ["x", "s", "b", "m", "v"]
    for mode, fails in ((0, False), (1, True)):
        bn = onnx.helper.make_node("BatchNormalization", inputs, ["y"], "bn", training_mode=mode)
        if fails:
            with pytest.raises(ExportError, match="'bn' with training_mode=1"):
                _check_graph(graph(bn), expect_instance_norm=False)
        else:
            _check_graph(graph(bn), expect_instance_norm=False)


def test_verify_refuses_a_file_of_the_same_source_converted_otherwise(exported) -> None:
    model, _, path = exported
    kwargs = {"input_size": (3, 32, 32), "model_kwargs": {"num_classes": 4}}
    same = ibnify.convert("resnet18", **kwargs)
    same.load_state_dict(model.state_dict())
    assert ibnify.deploy.verify.verify_onnx(path, same.eval(), batch_sizes=(2,)).passed
    for options in ({"stages": (1, 2)}, {"ratio": 0.25}):
        other = ibnify.convert("resnet18", **kwargs, **options)
        with pytest.raises(VerificationError, match="the conversion differs"):
            ibnify.deploy.verify.verify_onnx(path, other.eval(), batch_sizes=(2,))


def test_evaluate_gives_each_batch_its_index_and_the_seed_and_every_model_the_same_pixels(
    monkeypatch,
) -> None:
    calls: list[tuple[str, int, int]] = []
    original = ibnify.evaluation.apply_shift

    def recording(name: str, images: torch.Tensor, seed: int = 0, batch_index: int = 0):
        calls.append((name, seed, batch_index))
        return original(name, images, seed=seed, batch_index=batch_index)

    monkeypatch.setattr(ibnify.evaluation, "apply_shift", recording)
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    class _Spy(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen[self.name].append(x.clone())
            return torch.zeros(x.shape[0], 2)

    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    data = ImageData(
        torch.utils.data.TensorDataset(images, torch.zeros(5, dtype=torch.long)),
        (0.5,) * 3,
        (0.2,) * 3,
    )
    ibnify.evaluation.evaluate({"a": _Spy("a"), "b": _Spy("b")}, data, "noise", 2, seed=7)
    assert calls == [(n, 7, b) for b in range(3) for n in ("clean", "noise")]
    assert len(seen["a"]) == 6 and all(
        torch.equal(x, y) for x, y in zip(*seen.values(), strict=True)
    )
    noisy = original("noise", images[2:4], seed=7, batch_index=1)
    torch.testing.assert_close(seen["a"][3], (noisy - 0.5) / 0.2, atol=1e-6, rtol=0)


class _FakeSession:
    """Advances a fake clock by its next duration (ms) on each run and logs the call."""

    def __init__(self, index: int, durations: list[float], clock: list[float], log: list) -> None:
        self.index, self.durations, self.clock, self.log = index, iter(durations), clock, log

    def run(self, outputs: Any, feed: dict) -> None:
        self.log.append(self.index)
        self.clock[0] += next(self.durations) / 1000.0


def _fake_bench(monkeypatch, durations: list[list[float]], **kwargs: Any):
    clock, log = [0.0], []
    sessions = [_FakeSession(i, d, clock, log) for i, d in enumerate(durations)]
    shapes = [InputShape((3, 8, 8), SIZE_RECORDED)] * len(sessions)
    monkeypatch.setattr(
        ibnify.deploy.bench, "_open_all", lambda *a: (sessions, [{}] * len(sessions), shapes)
    )
    monkeypatch.setattr(ibnify.deploy.bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    names = [f"m{i}" for i in range(len(durations))]
    return ibnify.deploy.bench.bench_onnx(names, names=names, **kwargs), log


def test_bench_drops_the_warmup_alternates_the_order_and_takes_median_p90_and_paired_ratio(
    monkeypatch,
) -> None:
    report, log = _fake_bench(
        monkeypatch, [[9, 9, 3, 4, 5, 6], [9, 9, 2, 2, 4, 8]], warmup=2, runs=4
    )
    assert log == [0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0]
    assert [(t.name, t.runs) for t in report.timings] == [("m0", 4), ("m1", 4)]
    assert list(report.samples) == ["m0", "m1"]
    assert report.samples["m0"] == pytest.approx([3, 4, 5, 6])  # the fake clock's float sums
    assert report.samples["m1"] == pytest.approx([2, 2, 4, 8])
    assert report.timings[0].median_ms == pytest.approx(4.5)
    assert report.timings[0].p90_ms == pytest.approx(5.7)  # numpy's linear interpolation
    assert report.timings[1].median_ms == pytest.approx(3.0)
    assert report.paired["m1"] == pytest.approx(1.375)  # median of 1.5, 2, 1.25, 0.75
    assert report.ratio() == pytest.approx(1.5)  # ratio of medians
    assert "ratio m0 / m1: 1.375 (median of per-run ratios; ratio of medians 1.500)" in str(report)
    three, log = _fake_bench(monkeypatch, [[1] * 3, [2] * 3, [3] * 3], warmup=0, runs=3)
    assert log == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert three.paired == pytest.approx({"m1": 0.5, "m2": 1 / 3})


def test_a_failed_check_leaves_an_earlier_export_untouched_and_nothing_else(
    exported, tmp_path
) -> None:
    model = exported[0]
    path = tmp_path / "m.onnx"
    path.write_bytes(b"earlier")
    seen = []

    def failing(temp) -> None:
        seen.append(onnx.load(str(temp)).graph.input[0].name)
        raise VerificationError("beyond tolerance")

    with pytest.raises(VerificationError):
        ibnify.deploy.export.export_onnx(model, path, input_size=32, check=failing)
    assert seen == ["input"], "the check saw the finished file"
    assert path.read_bytes() == b"earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
