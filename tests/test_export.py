"""ONNX export: BN-half folding, onnxruntime numerics, op hygiene, export/verify/bench CLI."""

from __future__ import annotations

import copy
import json
import logging

import onnx
import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

import ibnify
from ibnify.cli import cli
from ibnify.core.layers import IBN
from ibnify.deploy.bench import bench_onnx
from ibnify.deploy.export import export_onnx
from ibnify.deploy.fold import FoldedIBN, SplitConvIBN, fold_bn_halves
from ibnify.deploy.ort import optimized_op_types
from ibnify.deploy.verify import verify_onnx
from ibnify.errors import VerificationError
from tests.helpers import randomize_norms

SIZE = 64  # small but valid for every model here (ResNet/DenseNet stride 32 → 2×2)


_MODELS: dict[tuple[str, str], nn.Module] = {}


def _model(name: str, layout: str = "a") -> nn.Module:
    key = (name, layout)
    if key not in _MODELS:
        torch.manual_seed(0)
        converted = ibnify.convert(name, layout=layout, input_size=(3, SIZE, SIZE))
        _MODELS[key] = randomize_norms(converted).eval()
    return _MODELS[key]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("split_conv", [False, True])
def test_folding_preserves_output_and_leaves_model_alone(split_conv: bool) -> None:
    model = _model("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold_bn_halves(model, split_conv=split_conv)
    assert model.training, "the caller's model keeps its mode"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sum(isinstance(m, IBN) for m in model.modules()) == 6
    assert len(report.folded) == 6 and not report.unfolded
    assert report.folded[0] == ("layer1.0.bn1", "layer1.0.conv1")
    assert not any(isinstance(m, IBN) for m in folded.modules()), "no BN half survives"
    kind = SplitConvIBN if split_conv else FoldedIBN
    assert sum(isinstance(m, kind) for m in folded.modules()) == 6
    model.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert _max_rel(got, expected) <= 1e-5


class _SharedConv(nn.Module):
    """The conv output feeds the IBN and a skip: its channels cannot be rescaled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = IBN(8)
        self.act = nn.ReLU()
        self.post = IBN(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.act(self.norm(y)) + y
        return self.post(z)


class _BnFirst(nn.Module):
    """Conv → IBN with BN on the first channels (DenseNet order), odd split → ReLU → conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1, bias=True)
        self.norm = IBN(10, ratio=0.4, order="bn_first")
        self.conv2 = nn.Conv2d(10, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(nn.functional.relu(self.norm(self.conv1(x))))


def test_bn_first_site_with_conv_bias_folds_exactly() -> None:
    model = randomize_norms(_BnFirst()).eval()
    folded, report = fold_bn_halves(model)
    assert report.folded == [("norm", "conv1")] and report.split == ["norm"]
    split = next(m for m in folded.modules() if isinstance(m, SplitConvIBN))
    assert split.conv_bn.out_channels == 6 and split.conv_in.out_channels == 4
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert _max_rel(folded(x), model(x)) <= 1e-5


def test_unfoldable_sites_are_reported_and_still_exact(tmp_path, caplog) -> None:
    model = randomize_norms(_SharedConv()).eval()
    folded, report = fold_bn_halves(model)
    reasons = dict(report.unfolded)
    assert set(reasons) == {"norm", "post"} and not report.folded
    assert "also feeds" in reasons["norm"]
    assert "not from a Conv2d" in reasons["post"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-6)
    with caplog.at_level(logging.WARNING, logger="ibnify.deploy.fold"):
        result = export_onnx(model, tmp_path / "shared.onnx", input_size=16)
    assert "exported unfolded" in caplog.text
    assert result.op_types["BatchNormalization"] == 2  # both BN halves kept, as reported
    verify_onnx(tmp_path / "shared.onnx", model, batch_sizes=(1, 2))


@pytest.mark.parametrize(
    ("name", "layout", "instance_norms"),
    [
        ("resnet18", "a", 6),
        ("resnet18", "b", 3),
        ("resnet50", "a", 13),
        ("resnet50", "b", 3),
        ("densenet121", "a", 14),
    ],
)
def test_export_matches_pytorch_from_one_dynamic_file(
    onnx_dir, caplog, name: str, layout: str, instance_norms: int
) -> None:
    model = _model(name, layout)
    path = onnx_dir / f"{name}_{layout}.onnx"
    with caplog.at_level(logging.DEBUG, logger="ibnify.deploy.fold"):
        report = export_onnx(model, path, input_size=SIZE)
    assert report.input_shape == ("batch", 3, SIZE, SIZE)
    sites = sum(isinstance(m, IBN) for m in model.modules())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if name == "densenet121":  # norm1 follows the dense block's Concat: nothing to fold into
        assert len(report.fold.unfolded) == sites == 14 and not report.fold.folded
        # One summary warning naming torch.cat; the per-site lines only at debug level.
        reason = "its input comes from torch.cat, not from a Conv2d"
        assert warnings == [f"14 IBN sites exported unfolded ({reason})"]
        assert str(report).splitlines()[-1] == f"  14 sites left unfolded: {reason}"
        details = report.details().splitlines()
        assert len(details) == len(str(report).splitlines()) + 14
        assert details[-1] == f"  unfolded features.denseblock3.denselayer22.norm1: {reason}"
        assert sum("exported unfolded:" in r.getMessage() for r in caplog.records) == 14
    else:
        assert not warnings
        assert len(report.fold.folded) == sites and not report.fold.unfolded
    proto = onnx.load(str(path))
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("InstanceNormalization") == instance_norms
    if name.startswith("resnet"):
        assert "BatchNormalization" not in ops, "every BN is folded (by us or the exporter)"
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            assert all(a.i == 0 for a in node.attribute if a.name == "training_mode")
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["ibnify.source"] == f"tv:{name}"
    assert metadata["ibnify.layout"] == (
        "densenet-a" if name == "densenet121" else f"resnet-{layout}"
    )
    assert metadata["ibnify.stages"] in ("1,2,3", "1,2")
    assert json.loads(metadata["ibnify.plan"])["arch"] == f"tv:{name}"
    verification = verify_onnx(path, model, batch_sizes=(1, 3))
    assert [row.case for row in verification.rows] == ["random batch 1", "random batch 3"]
    assert verification.passed and verification.max_abs <= 1e-4


@pytest.mark.parametrize(
    "name",
    ["timm:mobilenetv2_100", "timm:efficientnet_b0", "tv:mobilenet_v3_large", "tv:regnet_y_400mf"],
)
def test_generic_rule_models_export_within_tolerance(onnx_dir, name: str) -> None:
    """The generic IBN-a rule's models (norm+act layers, SE, hard-swish) match in onnxruntime."""
    model = _model(name)
    sites = sum(isinstance(m, IBN) for m in model.modules())
    assert sites > 0
    path = onnx_dir / f"{name.replace(':', '_')}.onnx"
    report = export_onnx(model, path, input_size=SIZE)
    assert len(report.fold.folded) + len(report.fold.unfolded) == sites
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("InstanceNormalization") == sites
    verification = verify_onnx(path, model, batch_sizes=(1, 3))
    assert verification.passed and verification.max_abs <= 1e-4


def test_resnet50_ibn_a_optimized_graph_has_no_batchnorm(onnx_dir) -> None:
    model = _model("resnet50", "a")
    folded = onnx_dir / "resnet50_a.onnx"
    if not folded.exists():
        export_onnx(model, folded, input_size=SIZE)
    naive = onnx_dir / "resnet50_a_naive.onnx"
    export_onnx(model, naive, input_size=SIZE, fold=False)
    assert optimized_op_types(folded)["BatchNormalization"] == 0
    # Without folding onnxruntime cannot fuse the BN behind the Split: the check is meaningful.
    assert optimized_op_types(naive)["BatchNormalization"] == 13


def test_dynamic_size_export_is_verified_at_a_second_size(tmp_path) -> None:
    model = _model("resnet18")
    path = tmp_path / "dynamic.onnx"
    report = export_onnx(model, path, input_size=SIZE, dynamic_size=True)
    assert report.input_shape == ("batch", 3, "height", "width")
    verification = verify_onnx(path, model, batch_sizes=(1, 3))
    cases = [row.case for row in verification.rows]
    assert cases == ["random batch 1", "random batch 3", "random batch 3 32x32"]
    assert verification.passed


def test_verify_raises_beyond_tolerance(onnx_dir) -> None:
    model = _model("resnet18")
    path = onnx_dir / "resnet18_a.onnx"
    if not path.exists():
        export_onnx(model, path, input_size=SIZE)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layer1[0].bn1.IN.weight.mul_(1.5)
    with pytest.raises(VerificationError, match="beyond tolerance"):
        verify_onnx(path, changed, batch_sizes=(1,))
    report = verify_onnx(path, changed, batch_sizes=(1,), raise_on_failure=False)
    assert not report.passed and "FAIL" in str(report)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """Two resnet18 IBN-a checkpoints (different seeds), a resnet34 one, and r18's ONNX."""
    root = tmp_path_factory.mktemp("cli")
    runner = CliRunner()
    files = {}
    for key, arch, seed in (
        ("r18", "resnet18", 1),
        ("r18b", "resnet18", 2),
        ("r34", "resnet34", 1),
    ):
        files[key] = root / f"{key}.safetensors"
        args = ["convert", arch, "--seed", str(seed), "-o", str(files[key]), "--input-size", "64"]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    files["onnx"] = root / "r18.onnx"
    args = ["export", str(files["r18"]), "-o", str(files["onnx"]), "--input-size", str(SIZE)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "BN halves folded: 6" in result.stdout
    return files


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_verify_passes_and_fails_with_one_line(cli_files, tmp_path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(cli_files["onnx"]), "--against", str(cli_files["r18"])])
    assert ok.exit_code == 0, ok.output
    assert "random batch 3" in ok.stdout and ok.stdout.rstrip().endswith("PASS")

    corrupt = tmp_path / "corrupt.onnx"
    data = cli_files["onnx"].read_bytes()
    corrupt.write_bytes(data[: len(data) // 3])
    args = ["verify", str(corrupt), "--against", str(cli_files["r18"])]
    assert "not a valid ONNX model" in _one_error_line(runner.invoke(cli, args))

    args = ["verify", str(cli_files["onnx"]), "--against", str(cli_files["r34"])]
    assert "was exported from tv:resnet18" in _one_error_line(runner.invoke(cli, args))

    args = ["verify", str(cli_files["onnx"]), "--against", str(cli_files["r18b"]), "--batch", "2"]
    result = runner.invoke(cli, args)
    assert "beyond tolerance" in _one_error_line(result)
    assert "NO" in result.stdout  # the per-output table is printed before the error


def test_cli_export_refuses_to_overwrite_and_static_batch(cli_files, tmp_path) -> None:
    runner = CliRunner()
    args = ["export", str(cli_files["r18"]), "-o", str(cli_files["onnx"])]
    assert "--force" in _one_error_line(runner.invoke(cli, args))
    static = tmp_path / "static.onnx"
    args = ["export", str(cli_files["r18"]), "-o", str(static), "--static-batch", "--no-fold"]
    result = runner.invoke(cli, [*args, "--input-size", "32"])
    assert result.exit_code == 0, result.output
    assert "input 1x3x32x32" in result.stdout and "BatchNormalization 6" in result.stdout
    verified = runner.invoke(cli, ["verify", str(static), "--against", str(cli_files["r18"])])
    assert verified.exit_code == 0, verified.output
    assert "static batch of 1" in verified.stdout


def test_cli_bench_prints_a_ratio(cli_files, tmp_path) -> None:
    runner = CliRunner()
    naive = tmp_path / "naive.onnx"
    export_onnx(ibnify.load(cli_files["r18"]), naive, input_size=SIZE, fold=False)
    args = ["bench", str(cli_files["onnx"]), "--against", str(naive), "--runs", "4"]
    result = runner.invoke(cli, [*args, "--warmup", "1", "--batch", "2"])
    assert result.exit_code == 0, result.output
    ratio_lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    assert len(ratio_lines) == 1 and "r18.onnx / naive.onnx" in ratio_lines[0]
    assert float(ratio_lines[0].split(": ")[1].split()[0]) > 0
    report = bench_onnx([naive, naive], batch=1, warmup=0, runs=3)
    assert len(report.timings) == 2 and all(t.runs == 3 for t in report.timings)
    assert report.ratio() == pytest.approx(
        report.timings[0].median_ms / report.timings[1].median_ms
    )


def test_cli_verify_with_real_images(cli_files, tmp_path) -> None:
    """--images adds a case on real pictures, normalised with the model's own mean/std."""
    from PIL import Image

    folder = tmp_path / "images" / "class"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(40, 50, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    result = CliRunner().invoke(
        cli,
        [
            "verify",
            str(cli_files["onnx"]),
            "--against",
            str(cli_files["r18"]),
            "--images",
            str(tmp_path / "images"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "images batch 3" in result.stdout and result.stdout.rstrip().endswith("PASS")
    # unreadable files met before 8 good ones: one line lists them, or they are left out
    (folder / "bad.png").write_bytes(b"not an image")
    (folder / "empty.jpg").write_bytes(b"")
    args = ["verify", str(cli_files["onnx"]), "--against", str(cli_files["r18"])]
    args += ["--images", str(tmp_path / "images")]
    refused = CliRunner().invoke(cli, args)
    assert (refused.exit_code, refused.stderr) == (
        1,
        f"error: 2 images in {str(tmp_path / 'images')!r} are corrupt or not images: "
        "class/bad.png, class/empty.jpg; remove them or pass --skip-bad-images to leave them "
        "out\n",
    )
    skipped = CliRunner().invoke(cli, [*args, "--skip-bad-images"])
    assert skipped.exit_code == 0, skipped.output
    assert "images batch 3" in skipped.stdout and skipped.stdout.rstrip().endswith("PASS")


@pytest.mark.parametrize("kind", ["timm_features_only", "intermediate_layer_getter"])
def test_feature_extractor_exports_one_output_per_map_and_verifies_each(
    tmp_path, kind: str
) -> None:
    """Detection/segmentation backbones: every feature map is its own named, checked output."""
    torch.manual_seed(0)
    if kind == "timm_features_only":
        base = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))
        names = ["output_0", "output_1", "output_2"]
        channels = [64, 128, 256]
    else:
        base = IntermediateLayerGetter(
            torchvision.models.resnet18(), {"layer1": "c2", "layer3": "c4"}
        )
        names, channels = ["output_c2", "output_c4"], [64, 256]
    model = randomize_norms(ibnify.convert(base, input_size=(3, SIZE, SIZE))).eval()
    path = tmp_path / f"{kind}.onnx"
    report = export_onnx(model, path, input_size=SIZE)
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == names
    for output, width in zip(proto.graph.output, channels, strict=True):
        dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
        assert dims[:2] == ["batch", width]  # every output keeps the dynamic batch axis
    assert report.metadata["outputs"] == ",".join(names)
    assert f"outputs ({len(names)} feature maps): {', '.join(names)}" in str(report)
    verification = verify_onnx(path, model, batch_sizes=(1, 2))
    assert [(row.case, row.output) for row in verification.rows] == [
        (case, name) for case in ("random batch 1", "random batch 2") for name in names
    ]
    assert verification.passed and verification.max_abs <= 1e-4
    # Against the unconverted backbone every output must be checked, and the check must fail.
    with pytest.raises(VerificationError, match="beyond tolerance"):
        verify_onnx(path, randomize_norms(base).eval(), batch_sizes=(1,))
