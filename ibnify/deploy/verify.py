"""Verification: onnxruntime (or OpenVINO) against PyTorch on random and real inputs."""

from __future__ import annotations

import copy
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

from ..constants import ENGINES
from ..core.plans import as_input_size, stages_text
from ..core.recipe import KwargsCheck, Recipe, get_recipe
from ..data.images import data_config, load_images
from ..errors import InvalidOptionError, VerificationError, first_line
from .engines import open_engine
from .export import PROFILE_TOLERANCES, options_from
from .record import InputShape, RecordedMetadata, input_shape, read_record

logger = logging.getLogger(__name__)

__all__ = [
    "Comparison",
    "RecordedMetadata",
    "VerificationReport",
    "VerifyOptions",
    "read_record",
    "verify_onnx",
]


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


@dataclass(frozen=True)
class VerifyOptions:
    """How :func:`verify_onnx` checks a file: the options as one record (the CLI builds one).

    Attributes:
        batch_sizes: random normal batches of each size (a static-batch file: its own only).
        atol, rtol: the tolerance; default: the recorded export profile's (fp32 1e-4, 1e-3).
        images: a folder of real images to check too (up to 8).
        skip_bad_images: leave the unreadable images of ``images`` out instead of refusing them.
        raise_on_failure: raise VerificationError when an output differs beyond tolerance.
        seed: the random inputs' seed.
        engine: ``onnxruntime`` or ``openvino``.
        input_size: the size to run a dynamic-size file at (224, (160, 224) or (3, 224, 224));
            default: the size the file records, else the graph's fixed shape.
        check_kwargs: the check of the recorded recipe's constructor arguments (``ibnify
            verify`` passes the model registry's allowlist); default: their form only.
    """

    batch_sizes: Sequence[int] = (1, 3)
    atol: float | None = None
    rtol: float | None = None
    images: str | os.PathLike[str] | None = None
    raise_on_failure: bool = True
    seed: int = 0
    engine: str = "onnxruntime"
    input_size: int | str | Sequence[int] | None = None
    check_kwargs: KwargsCheck | None = None
    skip_bad_images: bool = False

    def validate(self) -> VerifyOptions:
        """Return the options, or raise InvalidOptionError in one line before any file is read."""
        sizes = list(self.batch_sizes)
        if not sizes or not all(_whole(b) and b >= 1 for b in sizes):
            raise InvalidOptionError(f"`batch_sizes` must be whole numbers ≥ 1, got {sizes}")
        for name, value in (("atol", self.atol), ("rtol", self.rtol)):
            if value is not None and not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise InvalidOptionError(f"`{name}` must be a number ≥ 0, got {value!r}")
        if self.engine not in ENGINES:
            raise InvalidOptionError(f"`engine` {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.input_size is not None:
            as_input_size(self.input_size)
        if self.images is not None and not Path(self.images).is_dir():
            raise InvalidOptionError(f"`images` folder {str(self.images)!r} does not exist")
        return self


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    options: VerifyOptions | None = None,
    **keywords: Any,
) -> VerificationReport:
    """Run the ONNX file (in ``engine``) and PyTorch on the same inputs and compare every output.

    ``options``: a :class:`VerifyOptions`, or its fields as keywords
    (``verify_onnx(path, model, batch_sizes=(1, 3))``), not both. ``atol``/``rtol`` default to
    the tolerance of the export profile recorded in the file's metadata (``ibnify.profile``).

    Inputs: random normal batches of each size in ``batch_sizes`` at the size the report's
    ``input`` note names (``input_size``, else the size the file records, else the graph's
    fixed shape), one batch at a second spatial size where the file's spatial axes are
    dynamic, and the images under ``images`` when given.

    Raises:
        InvalidOptionError: a bad option, or a dynamic-size file that records no size and got
            no ``input_size``.
        VerificationError: the file is missing, corrupt, from another model, its recipe is
            damaged, or (with ``raise_on_failure``) an output differs beyond tolerance.
    """
    chosen = options_from(VerifyOptions, options, keywords, "verify_onnx").validate()
    session = open_engine(path, chosen.engine)
    recorded = read_record(path, chosen.check_kwargs)
    atol, rtol, profile = _tolerance(recorded, chosen.atol, chosen.rtol)
    report = VerificationReport(Path(path), atol, rtol, engine=chosen.engine)
    report.notes.append(f"engine {chosen.engine}, export profile {profile}")
    _check_recipe(recorded, path, model)
    batch_dim, shape, dynamic = _file_input(session, path, chosen.input_size, recorded)
    report.notes.append(str(shape))
    sizes = [int(b) for b in chosen.batch_sizes]
    if isinstance(batch_dim, int):
        report.notes.append(f"the file has a static batch of {batch_dim}; checking only that")
        sizes = [batch_dim]
    model = copy.deepcopy(model).eval().float().cpu()
    cases = _random_cases(shape.size, sizes, dynamic, chosen.seed)
    if dynamic:
        second = cases[-1][1].shape[2:]
        report.notes.append(
            f"spatial axes are dynamic; checking {shape.size[1]}x{shape.size[2]} and "
            f"{second[0]}x{second[1]}"
        )
    if chosen.images is not None:
        cases.append(_image_case(chosen, model, shape.size, batch_dim))
    for case, x in cases:
        report.rows += _compare(session, model, x, case, atol, rtol)
    logger.info("%s", report)
    warning = report.vacuous_warning()
    if warning:
        logger.warning("%s", warning)
    if chosen.raise_on_failure and not report.passed:
        raise VerificationError(report.failure_message())
    return report


