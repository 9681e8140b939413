"""Time of ``ibnify.analyze`` for torchvision resnet50 (random weights) on this CPU.

256 random 224×224 images form domain A; domain B is their copy under one shift
(``brightness_down``), so the analysis runs 2 × 256 forward passes with a hook on each of the 53
BatchNorm layers. Bare forward passes without hooks (same channels-last input, the first
``--bare-images`` images, clean and shifted) are timed too, so the report shows what the
measurement itself costs per image beyond the network. Target: within a minute. Writes the
``analyze_speed`` section of ``benchmarks/RESULTS.md``.

    python benchmarks/analyze_speed.py [--images 256] [--bare-images 64] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ibnify
from benchmarks._results import machine_line, update_section
from ibnify.data.images import ImageData, Normalize
from ibnify.data.shifts import apply_shift

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHIFT = "brightness_down"


@torch.no_grad()
def plain_forward(model: torch.nn.Module, data: ImageData, batch_size: int) -> float:
    """Seconds for the same forward passes as the analysis (clean + shifted), no hooks."""
    normalize = Normalize(data.mean, data.std)
    started = time.perf_counter()
    loader = DataLoader(data.dataset, batch_size=batch_size)
    for index, (images, _labels) in enumerate(loader):
        for view in ("clean", SHIFT):
            inputs = normalize(apply_shift(view, images, batch_index=index))
            model(inputs.contiguous(memory_format=torch.channels_last))  # as analyze does
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--bare-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    images = torch.rand(args.images, 3, 224, 224)
    labels = torch.zeros(args.images, dtype=torch.long)
    data = ImageData(TensorDataset(images, labels), MEAN, STD, name="random-224")

    with torch.no_grad():  # warm-up: oneDNN builds its kernels on the first call
        warm = torch.rand(args.batch_size, 3, 224, 224)
        model(warm.contiguous(memory_format=torch.channels_last))
    sizes = {"images": args.images, "batch_size": args.batch_size}
    started = time.perf_counter()
    report = ibnify.analyze(model, data, shifts=SHIFT, progress=False, arch="tv:resnet50", **sizes)
    analyze_seconds = time.perf_counter() - started
    bare = ImageData(
        TensorDataset(images[: args.bare_images], labels[: args.bare_images]), MEAN, STD
    )
    forward_seconds = plain_forward(model, bare, args.batch_size)
    passes, bare_passes = 2 * args.images, 2 * len(bare)
    verdict = "within" if analyze_seconds <= 60 else "OVER"
    overhead = (analyze_seconds / passes) / (forward_seconds / bare_passes)
    cause = (
        "the network, not the measurement, sets the time"
        if overhead < 1.15
        else "the measurement adds a visible cost"
    )
    lines = [
        "## `ibnify analyze` speed (resnet50, random weights, 224 px)",
        "",
        f"`python benchmarks/analyze_speed.py --images {args.images} --bare-images "
        f"{args.bare_images} --batch-size {args.batch_size} --threads {args.threads}` — "
        f"{machine_line()}.",
        "",
        f"{args.images} random 224×224 images as domain A and their `{SHIFT}` copy as domain B: "
        f"{passes} forward passes, {len(report.sites)} norm layers hooked.",
        "",
        "| what | seconds | images/s |",
        "|---|---|---|",
        f"| `analyze_divergence` (hooks, statistics, graph analysis, default plan) | "
        f"{analyze_seconds:.1f} | {passes / analyze_seconds:.1f} |",
        f"| bare forward passes, no hooks ({bare_passes}: first {len(bare)} images, clean and "
        f"shifted) | {forward_seconds:.1f} | {bare_passes / forward_seconds:.1f} |",
        "",
        f"Target: within a minute — {verdict} ({analyze_seconds:.0f} s); per image the analysis "
        f"costs {overhead:.2f}× a bare forward pass: {cause}. Each extra shift "
        f"adds {args.images} forward passes (`--shift all` = 9 shifts = "
        f"{10 * args.images} passes); `--images` sets the rest.",
    ]
    update_section("analyze_speed", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
