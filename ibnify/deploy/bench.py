"""onnxruntime latency of one or more ONNX files, measured interleaved in one process.

On a shared, noisy machine absolute times drift by tens of percent between runs; timing the
models in turn, iteration by iteration, exposes them to the same drift so their ratio is fair.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IbnifyError, VerificationError
from .ort import open_session

__all__ = ["BenchReport", "Timing", "bench_onnx"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Latency of one model in milliseconds."""

    name: str
    median_ms: float
    p90_ms: float
    runs: int


@dataclass
class BenchReport:
    """Latencies of the models (the first is the subject, the rest are baselines)."""

    batch: int
    threads: int
    timings: list[Timing] = field(default_factory=list)
    paired: dict[str, float] = field(default_factory=dict)  # name -> median per-run ratio
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)  # name -> ms

    def paired_ratio(self, name: str, baseline: str) -> float:
        """Median over runs of ``name``'s time / ``baseline``'s time in the same run."""
        return float(np.median(np.asarray(self.samples[name]) / np.asarray(self.samples[baseline])))

    def ratio(self, name: str | None = None) -> float:
        """Median latency of the first model / median latency of ``name`` (default: second)."""
        if len(self.timings) < 2:
            raise IbnifyError("a ratio needs two models")
        other = next((t for t in self.timings if t.name == name), None) or self.timings[1]
        return self.timings[0].median_ms / other.median_ms

    def __str__(self) -> str:
        lines = [f"onnxruntime CPU, {self.threads} threads, batch {self.batch}"]
        width = max(len(t.name) for t in self.timings)
        for t in self.timings:
            lines.append(
                f"{t.name:<{width}}  median {t.median_ms:8.2f} ms  p90 {t.p90_ms:8.2f} ms  "
                f"({t.runs} runs)"
            )
        first = self.timings[0]
        for t in self.timings[1:]:
            lines.append(
                f"ratio {first.name} / {t.name}: {first.median_ms / t.median_ms:.3f} "
                f"(median of per-run ratios {self.paired[t.name]:.3f})"
            )
        return "\n".join(lines)


def bench_onnx(
    paths: Sequence[str | os.PathLike[str]],
    batch: int = 1,
    threads: int = 2,
    warmup: int = 5,
    runs: int = 50,
    names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> BenchReport:
    """Time ``paths`` interleaved (the order rotates every run) and return median and p90.

    Each model gets a random input of its own shape at batch ``batch``; a file with a static
    batch other than ``batch`` is refused.
    """
    if batch < 1 or threads < 1 or runs < 1 or warmup < 0:
        raise IbnifyError("batch, threads and runs must be ≥ 1 and warmup ≥ 0")
    labels = list(names) if names is not None else [Path(p).name for p in paths]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    rng = np.random.default_rng(seed)
    sessions, feeds = [], []
    for path in paths:
        session = open_session(path, threads=threads)
        info = session.get_inputs()[0]
        dims = list(info.shape)
        if isinstance(dims[0], int) and dims[0] != batch:
            raise VerificationError(
                f"{str(path)!r} has a static batch of {dims[0]}; bench it with --batch {dims[0]}"
            )
        shape = [batch] + [d if isinstance(d, int) else 224 for d in dims[1:]]
        sessions.append(session)
        feeds.append({info.name: rng.standard_normal(shape, dtype=np.float32)})
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    total = warmup + runs
    for step in range(total):
        for index in order:
            start = time.perf_counter()
            sessions[index].run(None, feeds[index])
            elapsed = (time.perf_counter() - start) * 1000.0
            if step >= warmup:
                times[index].append(elapsed)
        order = order[1:] + order[:1]
        if progress is not None:
            progress(step + 1, total)
    report = BenchReport(batch=batch, threads=threads)
    for label, samples in zip(labels, times, strict=True):
        values = np.asarray(samples)
        report.samples[label] = list(samples)
        report.timings.append(
            Timing(label, float(np.median(values)), float(np.percentile(values, 90)), len(values))
        )
    first = np.asarray(times[0])
    for label, samples in zip(labels[1:], times[1:], strict=True):
        report.paired[label] = float(np.median(first / np.asarray(samples)))
    logger.info("%s", report)
    return report
