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

from ..core.plans import stages_text
from ..core.recipe import get_recipe
from ..data.images import data_config, load_images
from ..errors import VerificationError, first_line
from .engines import open_engine
from .export import PROFILE_TOLERANCES, RECIPE_KEY, read_onnx_metadata

logger = logging.getLogger(__name__)

__all__ = ["Comparison", "RecordedMetadata", "VerificationReport", "read_record", "verify_onnx"]


@dataclass(frozen=True)
class Comparison:
    """Error of one engine output against PyTorch on one input.

    ``max_abs`` is ``max |engine - torch|``; ``max_ratio`` is the tested quantity,
    ``max |engine - torch| / (atol + rtol * |torch|)`` over the elements: the check passes
    where it is at most 1 (``numpy.allclose``'s rule) and every value is finite. ``vacuous``:
    an all-zero output would pass too, because every ``|torch|`` is within the tolerance.
    """

    case: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    max_ratio: float
    passed: bool
    vacuous: bool = False


@dataclass
class VerificationReport:
    """Per-output, per-input errors of the engine against PyTorch.

    An element passes where ``|engine - torch| <= atol + rtol * |torch|`` (numpy.allclose);
    the table's ``err/tol`` column is the largest ``|engine - torch| / (atol + rtol * |torch|)``
    of each check, so a check passes where it is at most 1.
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

    def vacuous_warning(self) -> str | None:
        """One line when some output is so small that an all-zero output would pass too.

        A random-init model's outputs can be ~1e-8: every check then passes, whatever the
        file computes. The tolerance is not rescaled; the report says so instead.
        """
        outputs = list(dict.fromkeys(row.output for row in self.rows if row.vacuous))
        if not outputs:
            return None
        names = ", ".join(repr(name) for name in outputs)
        return (
            f"output {names} stays within atol {self.atol:g} of zero, so this check would pass "
            "for any file; verify a trained model, or lower atol"
        )

    def failure_message(self) -> str:
        """One line naming the worst failing output."""
        failing = [row for row in self.rows if not row.passed]
        if not failing:
            return "all outputs within tolerance"
        worst = max(failing, key=lambda row: row.max_ratio)
        return (
            f"{self.engine} differs from PyTorch beyond tolerance on {len(failing)} of "
            f"{len(self.rows)} checks; worst: {worst.case} {worst.output} max abs "
            f"{worst.max_abs:.3g}, err/tol {worst.max_ratio:.3g} > 1 (|engine - torch| <= "
            f"{self.atol:g} + {self.rtol:g} * |torch|)"
        )

    def __str__(self) -> str:
        lines = [
            f"verify {self.path} against PyTorch: passes where |engine - torch| <= "
            f"atol + rtol * |torch| (atol {self.atol:g}, rtol {self.rtol:g})"
        ]
        lines += [f"note: {note}" for note in self.notes]
        warning = self.vacuous_warning()
        if warning:
            lines.append(f"warning: {warning}")
        width = max([6, *(len(row.output) for row in self.rows)])
        header = (
            f"{'input':<28} {'output':<{width}} {'shape':<16} {'max abs':>10} {'err/tol':>10}  ok"
        )
        lines.append(header)
        for row in self.rows:
            shape = "x".join(str(d) for d in row.shape)
            lines.append(
                f"{row.case:<28} {row.output:<{width}} {shape:<16} {row.max_abs:>10.3g} "
                f"{row.max_ratio:>10.3g}  {'yes' if row.passed else 'NO'}"
            )
        lines.append("err/tol = max |engine - torch| / (atol + rtol * |torch|); ok where <= 1")
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
        rows.append(_comparison(case, names[index], ort_out, ref, atol, rtol))
    return rows


def _comparison(
    case: str, output: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float
) -> Comparison:
    """One check: passes where ``|got - want| <= atol + rtol * |want|`` everywhere, finite."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    magnitude = np.abs(want.astype(np.float64))
    allowed = atol + rtol * magnitude
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)  # allowed is 0 only with atol 0
    ratio = np.nan_to_num(ratio, nan=np.inf)  # a NaN output fails and shows as inf
    max_abs = float(diff.max()) if diff.size else 0.0
    max_ratio = float(ratio.max()) if diff.size else 0.0
    passed = bool(np.all(diff <= allowed)) and bool(np.isfinite(got).all())
    vacuous = bool(np.all(magnitude <= allowed))  # an all-zero output would pass as well
    return Comparison(case, output, tuple(want.shape), max_abs, max_ratio, passed, vacuous)


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
    recorded = read_record(path)
    atol, rtol, profile = _tolerance(recorded, atol, rtol)
    report = VerificationReport(Path(path), atol, rtol, engine=engine)
    report.notes.append(f"engine {engine}, export profile {profile}")
    _check_recipe(recorded, path, model)
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise VerificationError(
            f"{str(path)!r} takes {len(inputs)} inputs of rank "
            f"{[len(i.shape) for i in inputs]}; ibnify verifies single-image (NCHW) models"
        )
    batch_dim, channels, height, width = inputs[0].shape
    dynamic_size = not isinstance(height, int) or not isinstance(width, int)
    if not all(isinstance(d, int) for d in (channels, height, width)):
        size = recorded.input_size
        channels = channels if isinstance(channels, int) else size[0]
        height = height if isinstance(height, int) else size[1]
        width = width if isinstance(width, int) else size[2]
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
    warning = report.vacuous_warning()
    if warning:
        logger.warning("%s", warning)
    if raise_on_failure and not report.passed:
        raise VerificationError(report.failure_message())
    return report


