"""Inference engines for verify and bench: onnxruntime (always) and OpenVINO (optional extra).

Both are opened behind one small interface, onnxruntime's own: ``get_inputs()`` and
``get_outputs()`` (items with ``name`` and ``shape``, a dimension being an int or a name) and
``run(None, feed)`` returning a list of numpy arrays, so verification and timing code does not
care which engine runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import ENGINES
from ..errors import VerificationError, first_line
from .ort import check_onnx_file, open_session

__all__ = ["OpenVinoSession", "PortInfo", "open_engine"]


@dataclass(frozen=True)
class PortInfo:
    """One input or output as onnxruntime describes it: a name and a shape of ints or names."""

    name: str
    shape: list[int | str]


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO's CPU plugin, in fp32, behind onnxruntime's interface.

    OpenVINO picks bf16 on CPUs that have it unless told otherwise; the precision hint keeps
    fp32 so that its numerics can be verified against PyTorch with fp32 tolerances.
    """

    def __init__(self, path: Path, threads: int | None, batch: int | None) -> None:
        try:
            import openvino
        except ImportError as exc:
            raise VerificationError(
                "`engine=openvino` needs the optional extra: pip install 'ibnify[openvino]'"
            ) from exc
        core = openvino.Core()
        model = core.read_model(os.fspath(path))
        if batch is not None:  # a static batch lets the CPU plugin plan its memory once
            shapes = {}
            for port in model.inputs:
                dims = port.get_partial_shape()
                if dims.rank.is_static and dims.rank.get_length() >= 1 and dims[0].is_dynamic:
                    dims[0] = batch
                    shapes[port.get_any_name()] = dims
            if shapes:
                model.reshape(shapes)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._inputs = _port_infos(self._compiled.inputs)
        self._outputs = _port_infos(self._compiled.outputs)

    def get_inputs(self) -> list[PortInfo]:
        """The model's inputs (name, shape) like onnxruntime's ``get_inputs``."""
        return list(self._inputs)

    def get_outputs(self) -> list[PortInfo]:
        """The model's outputs (name, shape) like onnxruntime's ``get_outputs``."""
        return list(self._outputs)

    def run(self, output_names: None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; return every output as a fresh numpy array."""
        results = self._request.infer(feed)
        return [np.array(results[port]) for port in self._compiled.outputs]


def _port_infos(ports: Any) -> list[PortInfo]:
    """OpenVINO ports as onnxruntime describes them: a dynamic dimension gets a name."""
    return [
        PortInfo(
            port.get_any_name(),
            [
                d.get_length() if d.is_static else f"dim{i}"
                for i, d in enumerate(port.get_partial_shape())
            ],
        )
        for port in ports
    ]


def open_engine(
    path: str | os.PathLike[str],
    engine: str = "onnxruntime",
    threads: int | None = None,
    spinning: bool = True,
    batch: int | None = None,
) -> Any:
    """Open an ONNX file in ``engine``; a missing or unloadable file raises VerificationError.

    ``spinning`` applies to onnxruntime; ``batch`` fixes a dynamic batch axis in OpenVINO.
    """
    if engine == "onnxruntime":
        return open_session(path, threads=threads, spinning=spinning)
    if engine != "openvino":
        raise VerificationError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    file = Path(path)
    if not file.is_file():
        raise VerificationError(f"ONNX file {str(file)!r} does not exist or is not a file")
    check_onnx_file(file)  # the same refusals as onnxruntime's (external data, op domains)
    try:
        return OpenVinoSession(file, threads, batch)
    except VerificationError:
        raise
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses for bad files
        raise VerificationError(
            f"{str(file)!r} is not a model OpenVINO can load ({_openvino_reason(exc)[:200]})"
        ) from exc


def _openvino_reason(exc: Exception) -> str:
    """The last non-empty line of an OpenVINO error: the first only names a source file."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else first_line(exc)
