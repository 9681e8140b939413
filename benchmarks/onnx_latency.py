"""Latency of torchvision resnet50 vs its IBN conversions, per fold form and export profile.

Usage: python benchmarks/onnx_latency.py [--runs 40] [--runs-batch8 12] [--threads 2]
Writes the `onnx_latency` section of benchmarks/RESULTS.md from one run. Targets: exported
IBN-a / exported resnet50 ≤ 1.05 in onnxruntime, ≤ 1.02 in OpenVINO. All models are timed
interleaved in one process with onnxruntime's thread spinning off and the order rotating every
run; the ratio is the median of per-run ratios. onnxruntime's profiler cross-checks it (kernel
time per model, op types by extra time). Models are random-init with randomised BN statistics
and affine (standing in for trained ones, so folding is not trivial); the fp16 profile is also
checked on real images: the digits test set through a digits model trained here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ibnify
from benchmarks._results import machine_line, update_section
from benchmarks._timing import ratio_cells, time_batches
from ibnify.data.digits import digits_data
from ibnify.data.images import Normalize
from ibnify.deploy.bench import BenchReport, kernel_profile
from ibnify.deploy.export import export_onnx
from ibnify.deploy.ort import open_session
from ibnify.deploy.verify import verify_onnx
from ibnify.models.registry import build_model
from ibnify.train.config import FinetuneConfig
from ibnify.train.loop import finetune
from tests.helpers import randomize_norms

TARGET_ORT, TARGET_OPENVINO = 1.05, 1.02
# name -> (source model, export keyword arguments)
VARIANTS = {
    "IBN-a": ("a", {}),
    "resnet50": ("base", {}),
    "IBN-a concat": ("a", {"fold_form": "concat"}),
    "IBN-a split": ("a", {"fold_form": "split"}),
    "IBN-a portable": ("a", {"profile": "portable"}),
    "IBN-a fp16": ("a", {"profile": "fp16"}),
    "IBN-b": ("b", {}),
}
DESCRIPTION = {
    "resnet50": "torchvision resnet50, exported by ibnify",
    "IBN-a": "`ibnify export` default: profile default, `--fold-form auto` (split at ≥ 28×28)",
    "IBN-a concat": "`--fold-form concat`: every site conv-split + Concat",
    "IBN-a split": "`--fold-form split`: every site's next conv split by input channels, no Concat",
    "IBN-a portable": "`--profile portable`: IN as ReduceMean/Sub/Mul/Sqrt/Div",
    "IBN-a fp16": "`--profile fp16`: float16 except InstanceNormalization (CPU onnxruntime has "
    "few fp16 kernels, so this profile is for GPU/NPU engines; timed here for completeness)",
    "IBN-b": "`ibnify export` default (IBN-b has no BN half to fold)",
}


def export_all(directory: Path) -> tuple[dict[str, Path], dict[str, nn.Module]]:
    """Export every variant; return their files and the PyTorch models they came from."""
    torch.manual_seed(0)
    sources = {
        "base": randomize_norms(torchvision.models.resnet50()).eval(),
        "a": randomize_norms(ibnify.convert("resnet50", layout="a"), seed=1).eval(),
        "b": randomize_norms(ibnify.convert("resnet50", layout="b"), seed=2).eval(),
    }
    files, models = {}, {}
    for name, (source, options) in VARIANTS.items():
        files[name] = directory / f"{name.replace(' ', '_')}.onnx"
        models[name] = sources[source]
        export_onnx(sources[source], files[name], **options)
    return files, models


def check_numerics(files: dict[str, Path], models: dict[str, nn.Module]) -> dict[str, str]:
    """Verify each file against PyTorch (its profile's tolerance); portable vs default ORT."""
    cells = {}
    for name in VARIANTS:
        report = verify_onnx(files[name], models[name], batch_sizes=(1, 8))
        cells[name] = f"{report.max_abs:.1e}"
        print(f"{name}: max abs error vs PyTorch {report.max_abs:.2g} (atol {report.atol:g})")
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224), dtype=np.float32)
    outputs = {}
    for name in ("IBN-a", "IBN-a portable"):
        session = open_session(files[name])
        outputs[name] = session.run(None, {session.get_inputs()[0].name: x})[0]
    gap = float(np.abs(outputs["IBN-a portable"] - outputs["IBN-a"]).max())
    scale = float(np.abs(outputs["IBN-a"]).max())
    cells["portable_vs_default"] = f"{gap:.1e} (largest output {scale:.2g})"
    with torch.no_grad():
        ref = models["IBN-a fp16"](torch.from_numpy(x)).numpy()
    session = open_session(files["IBN-a fp16"])
    half = session.run(None, {session.get_inputs()[0].name: x})[0]
    cells["fp16_rel"] = f"{float(np.abs(half - ref).max() / np.abs(ref).max()):.1e}"
    return cells


