"""Verification: onnxruntime (or OpenVINO) against PyTorch on random and real inputs."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.surgery import get_plan
from ..data.images import data_config, load_images
from ..errors import VerificationError, first_line
from .engines import open_engine
from .export import PROFILE_TOLERANCES, read_onnx_metadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """Error of one onnxruntime output against PyTorch on one input."""

    case: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class VerificationReport:
    """Per-output, per-input errors of onnxruntime against PyTorch.

    ``max_rel`` is ``max |ort - torch| / (|torch| + atol)``, so near-zero outputs do not blow it
    up; a value passes where ``|ort - torch| <= atol + rtol * |torch|`` (numpy.allclose).
    """

    path: Path
    atol: float
    rtol: float
    rows: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engine: str = "onnxruntime"

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    @property
    def max_abs(self) -> float:
        return max((row.max_abs for row in self.rows), default=math.nan)

    def failure_message(self) -> str:
        """One line naming the worst failing output."""
        failing = [row for row in self.rows if not row.passed]
        if not failing:
            return "all outputs within tolerance"
        worst = max(failing, key=lambda row: row.max_abs)
        return (
            f"{self.engine} differs from PyTorch beyond tolerance on {len(failing)} of "
            f"{len(self.rows)} checks; worst: {worst.case} {worst.output} max abs "
            f"{worst.max_abs:.3g}, max rel {worst.max_rel:.3g} (atol {self.atol:g}, "
            f"rtol {self.rtol:g})"
        )

    def __str__(self) -> str:
        lines = [f"verify {self.path} against PyTorch (atol {self.atol:g}, rtol {self.rtol:g})"]
        lines += [f"note: {note}" for note in self.notes]
        width = max([6, *(len(row.output) for row in self.rows)])
        header = (
            f"{'input':<28} {'output':<{width}} {'shape':<16} {'max abs':>10} {'max rel':>10}  ok"
        )
        lines.append(header)
        for row in self.rows:
            shape = "x".join(str(d) for d in row.shape)
            lines.append(
                f"{row.case:<28} {row.output:<{width}} {shape:<16} {row.max_abs:>10.3g} "
                f"{row.max_rel:>10.3g}  {'yes' if row.passed else 'NO'}"
            )
        lines.append("PASS" if self.passed else f"FAIL: {self.failure_message()}")
        return "\n".join(lines)


def _flatten(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, list | tuple):
        return [t for item in output for t in _flatten(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _flatten(item)]
    raise VerificationError(f"the model returns a {type(output).__name__}, not tensors")


def _compare(
    session: Any, model: nn.Module, x: torch.Tensor, case: str, atol: float, rtol: float
) -> list[Comparison]:
    input_name = session.get_inputs()[0].name
    try:
        onnx_outputs = session.run(None, {input_name: x.numpy()})
    except Exception as exc:  # onnxruntime's own error types
        first = first_line(exc)
        raise VerificationError(
            f"the engine cannot run the file on input {tuple(x.shape)} ({first[:200]})"
        ) from exc
    with torch.no_grad():
        try:
            reference = [t.float().numpy() for t in _flatten(model(x))]
        except RuntimeError as exc:
            raise VerificationError(
                f"the PyTorch model does not accept the ONNX file's input {tuple(x.shape)}; the "
                "file was exported from another model"
            ) from exc
    if len(reference) != len(onnx_outputs):
        raise VerificationError(
            f"the ONNX file has {len(onnx_outputs)} outputs, the model {len(reference)}; the file "
            "was exported from another model"
        )
    names = [o.name for o in session.get_outputs()]
    rows = []
    for index, (ort_out, ref) in enumerate(zip(onnx_outputs, reference, strict=True)):
        if tuple(ort_out.shape) != tuple(ref.shape):
            raise VerificationError(
                f"output {names[index]!r} has shape {tuple(ort_out.shape)} in the ONNX file but "
                f"{tuple(ref.shape)} in the model; the file was exported from another model"
            )
        diff = np.abs(ort_out.astype(np.float64) - ref.astype(np.float64))
        magnitude = np.abs(ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / (magnitude + atol)).max()) if diff.size else 0.0
        passed = bool(np.all(diff <= atol + rtol * magnitude)) and bool(np.isfinite(ort_out).all())
        rows.append(Comparison(case, names[index], tuple(ref.shape), max_abs, max_rel, passed))
    return rows


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float | None = None,
    rtol: float | None = None,
    images: str | os.PathLike[str] | None = None,
    raise_on_failure: bool = True,
    seed: int = 0,
    engine: str = "onnxruntime",
) -> VerificationReport:
    """Run the ONNX file (in ``engine``) and PyTorch on the same inputs and compare every output.

    ``atol``/``rtol`` default to the tolerance of the export profile recorded in the file's
    metadata (``ibnify.profile``; fp32 tolerances where there is none).

    Inputs: random normal batches of each size in ``batch_sizes`` at the file's spatial size,
    one batch at a second spatial size where the file's spatial axes are dynamic, and the images
    under ``images`` when given.

    Raises:
        VerificationError: the file is missing, corrupt, from another model, or (with
            ``raise_on_failure``) an output differs beyond ``atol + rtol * |torch|``.
    """
    # Long by design: the input cases (batches, a second size, images) read top to bottom.
    session = open_engine(path, engine)
    atol, rtol, profile = _tolerance(path, atol, rtol)
    report = VerificationReport(Path(path), atol, rtol, engine=engine)
    report.notes.append(f"engine {engine}, export profile {profile}")
    _check_recipe(path, model)
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise VerificationError(
            f"{str(path)!r} takes {len(inputs)} inputs of rank "
            f"{[len(i.shape) for i in inputs]}; ibnify verifies single-image (NCHW) models"
        )
    batch_dim, channels, height, width = inputs[0].shape
    dynamic_size = not isinstance(height, int) or not isinstance(width, int)
    if not all(isinstance(d, int) for d in (channels, height, width)):
        recorded = _recorded_size(path)
        channels = channels if isinstance(channels, int) else recorded[0]
        height = height if isinstance(height, int) else recorded[1]
        width = width if isinstance(width, int) else recorded[2]
    second = (_second_size(height), _second_size(width))
    if dynamic_size:
        report.notes.append(
            f"spatial axes are dynamic; checking {height}x{width} and {second[0]}x{second[1]}"
        )
    sizes = [int(b) for b in batch_sizes]
    if any(b < 1 for b in sizes):
        raise VerificationError(f"batch sizes must be ≥ 1, got {sizes}")
    if isinstance(batch_dim, int):
        report.notes.append(f"the file has a static batch of {batch_dim}; checking only that")
        sizes = [batch_dim]
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model).eval().float().cpu()
    for batch in sizes:
        x = torch.randn(batch, channels, height, width, generator=generator)
        report.rows += _compare(session, model, x, f"random batch {batch}", atol, rtol)
    if dynamic_size:
        x = torch.randn(sizes[-1], channels, *second, generator=generator)
        case = f"random batch {sizes[-1]} {second[0]}x{second[1]}"
        report.rows += _compare(session, model, x, case, atol, rtol)
    if images is not None:
        config = data_config(model)  # the model's own normalisation (timm cfg, else ImageNet)
        batch = load_images(
            images,
            (height, width),
            limit=8 if batch_dim != 1 else 1,
            mean=config["mean"],
            std=config["std"],
        )
        if isinstance(batch_dim, int):
            batch = batch[:batch_dim]
            if batch.shape[0] < batch_dim:
                batch = batch.repeat((batch_dim + batch.shape[0] - 1) // batch.shape[0], 1, 1, 1)
                batch = batch[:batch_dim]
        case = f"images batch {batch.shape[0]}"
        report.rows += _compare(session, model, batch, case, atol, rtol)
    logger.info("%s", report)
    if raise_on_failure and not report.passed:
        raise VerificationError(report.failure_message())
    return report


def _tolerance(
    path: str | os.PathLike[str], atol: float | None, rtol: float | None
) -> tuple[float, float, str]:
    """(atol, rtol, profile): the given values, else the recorded export profile's tolerance."""
    try:
        profile = read_onnx_metadata(path).get("profile", "default")
    except Exception:  # unreadable metadata: the session already loaded the graph
        profile = "default"
    default_atol, default_rtol = PROFILE_TOLERANCES.get(profile, PROFILE_TOLERANCES["default"])
    return (
        default_atol if atol is None else float(atol),
        default_rtol if rtol is None else float(rtol),
        profile,
    )