def _tolerance(
    recorded: RecordedMetadata, atol: float | None, rtol: float | None
) -> tuple[float, float, str]:
    """(atol, rtol, profile): the given values, else the recorded export profile's tolerance."""
    profile = recorded.profile
    default_atol, default_rtol = PROFILE_TOLERANCES.get(profile, PROFILE_TOLERANCES["default"])
    return (
        default_atol if atol is None else float(atol),
        default_rtol if rtol is None else float(rtol),
        profile,
    )


def _second_size(size: int) -> int:
    """Another valid spatial size: three quarters, rounded down to a multiple of 32 (≥ 32)."""
    smaller = max(32, (size * 3 // 4) // 32 * 32)
    return smaller if smaller != size else size + 32


@dataclass(frozen=True)
class RecordedMetadata:
    """What an exported file records about itself, read once: the export profile, the input
    size, and the model's recipe (``ibnify.recipe``; older files: the last ``plan`` only)."""

    profile: str = "default"
    input_size: tuple[int, int, int] = (3, 224, 224)
    recipe: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None


def read_record(path: str | os.PathLike[str]) -> RecordedMetadata:
    """The file's :class:`RecordedMetadata`; unreadable or missing values keep the defaults."""
    try:
        stored = read_onnx_metadata(path)
    except Exception:  # unreadable metadata: the session already loaded the graph, go on
        return RecordedMetadata()
    return RecordedMetadata(
        profile=stored.get("profile", "default"),
        input_size=_size(stored.get("input_size", "")),
        recipe=_json_object(stored.get(RECIPE_KEY)),
        plan=_json_object(stored.get("plan")),
    )


def _size(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        return (3, 224, 224)
    return values if len(values) == 3 else (3, 224, 224)  # type: ignore[return-value]


def _json_object(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _conversions(source: Any, plans: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    """(source, [(layout, stages, ratio) per plan]): what must match between file and model."""
    plans = plans if isinstance(plans, list) else []
    steps = [
        (p.get("layout"), list(p.get("stages") or []), p.get("ratio"))
        for p in plans
        if isinstance(p, dict)
    ]
    return source, steps


def _check_recipe(
    recorded: RecordedMetadata, path: str | os.PathLike[str], model: nn.Module
) -> None:
    """Refuse a file whose recorded recipe names another model than ``model``'s recipe.

    The source and every plan's layout, stages and ratio must match (a file exported before
    the recipe was stored whole is compared on its last plan).
    """
    recipe = get_recipe(model)
    if recipe is None or recipe.plan is None:
        return
    mine = recipe.to_dict()
    ours = _conversions(recipe.label, mine["plans"])
    if recorded.recipe is not None:
        plans = recorded.recipe.get("plans")
        first = plans[0] if isinstance(plans, list) and plans and isinstance(plans[0], dict) else {}
        theirs = _conversions(recorded.recipe.get("source") or first.get("arch"), plans)
    elif recorded.plan is not None:
        theirs = _conversions(recorded.plan.get("arch"), [recorded.plan])
        ours = (recipe.plan.arch, ours[1][-1:])
    else:
        return
    if theirs != ours:
        what = "source" if theirs[0] != ours[0] else "conversion"
        raise VerificationError(
            f"{str(path)!r} was exported from {theirs[0]} ({_steps_text(theirs[1])}), but the "
            f"model is {ours[0]} ({_steps_text(ours[1])}); the {what} differs"
        )


def _steps_text(steps: list[tuple[Any, ...]]) -> str:
    parts = [f"layout {layout}, stages {stages_text(stages) or '-'}" for layout, stages, _ in steps]
    return " then ".join(parts) or "no conversion"
