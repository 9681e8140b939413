"""Peak memory of converting torchvision resnet50 (model construction excluded).

Usage: python benchmarks/convert_memory.py
Resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs) after building the model,
converts it, and reports the peak RSS increase as a multiple of the model's parameter bytes.
Target: ≤ 1.5×. Linux only. Writes the `convert_memory` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ibnify
from benchmarks._results import machine_line, update_section

TARGET = 1.5


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(layout: str) -> tuple[int, int, int]:
    """(parameter bytes, RSS before, peak RSS during conversion) in bytes."""
    model = torchvision.models.resnet50()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    converted = ibnify.convert(model, layout=layout)
    peak = _status_kib("VmHWM") * 1024
    del converted
    return param_bytes, before, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["a", "b"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:  # one measurement per fresh process: freed pages would hide the next peak
        ibnify.convert(torchvision.models.resnet18(), input_size=(3, 64, 64))  # warm up
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for layout in ("a", "b"):
        child = subprocess.run(
            [sys.executable, __file__, "--child", layout],
            capture_output=True,
            text=True,
            check=True,
        )
        param_bytes, before, peak = json.loads(child.stdout.strip().splitlines()[-1])
        ratio = (peak - before) / param_bytes
        verdict = "meets" if ratio <= TARGET else "MISSES"
        print(
            f"resnet50 IBN-{layout}: parameters {param_bytes / 2**20:.1f} MiB, peak RSS increase "
            f"{(peak - before) / 2**20:.1f} MiB = {ratio:.2f}× — {verdict} ≤ {TARGET}×"
        )
        rows.append(
            f"| resnet50 IBN-{layout} | {param_bytes / 2**20:.1f} | "
            f"{(peak - before) / 2**20:.1f} | {ratio:.2f}× | {verdict} |"
        )
    update_section(
        "convert_memory",
        "\n".join(
            [
                "## Conversion peak memory (resnet50, model construction excluded)",
                "",
                f"`python benchmarks/convert_memory.py` on {machine_line()}.",
                "Each layout is measured in a fresh process. Peak RSS increase during",
                "`ibnify.convert` (deep copy, fx trace, one 224×224 shape-propagation pass, swaps)",
                f"over the parameter bytes. Target ≤ {TARGET}×.",
                "",
                "| conversion | parameters (MiB) | peak increase (MiB) | ratio | target |",
                "|---|---|---|---|---|",
                *rows,
            ]
        ),
    )


if __name__ == "__main__":
    main()
