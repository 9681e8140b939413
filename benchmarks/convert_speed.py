"""Time converting torchvision resnet50 to IBN-a/IBN-b (model construction excluded).

Usage: python benchmarks/convert_speed.py [--repeats 7]
Writes the `convert_speed` section of benchmarks/RESULTS.md. Target: ≤ 0.5 s per conversion.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ibnify
from benchmarks._results import machine_line, update_section

TARGET_S = 0.5


def time_conversion(layout: str, repeats: int) -> tuple[float, float, list[float]]:
    """(first-call seconds, median of the following calls, all warm timings)."""
    model = torchvision.models.resnet50()
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        ibnify.convert(model, layout=layout)
        timings.append(time.perf_counter() - start)
    return timings[0], statistics.median(timings[1:]), timings[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import timm  # noqa: F401 - a one-time import (timm's fx leaf registry), not conversion work

    rows = []
    for layout in ("a", "b"):
        first, median, warm = time_conversion(layout, args.repeats)
        verdict = "meets" if median <= TARGET_S else "MISSES"
        print(
            f"resnet50 IBN-{layout}: first {first:.3f} s, median of {len(warm)} "
            f"{median:.3f} s (min {min(warm):.3f}, max {max(warm):.3f}) — {verdict} ≤ {TARGET_S} s"
        )
        rows.append(
            f"| resnet50 IBN-{layout} | {first:.3f} | {median:.3f} | {min(warm):.3f} | "
            f"{max(warm):.3f} | {verdict} |"
        )
    update_section(
        "convert_speed",
        "\n".join(
            [
                "## Conversion speed (resnet50, model construction excluded)",
                "",
                f"`python benchmarks/convert_speed.py --repeats {args.repeats}`",
                f"on {machine_line()}.",
                "Includes fx tracing, one 224×224 shape-propagation pass (meta tensors), the plan,",
                "the deep copy and the module swaps; excludes model construction and the one-time",
                f"`import timm` (about 0.5 s, for its fx leaf registry). Target ≤ {TARGET_S} s.",
                "",
                "| conversion | first call (s) | median (s) | min (s) | max (s) | target |",
                "|---|---|---|---|---|---|",
                *rows,
            ]
        ),
    )


if __name__ == "__main__":
    main()
