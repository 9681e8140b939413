"""onnxruntime sessions: open a file safely, list the ops of its optimized graph."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import VerificationError, first_line
from .export import onnx_op_types

logger = logging.getLogger(__name__)


def ort_session(
    path: str | os.PathLike[str],
    threads: int | None = None,
    optimized_path: str | os.PathLike[str] | None = None,
    level: str = "all",
) -> Any:
    """An onnxruntime CPU session; ``optimized_path`` saves the optimized graph there."""

    options = ort.SessionOptions()
    options.log_severity_level = 3
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[level]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_path)
    return ort.InferenceSession(
        os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def open_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """Open an ONNX file for inference; a missing or corrupt file raises VerificationError."""
    file = Path(path)
    if not file.is_file():
        raise VerificationError(f"ONNX file {str(file)!r} does not exist or is not a file")
    try:
        return ort_session(file, threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        first = first_line(exc)
        raise VerificationError(
            f"{str(file)!r} is not a valid ONNX model onnxruntime can load ({first[:200]})"
        ) from exc


def optimized_op_types(path: str | os.PathLike[str], level: str = "extended") -> Counter[str]:
    """Op types of the graph onnxruntime runs after its optimizations (saved and re-read)."""

    with tempfile.TemporaryDirectory() as directory:
        optimized = Path(directory) / "optimized.onnx"
        ort_session(path, optimized_path=optimized, level=level)
        return onnx_op_types(optimized)