def digits_fp16(directory: Path, epochs: int) -> str:
    """Train a digits IBN-a model, export default + fp16, compare top-1 on the test set."""
    torch.manual_seed(0)
    train, test = digits_data("train", seed=0), digits_data("test", seed=0)
    model, _ = build_model("ibnify:digits_resnet")
    config = FinetuneConfig(epochs=epochs, lr=0.1, batch_size=64, seed=0, quiet=True, device="cpu")
    finetune(model, train, config)
    ibn = ibnify.convert(model, layout="a", stages=(1, 2), arch="ibnify:digits_resnet")
    finetune(ibn, train, FinetuneConfig(epochs=1, lr=0.02, seed=1, quiet=True, device="cpu"))
    ibn.eval()
    images = torch.stack([test.dataset[i][0] for i in range(len(test))])
    labels = np.array([test.dataset[i][1] for i in range(len(test))])
    inputs = Normalize(test.mean, test.std)(images)
    with torch.no_grad():
        logits = ibn(inputs).numpy()
    results = {}
    for profile in ("default", "fp16"):
        path = directory / f"digits_{profile}.onnx"
        export_onnx(ibn, path, input_size=(3, 16, 16), profile=profile)
        verify_onnx(path, ibn, batch_sizes=(1, 8))
        session = open_session(path)
        results[profile] = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    half = results["fp16"]
    agree = int((half.argmax(1) == logits.argmax(1)).sum())
    rel = float(np.abs(half - logits).max() / np.abs(logits).max())
    accuracy = {k: float((v.argmax(1) == labels).mean()) for k, v in results.items()}
    return (
        f"digits test set ({len(labels)} images, IBN-a digits model trained {epochs}+1 epochs "
        f"here): fp16 top-1 agrees with fp32 PyTorch on {agree}/{len(labels)}; max relative "
        f"error {rel:.1e} (max |Δlogit| / max |logit|); accuracy fp32 ONNX "
        f"{accuracy['default']:.4f}, fp16 ONNX {accuracy['fp16']:.4f}."
    )