def _recorded_size(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """The export input size recorded in the metadata, else (3, 224, 224)."""
    try:
        values = tuple(int(v) for v in read_onnx_metadata(path)["input_size"].split(","))
    except (KeyError, ValueError, OSError):
        return (3, 224, 224)
    return values if len(values) == 3 else (3, 224, 224)  # type: ignore[return-value]


def _second_size(size: int) -> int:
    """Another valid spatial size: three quarters, rounded down to a multiple of 32 (≥ 32)."""
    smaller = max(32, (size * 3 // 4) // 32 * 32)
    return smaller if smaller != size else size + 32


def _check_recipe(path: str | os.PathLike[str], model: nn.Module) -> None:
    """Refuse a file whose recorded recipe names another model than ``model``'s plan."""

    try:
        stored = read_onnx_metadata(path)
    except Exception:  # unreadable metadata: the session already loaded the graph, go on
        return
    plan = get_plan(model)
    if plan is None or "plan" not in stored:
        return
    try:
        recorded = json.loads(stored["plan"])
    except ValueError:
        return
    mine = plan.to_dict()
    for key in ("arch", "layout", "stages", "ratio"):
        if recorded.get(key) != mine.get(key):
            raise VerificationError(
                f"{str(path)!r} was exported from {recorded.get('arch')} "
                f"(layout {recorded.get('layout')}, stages {recorded.get('stages')}), but the "
                f"model is {mine.get('arch')} (layout {mine.get('layout')}, stages "
                f"{mine.get('stages')}); {key} differs"
            )
