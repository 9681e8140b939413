"""Cost of the two IBN-site forms (concat vs split-next-conv) in onnxruntime CPU.

Usage: python benchmarks/fold_forms.py [--runs 40] [--runs-batch8 12] [--threads 2] [--no-write]
Writes the `fold_forms` section of benchmarks/RESULTS.md (``--no-write``: prints it instead).
Part 1 exports ResNet-50 IBN-a with the split form at no site, at sites of ≥ 56×56, of
≥ 28×28 and of any size (the threshold of ``choose_form``) and times them interleaved with
resnet50. Part 2 times one ResNet-50 bottleneck head (conv 1×1 → IBN-a → ReLU → conv 3×3 →
BN → ReLU) at each resolution and width where ResNet-50 IBN-a has sites, in both forms. All
timing: spinning off, order alternating, median of per-run ratios. This is the measurement
behind ``ibnify.deploy.fold.choose_form``.
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
from benchmarks._timing import ratio_cells, time_batches
from ibnify.core.layers import IBN
from ibnify.deploy import fold
from ibnify.deploy.bench import bench_onnx
from ibnify.deploy.export import export_onnx
from ibnify.deploy.fold import choose_form
from ibnify.deploy.verify import verify_onnx
from tests.helpers import randomize_norms

# (resolution, input channels, IBN channels): the ResNet-50 IBN-a sites at 224×224.
CASES = ((56, 64, 64), (56, 256, 64), (56, 256, 128), (28, 512, 128), (28, 512, 256))
CASES += ((14, 1024, 256),)


def site(in_channels: int, channels: int) -> nn.Module:
    """conv1 → IBN → ReLU → conv2 → BN → ReLU, as in a bottleneck's head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1, bias=False),
        IBN(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


THRESHOLDS = {"concat": None, "split ≥ 56×56": 56 * 56, "split ≥ 28×28": 28 * 28, "split": 1}


def network_sweep(directory: Path, args: argparse.Namespace) -> list[str]:
    """ResNet-50 IBN-a with the split form from several resolutions up; table rows."""
    torch.manual_seed(0)
    base = randomize_norms(torchvision.models.resnet50()).eval()
    ibn = randomize_norms(ibnify.convert("resnet50", layout="a"), seed=1).eval()
    files = {}
    default = fold.SPLIT_MIN_POSITIONS
    try:
        for name, threshold in THRESHOLDS.items():
            files[name] = directory / f"r50_{threshold}.onnx"
            fold.SPLIT_MIN_POSITIONS = threshold or default
            form = "concat" if threshold is None else "auto"
            export_onnx(ibn, files[name], fold_form=form)
    finally:
        fold.SPLIT_MIN_POSITIONS = default
    files["resnet50"] = directory / "resnet50.onnx"
    export_onnx(base, files["resnet50"])
    reports = time_batches(files, args)
    return ["| " + " | ".join([name, *ratio_cells(reports, name)]) + " |" for name in THRESHOLDS]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs-batch8", type=int, default=12)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md.")
    return parser.parse_args()


def site_row(directory: Path, case: tuple[int, int, int], args: argparse.Namespace) -> str:
    """One bottleneck head (``case``: resolution, input channels, IBN channels) exported in
    both forms, verified, timed interleaved; its table row."""
    resolution, in_channels, channels = case
    torch.manual_seed(0)
    model = randomize_norms(site(in_channels, channels)).eval()
    size = (in_channels, resolution, resolution)
    files = {}
    for form in ("split", "concat"):
        files[form] = directory / f"{resolution}_{in_channels}_{channels}_{form}.onnx"
        export_onnx(model, files[form], input_size=size, fold_form=form)
        verify_onnx(files[form], model, batch_sizes=(1, 2))
    report = bench_onnx(
        [files["split"], files["concat"]],
        batch=args.batch,
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        names=["split", "concat"],
    )
    split, concat = report.timings
    ratio = report.paired["concat"]
    print(f"{resolution}x{resolution} {in_channels}->{channels}: split/concat {ratio:.3f}")
    return (
        f"| {resolution}×{resolution} | {in_channels} → {channels} | "
        f"{concat.median_ms * 1000:.0f} | {split.median_ms * 1000:.0f} | {ratio:.3f} | "
        f"{choose_form(resolution, resolution)} |"
    )


def _markdown(args: argparse.Namespace, sweep: list[str], rows: list[str]) -> str:
    """The RESULTS.md section: the command and machine, the network table, the site table."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    command = (
        f"python benchmarks/fold_forms.py --runs {args.runs} --warmup {args.warmup} "
        f"--threads {args.threads} --batch {args.batch} --runs-batch8 {args.runs_batch8}"
    )
    markdown = [
        "## IBN-site forms: concat vs split-next-conv (onnxruntime CPU)",
        "",
        f"`{command}` on {machine_line()}; load average {load} (a shared machine).",
        f"{args.threads} threads, thread spinning off, models timed interleaved. Ratios are",
        "medians of per-run ratios.",
        "",
        "ResNet-50 IBN-a (224×224) with the split form at the sites of at least the given",
        "resolution (`concat`: none; `split`: all), against resnet50:",
        "",
        "| IBN-a variant | b1 median ms | b1 / resnet50 | b8 median ms | b8 / resnet50 |",
        "|---|---|---|---|---|",
        *sweep,
        "",
        "One site in isolation: a ResNet-50 bottleneck head per row (conv 1×1 → IBN-a → ReLU →",
        f"conv 3×3 → BN → ReLU), batch {args.batch}, the two forms timed interleaved. Ratio:",
        "median of per-run ratios split / concat (< 1: split is faster).",
        "`auto` is what `--fold-form auto` picks there.",
        "",
        "| site output | channels in → IBN | concat µs | split µs | split / concat | auto |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(markdown)


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sweep = network_sweep(Path(tmp), args)
        rows = [site_row(Path(tmp), case, args) for case in CASES]
    markdown = _markdown(args, sweep, rows)
    if args.no_write:
        print(markdown)
    else:
        update_section("fold_forms", markdown)


if __name__ == "__main__":
    main()