def time_openvino(files: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """OpenVINO CPU (fp32): IBN-a (default, split, portable) vs resnet50 interleaved; rows."""
    if importlib.util.find_spec("openvino") is None:
        return ["OpenVINO is not installed (`pip install 'ibnify[openvino]'`): not measured."]
    names = ["IBN-a", "IBN-a split", "IBN-a portable", "resnet50"]
    rows = [
        "| OpenVINO | b1 median ms | b1 / resnet50 | b8 median ms | b8 / resnet50 |",
        "|---|---|---|---|---|",
    ]
    reports = time_batches({n: files[n] for n in names}, args, engine="openvino")
    rows += ["| " + " | ".join([name, *ratio_cells(reports, name)]) + " |" for name in names]
    ratio = reports[1].paired_ratio("IBN-a", "resnet50")
    verdict = "meets" if ratio <= TARGET_OPENVINO else "MISSES"
    rows += [
        "",
        f"OpenVINO IBN-a / resnet50 at batch 1: {ratio:.3f} ({verdict} ≤ {TARGET_OPENVINO}).",
    ]
    return rows


def latency_rows(reports: dict[int, BenchReport], errors: dict[str, str]) -> list[str]:
    return [
        "| " + " | ".join([name, *ratio_cells(reports, name, p90=True), errors[name]]) + " |"
        for name in VARIANTS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="timed runs at batch 1")
    parser.add_argument("--runs-batch8", type=int, default=12, help="timed runs at batch 8")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--digits-epochs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        digits = digits_fp16(Path(tmp), args.digits_epochs)
        print(digits)
        files, models = export_all(Path(tmp))
        errors = check_numerics(files, models)
        reports = time_batches(files, args)
        profiled = ["IBN-a", "IBN-a concat", "IBN-a split", "resnet50"]
        kernels = kernel_profile(
            [files[n] for n in profiled],
            threads=args.threads,
            runs=args.profile_runs,
            names=profiled,
        )
        print(kernels.summary())
        openvino_rows = time_openvino(files, args)
    load = f"{load_before} before and {', '.join(f'{v:.1f}' for v in os.getloadavg())}"
    write_section(args, load, reports, errors, kernels.summary(), openvino_rows, digits)


def write_section(
    args: argparse.Namespace,
    load: str,
    reports: dict[int, BenchReport],
    errors: dict[str, str],
    kernels: str,
    openvino_rows: list[str],
    digits: str,
) -> None:
    """Rewrite the `onnx_latency` section of RESULTS.md from this run's figures."""
    verdicts = []
    for batch in (1, 8):
        ratio = reports[batch].paired_ratio("IBN-a", "resnet50")
        verdict = "meets" if ratio <= TARGET_ORT else "MISSES"
        verdicts.append(f"batch {batch}: {ratio:.3f} ({verdict} ≤ {TARGET_ORT})")
    command = (
        f"python benchmarks/onnx_latency.py --runs {args.runs} --runs-batch8 {args.runs_batch8} "
        f"--warmup {args.warmup} --threads {args.threads} --profile-runs {args.profile_runs} "
        f"--digits-epochs {args.digits_epochs}"
    )
    markdown = [
        "## ONNX latency (onnxruntime and OpenVINO CPU, resnet50 vs its IBN conversions)",
        "",
        f"`{command}` on {machine_line()}; load average {load}",
        "after the run (a shared machine: absolute times are inflated and noisy, ratios are what",
        f"count). onnxruntime {onnxruntime.__version__}, {args.threads} intra-op threads, "
        "224×224, default graph optimizations, **thread spinning off** (interleaved sessions",
        "otherwise steal each other's cores). The models are timed interleaved in one process,",
        "the order rotating every run; ratio = median over runs of (model / resnet50) within one",
        "run. Max abs error: onnxruntime vs PyTorch at batch 1 and 8 (random normal input,",
        "randomised BN statistics), within each profile's tolerance.",
        "",
        "| model | b1 median ms | b1 p90 ms | b1 / resnet50 | b8 median ms | b8 p90 ms "
        "| b8 / resnet50 | max abs err |",
        "|---|---|---|---|---|---|---|---|",
        *latency_rows(reports, errors),
        "",
        f"onnxruntime IBN-a / resnet50: {'; '.join(verdicts)}.",
        "",
        "Cross-check with onnxruntime's profiler (batch 1, the same models interleaved, sum of",
        "kernel times per run; extra ms by op type against resnet50):",
        "",
        "```",
        kernels,
        "```",
        "",
        *openvino_rows,
        "",
        f"Profiles: portable vs default in onnxruntime, max abs difference "
        f"{errors['portable_vs_default']} (batch 4); fp16 vs fp32 PyTorch on "
        f"resnet50 IBN-a: max relative error {errors['fp16_rel']}. {digits}",
        "",
        *[f"- {name}: {DESCRIPTION[name]}" for name in VARIANTS],
    ]
    update_section("onnx_latency", "\n".join(markdown))
    print("; ".join(verdicts))


if __name__ == "__main__":
    main()
