"""Latency of one or more ONNX files (onnxruntime or OpenVINO), measured interleaved.

On a shared, noisy machine absolute times drift by tens of percent between runs; timing the
models in turn, alternating the order every run, exposes them to the same drift, and the median
of per-run ratios is robust to the rest. onnxruntime's idle threads spin by default, which on few
cores steals time from the other session timed beside them and dilutes the ratio: interleaved
sessions run with spinning off. :func:`kernel_profile` cross-checks a ratio with onnxruntime's
own per-node profiler.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import ENGINES
from ..core.plans import as_input_size
from ..errors import IbnifyError, InvalidOptionError, VerificationError
from .engines import open_engine
from .export import options_from
from .ort import ort_session
from .record import SIZE_GIVEN, InputShape, input_shape, read_record, size_text

__all__ = [
    "BenchOptions",
    "BenchReport",
    "KernelProfile",
    "Timing",
    "bench_onnx",
    "kernel_profile",
    "one_size",
]

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
    engine: str = "onnxruntime"
    spinning: bool = True
    timings: list[Timing] = field(default_factory=list)
    paired: dict[str, float] = field(default_factory=dict)  # name -> median per-run ratio
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)  # name -> ms
    inputs: dict[str, InputShape] = field(default_factory=dict)  # name -> size and its source

    def paired_ratio(self, name: str, baseline: str) -> float:
        """Median over runs of ``name``'s time / ``baseline``'s time in the same run."""
        return float(np.median(np.asarray(self.samples[name]) / np.asarray(self.samples[baseline])))

    def ratio(self, name: str | None = None) -> float:
        """Median latency of the first model / median latency of ``name`` (default: second)."""
        if len(self.timings) < 2:
            raise IbnifyError("a ratio needs two models")
        other = next((t for t in self.timings if t.name == name), None) or self.timings[1]
        return self.timings[0].median_ms / other.median_ms

    def input_line(self) -> str:
        """``input 3×16×16 (recorded in the file)``: the one size every model ran at and where
        it came from, per model where the sources differ."""
        shapes = list(self.inputs.values())
        sources = {shape.source for shape in shapes}
        if len(sources) == 1:
            return str(shapes[0])
        each = ", ".join(f"{name}: {shape.source}" for name, shape in self.inputs.items())
        return f"input {size_text(shapes[0].size)} ({each})"

    def __str__(self) -> str:
        lines = [f"{self.engine} CPU, {self.threads} threads, batch {self.batch}"]
        if self.engine == "onnxruntime":
            lines.append(
                "thread spinning off (sessions interleaved, order alternating)"
                if not self.spinning
                else "thread spinning on (onnxruntime default)"
            )
        if self.inputs:
            lines.append(self.input_line())
        width = max(len(t.name) for t in self.timings)
        for t in self.timings:
            lines.append(
                f"{t.name:<{width}}  median {t.median_ms:8.2f} ms  p90 {t.p90_ms:8.2f} ms  "
                f"({t.runs} runs)"
            )
        first = self.timings[0]
        for t in self.timings[1:]:
            lines.append(
                f"ratio {first.name} / {t.name}: {self.paired[t.name]:.3f} (median of per-run "
                f"ratios; ratio of medians {first.median_ms / t.median_ms:.3f})"
            )
        return "\n".join(lines)


def _labels(paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None) -> list[str]:
    labels = list(names) if names is not None else [Path(p).name for p in paths]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


@dataclass(frozen=True)
class BenchOptions:
    """How :func:`bench_onnx` times: the options as one record (the CLI builds one).

    Attributes:
        batch: the batch every model runs at (a file with another static batch is refused).
        threads: intra-op threads per session.
        warmup, runs: untimed and timed runs of each model.
        names: the models' labels (default: the file names).
        seed: the random inputs' seed.
        engine: ``onnxruntime`` or ``openvino``.
        spinning: onnxruntime's idle-thread spinning; default off when more than one model is
            timed, on for a single model.
        input_size: the size to run at (224, (160, 224) or (3, 224, 224)); default: the size
            each file records, else its graph's fixed shape. Models timed side by side run at
            one size: files that would run at different sizes are refused without it.
    """

    batch: int = 1
    threads: int = 2
    warmup: int = 5
    runs: int = 50
    names: Sequence[str] | None = None
    seed: int = 0
    engine: str = "onnxruntime"
    spinning: bool | None = None
    input_size: int | str | Sequence[int] | None = None

    def validate(self) -> BenchOptions:
        """Return the options, or raise InvalidOptionError in one line before any file opens."""
        if self.batch < 1 or self.threads < 1 or self.runs < 1 or self.warmup < 0:
            raise InvalidOptionError("`batch`, `threads` and `runs` must be ≥ 1 and `warmup` ≥ 0")
        if self.engine not in ENGINES:
            raise InvalidOptionError(f"`engine` {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.input_size is not None:
            as_input_size(self.input_size)
        return self


def _open_all(
    paths: Sequence[str | os.PathLike[str]], options: BenchOptions, spinning: bool
) -> tuple[list, list[dict[str, np.ndarray]], list[InputShape]]:
    """Open every file, decide the one size they run at, make a random input for each."""
    sessions, shapes = [], []
    for path in paths:
        session = open_engine(
            path, options.engine, threads=options.threads, spinning=spinning, batch=options.batch
        )
        dims = list(session.get_inputs()[0].shape)
        if isinstance(dims[0], int) and dims[0] != options.batch:
            raise VerificationError(
                f"{str(path)!r} has a static batch of {dims[0]}; bench it with `batch={dims[0]}`"
            )
        sessions.append(session)
        shapes.append(input_shape(path, dims, options.input_size, read_record(path)))
    one_size(paths, shapes)
    rng = np.random.default_rng(options.seed)
    feeds = [
        {s.get_inputs()[0].name: rng.standard_normal((options.batch, *shape.size), np.float32)}
        for s, shape in zip(sessions, shapes, strict=True)
    ]
    return sessions, feeds, shapes


def one_size(paths: Sequence[str | os.PathLike[str]], shapes: list[InputShape]) -> None:
    """Refuse models that would run at different sizes: their times are not comparable."""
    if len({shape.size for shape in shapes}) <= 1:
        return
    each = ", ".join(f"{str(p)!r} {shape}" for p, shape in zip(paths, shapes, strict=True))
    raise InvalidOptionError(
        f"the files would run at different sizes ({each}); time them at one size with "
        f"{SIZE_GIVEN} (each file must accept it)"
    )


def bench_onnx(
    paths: Sequence[str | os.PathLike[str]],
    options: BenchOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    **keywords: Any,
) -> BenchReport:
    """Time ``paths`` interleaved (the order alternates every run); median, p90, per-run ratios.

    ``options``: a :class:`BenchOptions`, or its fields as keywords (``bench_onnx(paths,
    batch=1, runs=50)``), not both. Every model gets a random input at batch ``batch`` and the
    one size the report's ``input`` line names. ``progress(done, total)`` is called after
    each round.

    Raises:
        InvalidOptionError: a bad option, a dynamic-size file that records no size and got no
            ``input_size``, or files that would run at different sizes.
        VerificationError: a missing or unloadable file, or a static batch other than ``batch``.
    """
    chosen = options_from(BenchOptions, options, keywords, "bench_onnx").validate()
    labels = _labels(paths, chosen.names)
    spin = len(paths) == 1 if chosen.spinning is None else chosen.spinning
    sessions, feeds, shapes = _open_all(paths, chosen, spin)
    times = _timed(sessions, feeds, chosen.warmup, chosen.runs, progress)
    report = BenchReport(
        batch=chosen.batch, threads=chosen.threads, engine=chosen.engine, spinning=spin
    )
    report.inputs = dict(zip(labels, shapes, strict=True))
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


def _timed(
    sessions: list,
    feeds: list[dict[str, np.ndarray]],
    warmup: int,
    runs: int,
    progress: Callable[[int, int], None] | None,
) -> list[list[float]]:
    """Milliseconds of each timed run per session, the order alternating every round."""
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
        order.reverse() if len(order) == 2 else order.append(order.pop(0))
        if progress is not None:
            progress(step + 1, total)
    return times


@dataclass
class KernelProfile:
    """onnxruntime's profiler: kernel time per op type, in ms per run, for each model."""

    runs: int
    per_op: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> op -> ms

    def total(self, name: str) -> float:
        """Sum of kernel times of one run of model ``name`` (ms)."""
        return float(sum(self.per_op[name].values()))

    def extra(self, name: str, baseline: str, top: int = 5) -> list[tuple[str, float]]:
        """The ``top`` op types by (``name`` − ``baseline``) kernel time, ms per run."""
        ops = set(self.per_op[name]) | set(self.per_op[baseline])
        diffs = {
            op: self.per_op[name].get(op, 0.0) - self.per_op[baseline].get(op, 0.0) for op in ops
        }
        return sorted(diffs.items(), key=lambda item: -item[1])[:top]

    def summary(self) -> str:
        """Kernel totals per model and, against the last model, the top op types by extra time."""
        names = list(self.per_op)
        lines = [f"onnxruntime profiler ({self.runs} runs each, kernel time per run):"]
        lines += [f"  {name}: {self.total(name):.2f} ms" for name in names]
        if len(names) >= 2:
            base = names[-1]
            for name in names[:-1]:
                ratio = self.total(name) / self.total(base)
                tops = ", ".join(f"{op} {ms:+.2f}" for op, ms in self.extra(name, base))
                lines.append(f"  {name} / {base}: {ratio:.3f}; extra ms by op: {tops}")
        return "\n".join(lines)


