"""How much the digits demo's figures move with the seed and with the CPU's kernels.

Runs ``ibnify demo --seed S`` for S in ``--seeds`` under two CPU capabilities: this machine's
own kernels, and ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (the kernels an AVX2-only
CPU runs; float32 sums then round differently, and a difference in the first steps grows into
another trained network). Prints one row per run and the spread of each figure the README's
words rely on, and writes them to benchmarks/RESULTS.md.

    python benchmarks/demo_spread.py                 # seeds 0-4, both capabilities, 2 at once
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import machine_line, update_section

SECOND_CAPABILITY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
KEY_SHIFTS = ("brightness_down", "contrast_down", "gamma")


def run_one(seed: int, capability: str, work: Path) -> dict:
    """One ``ibnify demo`` run in a child process; its JSON report and platform record."""
    env = {**os.environ, **(SECOND_CAPABILITY if capability == "avx2" else {})}
    out = work / f"{capability}-{seed}"
    subprocess.run(
        [sys.executable, "-m", "ibnify", "demo", "--seed", str(seed), "--out", str(out)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads((out / "robustness.json").read_text())
    return {"seed": seed, "capability": capability, "report": report}


def figures(run: dict) -> dict[str, float]:
    """The figures the README's claims are about, in percent points."""
    report = run["report"]
    accuracy, drop = report["accuracy"], report["drop"]
    row = {
        "clean control": 100 * accuracy["control"]["clean"],
        "clean ibn": 100 * accuracy["ibn"]["clean"],
        "mean drop control": 100 * _mean(drop["control"].values()),
        "mean drop ibn": 100 * _mean(drop["ibn"].values()),
    }
    row["ibn / control"] = row["mean drop ibn"] / row["mean drop control"]
    for shift in KEY_SHIFTS:
        row[f"{shift} control"] = 100 * drop["control"][shift]
        row[f"{shift} ibn"] = 100 * drop["ibn"][shift]
    return row


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def markdown(runs: list[dict]) -> str:
    """One row per run, then min and max of every column."""
    rows = [(r["capability"], r["seed"], figures(r)) for r in runs]
    names = list(rows[0][2])
    head = "| kernels | seed | " + " | ".join(names) + " |"
    rule = "|" + "---|" * (len(names) + 2)
    lines = [head, rule]
    for capability, seed, row in rows:
        cells = " | ".join(_cell(name, row[name]) for name in names)
        lines.append(f"| {capability} | {seed} | {cells} |")
    for label, pick in (("min", min), ("max", max)):
        cells = " | ".join(_cell(n, pick(row[n] for _, _, row in rows)) for n in names)
        lines.append(f"| **{label}** | | {cells} |")
    return "\n".join(lines)


def _cell(name: str, value: float) -> str:
    return f"{value:.2f}" if name == "ibn / control" else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="demo runs at once (1 thread each)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    native = _native_capability()
    jobs = [(seed, cap) for cap in (native, "avx2") for seed in args.seeds]
    with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, seed, cap, Path(work)) for seed, cap in jobs]
        runs = [f.result() for f in tqdm(futures, desc="demo runs", unit="run")]
    table = markdown(runs)
    print(table)
    if not args.no_write:
        text = (
            "## Digits demo: spread over seeds and CPU kernels\n\n"
            "`python benchmarks/demo_spread.py` — `ibnify demo --seed S` (one thread each) under "
            f"this machine's kernels ({native}) and under `ATEN_CPU_CAPABILITY=avx2 "
            f"ONEDNN_MAX_CPU_ISA=AVX2`; {machine_line()}. Accuracy and drops in points; "
            "`ibn / control` is the IBN model's mean drop over the control's.\n\n" + table
        )
        update_section("demo_spread", text)


def _native_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


if __name__ == "__main__":
    main()
