"""Shared by the ONNX latency benchmarks: time models interleaved at batch 1 and 8, table cells.

Each script exports its own variants; the timing (``ibnify.deploy.bench.bench_onnx``: spinning
off, order alternating) and the way a row reports it (median ms and the median of per-run
ratios against the baseline, per batch) are the same for all of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ibnify.deploy.bench import BenchReport, bench_onnx

BATCHES = (1, 8)


def time_batches(
    files: dict[str, Path], args: argparse.Namespace, engine: str = "onnxruntime"
) -> dict[int, BenchReport]:
    """Time ``files`` interleaved in ``engine`` at batch 1 (``args.runs`` runs) and 8
    (``args.runs_batch8``), with ``args.threads`` and ``args.warmup``; print each report."""
    reports = {}
    for batch, runs in zip(BATCHES, (args.runs, args.runs_batch8), strict=True):
        print(f"{engine} batch {batch}: {len(files)} models interleaved, {runs} runs ...")
        reports[batch] = bench_onnx(
            list(files.values()),
            batch=batch,
            threads=args.threads,
            warmup=args.warmup,
            runs=runs,
            names=list(files),
            engine=engine,
        )
        print(reports[batch])
    return reports


def ratio_cells(
    reports: dict[int, BenchReport], name: str, baseline: str = "resnet50", p90: bool = False
) -> list[str]:
    """Per batch: median ms (and p90 ms), then the median per-run ratio ``name / baseline``."""
    cells = []
    for batch in BATCHES:
        report = reports[batch]
        timing = next(t for t in report.timings if t.name == name)
        cells.append(f"{timing.median_ms:.1f}")
        if p90:
            cells.append(f"{timing.p90_ms:.1f}")
        cells.append(f"{report.paired_ratio(name, baseline):.3f}")
    return cells