def _profile_events(session: Any, warmup: int, runs: int) -> dict[str, float]:
    """Per-op-type kernel ms per run from a profiling session's JSON, warm-up runs left out."""
    with open(session.end_profiling(), encoding="utf-8") as handle:
        events = json.load(handle)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    cutoff = starts[warmup] if len(starts) > warmup else 0
    per_op: Counter[str] = Counter()
    for event in events:
        kernel = event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
        if kernel and event["ts"] >= cutoff:
            per_op[event.get("args", {}).get("op_name", "?")] += event["dur"] / 1000.0
    return {op: ms / runs for op, ms in per_op.items()}


def kernel_profile(
    paths: Sequence[str | os.PathLike[str]],
    batch: int = 1,
    threads: int = 2,
    warmup: int = 3,
    runs: int = 10,
    names: Sequence[str] | None = None,
    input_size: int | str | Sequence[int] | None = None,
) -> KernelProfile:
    """Profile the models with onnxruntime's profiler, interleaved, and sum their kernel times.

    A cross-check for wall-clock ratios: kernel time leaves out the session's own overhead, and
    the per-op-type sums say which op types cost the extra time. The sessions run interleaved
    with spinning off, like :func:`bench_onnx`, at the one size it would pick.
    """
    options = BenchOptions(batch, threads, warmup, runs, input_size=input_size).validate()
    labels = _labels(paths, names)
    _, _, shapes = _open_all(paths, options, False)  # checks files, batch and size
    rng = np.random.default_rng(0)
    report = KernelProfile(runs=runs)
    with tempfile.TemporaryDirectory() as directory:
        sessions, feeds = [], []
        for index, path in enumerate(paths):
            prefix = os.path.join(directory, f"model{index}")
            session = ort_session(path, threads=threads, spinning=False, profile_prefix=prefix)
            info = session.get_inputs()[0]
            shape = (batch, *shapes[index].size)
            sessions.append(session)
            feeds.append({info.name: rng.standard_normal(shape, dtype=np.float32)})
        order = list(range(len(sessions)))
        for _ in range(warmup + runs):
            for index in order:
                sessions[index].run(None, feeds[index])
            order.reverse() if len(order) == 2 else order.append(order.pop(0))
        for label, session in zip(labels, sessions, strict=True):
            report.per_op[label] = _profile_events(session, warmup, runs)
    return report
