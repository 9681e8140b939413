"""onnxruntime sessions: check a file, open it safely, list the ops of its optimized graph."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from ..errors import VerificationError, first_line
from .export import onnx_op_types

__all__ = ["check_onnx_file", "open_session", "optimized_op_types", "ort_session"]

logger = logging.getLogger(__name__)


def ort_session(
    path: str | os.PathLike[str],
    threads: int | None = None,
    optimized_path: str | os.PathLike[str] | None = None,
    level: str = "all",
    spinning: bool = True,
    profile_prefix: str | None = None,
) -> Any:
    """An onnxruntime CPU session; ``optimized_path`` saves the optimized graph there.

    ``spinning=False`` stops idle intra-op threads from busy-waiting, which sessions timed side
    by side on few cores need; ``profile_prefix`` turns on onnxruntime's per-node profiler.
    """
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
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_path)
    return ort.InferenceSession(
        os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def open_session(
    path: str | os.PathLike[str], threads: int | None = None, spinning: bool = True
) -> Any:
    """Open an ONNX file for inference; a missing or corrupt file raises VerificationError."""
    file = Path(path)
    if not file.is_file():
        raise VerificationError(f"ONNX file {str(file)!r} does not exist or is not a file")
    check_onnx_file(file)
    try:
        return ort_session(file, threads=threads, spinning=spinning)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        first = first_line(exc)
        raise VerificationError(
            f"{str(file)!r} is not a valid ONNX model onnxruntime can load ({first[:200]})"
        ) from exc


def check_onnx_file(path: str | os.PathLike[str]) -> None:
    """Refuse an ONNX file before onnxruntime reads it: external data outside its own folder,
    or ops of a domain onnxruntime does not provide (each is one VerificationError line).

    The graph is parsed with ``onnx.load(load_external_data=False)``: protobuf only, no
    tensor file is opened. A downloaded model must not make ibnify read other files on the
    machine through ``location`` entries such as ``../../home/user/.ssh/id_rsa``.
    """
    file = Path(path)
    try:
        proto = onnx.load(os.fspath(file), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends for bad files
        raise VerificationError(
            f"{str(file)!r} is not a valid ONNX model onnxruntime can load "
            f"({first_line(exc)[:200]})"
        ) from exc
    folder = os.path.realpath(file.parent)
    graphs = [proto.graph]
    for graph in graphs:  # grows while subgraphs (If/Loop/Scan bodies) are found
        for tensor in _graph_tensors(graph, graphs):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = os.path.realpath(os.path.join(folder, location))
            if os.path.isabs(location) or not target.startswith(folder + os.sep):
                raise VerificationError(
                    f"{str(file)!r} keeps tensor {tensor.name[:60]!r} in {location[:80]!r}, "
                    "outside the model's own folder; refusing to read it"
                )
    local = {function.domain for function in proto.functions}
    nodes = [n for g in graphs for n in g.node] + [n for f in proto.functions for n in f.node]
    missing = sorted({n.domain for n in nodes} - _ort_domains() - local)
    if missing:
        ops = sorted({n.op_type for n in nodes if n.domain == missing[0]})
        raise VerificationError(
            f"{str(file)!r} uses ops of domain {missing[0][:60]!r} ({', '.join(ops[:3])[:80]}), "
            "which onnxruntime does not provide; ibnify loads no custom-op libraries"
        )


def _graph_tensors(graph: Any, graphs: list[Any]) -> list[Any]:
    """Every tensor stored in ``graph`` itself; its subgraphs are appended to ``graphs``."""
    tensors = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
            tensors.extend(attribute.tensors)
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)
    return tensors


@cache
def _ort_domains() -> frozenset[str]:
    """Op domains this onnxruntime build registers ("" and "ai.onnx" are the standard one)."""
    domains = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
    state = getattr(ort.capi, "onnxruntime_pybind11_state", None)
    schemas = getattr(state, "get_all_operator_schema", None)
    if schemas is not None:
        domains |= {schema.domain for schema in schemas()}
    return frozenset(domains)


def optimized_op_types(path: str | os.PathLike[str], level: str = "extended") -> Counter[str]:
    """Op types of the graph onnxruntime runs after its optimizations (saved and re-read)."""
    with tempfile.TemporaryDirectory() as directory:
        optimized = Path(directory) / "optimized.onnx"
        ort_session(path, optimized_path=optimized, level=level)
        return onnx_op_types(optimized)
