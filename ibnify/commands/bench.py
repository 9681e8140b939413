"""``ibnify bench`` from files: ONNX files timed interleaved, with onnxruntime's kernel profile
on request; its options record and :func:`bench_files`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..deploy.bench import (
    BenchOptions,
    BenchReport,
    KernelProfile,
    bench_onnx,
    kernel_profile,
    one_size,
)
from ..deploy.ort import check_onnx_file
from ..deploy.record import graph_input_dims, input_shape, read_record
from ..errors import VerificationError

__all__ = ["BenchFiles", "BenchResult", "bench_files"]


@dataclass(frozen=True)
class BenchFiles:
    """What ``ibnify bench`` times: the ONNX files (the first is the subject), the timing
    options, and whether to add onnxruntime's kernel profile."""

    paths: Sequence[str | os.PathLike[str]]
    options: BenchOptions = field(default_factory=BenchOptions)
    kernels: bool = False

    def check(self) -> None:
        """Refuse, before any session is opened: the options, no file, a missing or corrupt
        file, a size that does not fit a file, a dynamic-size file that records none, and
        files that would run at different sizes (one line each)."""
        self.options.validate()
        if not self.paths:
            raise VerificationError("give at least one ONNX file")
        shapes = []
        for path in self.paths:
            if not os.path.isfile(path):
                raise VerificationError(f"ONNX file {str(path)!r} does not exist or is not a file")
            check_onnx_file(path)
            dims = graph_input_dims(path)
            shapes.append(input_shape(path, dims, self.options.input_size, read_record(path)))
        one_size(self.paths, shapes)


@dataclass(frozen=True)
class BenchResult:
    """The timing, and the kernel profile when asked for."""

    report: BenchReport
    kernels: KernelProfile | None


def bench_files(
    files: BenchFiles, progress: Callable[[int, int], None] | None = None
) -> BenchResult:
    """What ``ibnify bench`` does: check the record, time the files at one size (the report's
    ``input`` line names it and where it came from), then profile their kernels (at most 20
    runs) when ``kernels``."""
    files.check()
    report = bench_onnx(files.paths, files.options, progress=progress)
    if not files.kernels:
        return BenchResult(report, None)
    options = files.options
    profiled = kernel_profile(
        files.paths,
        batch=options.batch,
        threads=options.threads,
        runs=max(1, min(options.runs, 20)),
        input_size=options.input_size,
    )
    return BenchResult(report, profiled)