def _file_input(
    session: Any, path: str | os.PathLike[str], given: Any, recorded: RecordedMetadata
) -> tuple[Any, InputShape, bool]:
    """(batch axis, the size to check at, whether height/width are dynamic) of the one NCHW
    input; a file with other inputs is refused."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise VerificationError(
            f"{str(path)!r} takes {len(inputs)} inputs of rank "
            f"{[len(i.shape) for i in inputs]}; ibnify verifies single-image (NCHW) models"
        )
    dims = inputs[0].shape
    dynamic = not all(isinstance(d, int) for d in dims[2:])
    return dims[0], input_shape(path, dims, given, recorded), dynamic


def _random_cases(
    size: tuple[int, ...], batches: list[int], dynamic: bool, seed: int
) -> list[tuple[str, torch.Tensor]]:
    """Random normal batches at ``size``, and one at a second spatial size when it is dynamic."""
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = size
    cases = [
        (f"random batch {b}", torch.randn(b, channels, height, width, generator=generator))
        for b in batches
    ]
    if dynamic:
        second = (_second_size(height), _second_size(width))
        x = torch.randn(batches[-1], channels, *second, generator=generator)
        cases.append((f"random batch {batches[-1]} {second[0]}x{second[1]}", x))
    return cases


def _image_case(
    chosen: VerifyOptions, model: nn.Module, size: tuple[int, ...], batch_dim: Any
) -> tuple[str, torch.Tensor]:
    """Up to 8 real images (one for a batch-1 file), normalised as the model expects; a static
    batch is filled by repeating them."""
    config = data_config(model)  # the model's own normalisation (timm cfg, else ImageNet)
    limit = 8 if batch_dim != 1 else 1
    batch = load_images(
        chosen.images,  # type: ignore[arg-type]  # only called with a folder
        size[1:],
        limit=limit,
        mean=config["mean"],
        std=config["std"],
        skip_bad_images=chosen.skip_bad_images,
    )
    if isinstance(batch_dim, int):
        batch = batch[:batch_dim]
        if batch.shape[0] < batch_dim:
            batch = batch.repeat((batch_dim + batch.shape[0] - 1) // batch.shape[0], 1, 1, 1)
            batch = batch[:batch_dim]
    return f"images batch {batch.shape[0]}", batch


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


def _steps(recipe: Recipe) -> list[tuple[Any, ...]]:
    """[(layout, stages, ratio) per plan]: what must match between file and model."""
    return [(p.layout, list(p.stages), p.ratio) for p in recipe.plans]


def _check_recipe(
    recorded: RecordedMetadata, path: str | os.PathLike[str], model: nn.Module
) -> None:
    """Refuse a file whose recorded recipe names another model than ``model``'s recipe.

    The source and every plan's layout, stages and ratio must match (a file exported before
    the recipe was stored whole is compared on its last plan).
    """
    recipe = get_recipe(model)
    if recipe is None or recorded.recipe is None:
        return
    ours = (recipe.label, _steps(recipe))
    theirs = (recorded.recipe.label, _steps(recorded.recipe))
    if not recorded.whole and recipe.plan is not None:
        ours = (recipe.plan.arch, ours[1][-1:])
        theirs = (recorded.recipe.plan.arch, theirs[1])  # type: ignore[union-attr]
    if theirs != ours:
        what = "source" if theirs[0] != ours[0] else "conversion"
        raise VerificationError(
            f"{str(path)!r} was exported from {theirs[0]} ({_steps_text(theirs[1])}), but the "
            f"model is {ours[0]} ({_steps_text(ours[1])}); the {what} differs"
        )


def _steps_text(steps: list[tuple[Any, ...]]) -> str:
    parts = [f"layout {layout}, stages {stages_text(stages) or '-'}" for layout, stages, _ in steps]
    return " then ".join(parts) or "no conversion"
