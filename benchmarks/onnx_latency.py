"""onnxruntime latency of torchvision resnet50 vs its IBN-a/IBN-b conversions, exported by ibnify.

Usage: python benchmarks/onnx_latency.py [--runs 60] [--runs-batch8 25] [--threads 2]
Writes the `onnx_latency` section of benchmarks/RESULTS.md. Target: exported IBN-a / exported
resnet50 ≤ 1.02 at batch 1 and 8. All models are timed interleaved in one process (the order
rotates every run), so the ratios are fair on a noisy machine. Models are random-init with
randomised BN statistics and affine (standing in for trained ones, so folding is not trivial).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ibnify
from benchmarks._results import machine_line, update_section
from ibnify.deploy.bench import bench_onnx
from ibnify.deploy.export import export_onnx
from ibnify.deploy.fold import fold_bn_halves
from ibnify.deploy.ort import optimized_op_types
from ibnify.deploy.verify import verify_onnx
from tests.helpers import randomize_norms

TARGET = 1.02


def export_all(directory: Path) -> tuple[dict[str, Path], dict[str, nn.Module]]:
    """Export the five variants; return their files and the PyTorch models they came from."""
    torch.manual_seed(0)
    base = randomize_norms(torchvision.models.resnet50()).eval()
    ibn_a = randomize_norms(ibnify.convert("resnet50", layout="a"), seed=1).eval()
    ibn_b = randomize_norms(ibnify.convert("resnet50", layout="b"), seed=2).eval()
    files = {name: directory / f"{name}.onnx" for name in VARIANTS}
    export_onnx(base, files["resnet50"])
    export_onnx(ibn_a, files["IBN-a"])
    export_onnx(ibn_b, files["IBN-b"])
    export_onnx(ibn_a, files["IBN-a naive"], fold=False)
    fold_only, _ = fold_bn_halves(ibn_a, split_conv=False)
    export_onnx(fold_only, files["IBN-a fold only"], fold=False)
    models = {
        "resnet50": base,
        "IBN-a": ibn_a,
        "IBN-b": ibn_b,
        "IBN-a naive": ibn_a,
        "IBN-a fold only": ibn_a,
    }
    return files, models


VARIANTS = ("IBN-a", "resnet50", "IBN-a naive", "IBN-a fold only", "IBN-b")
DESCRIPTION = {
    "resnet50": "torchvision resnet50, exported by ibnify",
    "IBN-a": "ibnify default: BN half folded, conv split, IN affine + ReLU as a depthwise conv",
    "IBN-a naive": "`--no-fold`: BN half behind the Split (reference)",
    "IBN-a fold only": "BN half folded into the conv, no conv split (reference)",
    "IBN-b": "ibnify default (IBN-b has no BN half to fold)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="timed runs at batch 1")
    parser.add_argument("--runs-batch8", type=int, default=25, help="timed runs at batch 8")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files, models = export_all(Path(tmp))
        errors = {}
        for name in VARIANTS:
            report = verify_onnx(files[name], models[name], batch_sizes=(1, 8))
            errors[name] = report.max_abs
            print(f"{name}: max abs error vs PyTorch {report.max_abs:.2g} (batch 1 and 8)")
        optimized_bn = optimized_op_types(files["IBN-a"])["BatchNormalization"]
        print(f"BatchNormalization nodes in onnxruntime's optimized IBN-a graph: {optimized_bn}")
        reports = {}
        for batch, runs in ((1, args.runs), (8, args.runs_batch8)):
            print(f"timing batch {batch}: {len(VARIANTS)} models interleaved, {runs} runs ...")
            reports[batch] = bench_onnx(
                [files[name] for name in VARIANTS],
                batch=batch,
                threads=args.threads,
                warmup=args.warmup,
                runs=runs,
                names=VARIANTS,
            )
            print(reports[batch])
    rows = []
    for name in VARIANTS:
        cells = [name]
        for batch in (1, 8):
            report = reports[batch]
            timing = next(t for t in report.timings if t.name == name)
            base = next(t for t in report.timings if t.name == "resnet50")
            cells += [
                f"{timing.median_ms:.1f}",
                f"{timing.p90_ms:.1f}",
                f"{timing.median_ms / base.median_ms:.3f}",
                f"{report.paired_ratio(name, 'resnet50'):.3f}",
            ]
        cells.append(f"{errors[name]:.1e}")
        rows.append("| " + " | ".join(cells) + " |")
    verdicts = []
    for batch in (1, 8):
        ratio = reports[batch].ratio("resnet50")
        paired = reports[batch].paired_ratio("IBN-a", "resnet50")
        verdict = "meets" if ratio <= TARGET else "MISSES"
        verdicts.append(f"batch {batch}: {ratio:.3f} (per-run {paired:.3f}; {verdict} ≤ {TARGET})")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    command = (
        f"python benchmarks/onnx_latency.py --runs {args.runs} --runs-batch8 {args.runs_batch8} "
        f"--warmup {args.warmup} --threads {args.threads}"
    )
    markdown = [
        "## ONNX latency (onnxruntime CPU, resnet50 vs its IBN conversions)",
        "",
        f"`{command}` on {machine_line()}; load average {load} during the run (a shared",
        "machine: absolute times are inflated and noisy, ratios are what count).",
        f"onnxruntime {ort_version()}, {args.threads} intra-op threads, 224×224, default graph",
        "optimizations; the five models are timed interleaved in one process (order rotates each",
        "run). Ratio = median / median of resnet50 in the same run; per-run = median over runs of",
        "the two latencies' ratio within one run. Max abs error: onnxruntime vs",
        "PyTorch at batch 1 and 8 (random normal input, randomised BN statistics).",
        "",
        "| model | b1 median ms | b1 p90 ms | b1 ratio | b1 per-run | b8 median ms | b8 p90 ms "
        "| b8 ratio | b8 per-run | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"IBN-a / resnet50: {'; '.join(verdicts)}. BatchNormalization nodes left in onnxruntime's "
        f"optimized IBN-a graph: {optimized_bn}.",
        "",
        *[f"- {name}: {DESCRIPTION[name]}" for name in VARIANTS],
    ]
    update_section("onnx_latency", "\n".join(markdown))
    print("; ".join(verdicts))


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
