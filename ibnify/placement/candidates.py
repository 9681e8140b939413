"""The layouts a search tries: ``--candidates`` syntax, the automatic list, a plan for each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .._report import stage_range_text
from ..api import plan as make_plan
from ..core.graph import analyze
from ..data.images import ImageData
from ..errors import IbnifyError, InvalidOptionError
from .divergence import (
    analyze_divergence,
)
from .search_report import (
    CONTROL_NAME,
)

__all__ = ["CONTROL", "Candidate", "auto_candidates", "choose_candidates", "parse_candidates"]


@dataclass(frozen=True)
class Candidate:
    """One layout to try: ``layout`` ``"a"``/``"b"`` (or ``"control"``), stages, IN ratio."""

    layout: str
    stages: tuple[int, ...] = ()
    ratio: float | None = None

    @property
    def name(self) -> str:
        """``a:1-2``, ``a:1-2@0.25``, ``b`` or ``control``: the ``--candidates`` syntax."""
        if self.layout != "a":
            return self.layout
        text = f"a:{stage_range_text(self.stages)}"
        return text if self.ratio is None else f"{text}@{self.ratio:g}"

    @property
    def slug(self) -> str:
        """A file-name-safe form of :attr:`name`."""
        return self.name.replace(":", "_").replace(",", "+").replace("@", "_r")


CONTROL = Candidate(CONTROL_NAME)


def _parse_stage_list(text: str, item: str) -> tuple[int, ...]:
    stages: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if first < 1 or last < first:
                raise ValueError
            stages.extend(range(first, last + 1))
    except ValueError:
        raise InvalidOptionError(
            f"candidate {item!r}: {text!r} is not a stage list like 1-2 or 1,3"
        ) from None
    return tuple(dict.fromkeys(stages))


def parse_candidates(spec: str) -> list[Candidate]:
    """``"a:1;a:1-2;a:1-3;a:1-2@0.25;b"`` → candidates (``;``-separated, duplicates dropped).

    Raises:
        InvalidOptionError: an item that is not ``b`` or ``a:STAGES[@RATIO]``, a ratio outside
            (0, 1), or an empty list.
    """
    found: dict[str, Candidate] = {}
    for raw in spec.split(";"):
        item = raw.strip().lower()
        if not item:
            continue
        if item == "b":
            candidate = Candidate("b")
        elif item.startswith("a:"):
            body, _, ratio_text = item[2:].partition("@")
            ratio = None
            if ratio_text:
                try:
                    ratio = float(ratio_text)
                except ValueError:
                    ratio = -1.0
                if not 0.0 < ratio < 1.0:
                    raise InvalidOptionError(
                        f"candidate {item!r}: ratio {ratio_text!r} is not strictly between 0 and 1"
                    )
            candidate = Candidate("a", _parse_stage_list(body, item), ratio)
        else:
            raise InvalidOptionError(
                f"unknown candidate {raw.strip()!r}; write a:STAGES[@RATIO] or b, separated by "
                "';' (e.g. \"a:1;a:1-2;a:1-2@0.25;b\"), or auto"
            )
        found.setdefault(candidate.name, candidate)
    if not found:
        raise InvalidOptionError("the candidate list is empty")
    return list(found.values())


def _has_layout_b(model: nn.Module, input_size: tuple[int, int, int]) -> bool:
    try:
        make_plan(model, layout="b", input_size=input_size)
    except IbnifyError:
        return False
    return True


def auto_candidates(
    model: nn.Module,
    val_data: ImageData,
    shifts: str | Sequence[str] | None = "all",
    seed: int = 0,
) -> list[Candidate]:
    """The default list: IBN-a on stages 1, 1-2, 1-3 (never the last stage), the stages
    :func:`ibnify.analyze` suggests on ``val_data``, and IBN-b where the family has it.
    """
    input_size = tuple(val_data.dataset[0][0].shape)
    stages = analyze(model, input_size, fallback=True).num_stages  # type: ignore[arg-type]
    found = [Candidate("a", tuple(range(1, k + 1))) for k in range(1, min(3, stages - 1) + 1)]
    if not found:
        found = [Candidate("a", (1,))]
    report = analyze_divergence(model, val_data, shifts=shifts, images=128, seed=seed)
    suggested = Candidate("a", report.suggested_stages)
    if report.suggested_stages and suggested not in found:
        found.append(suggested)
    if _has_layout_b(model, input_size):  # type: ignore[arg-type]
        found.append(Candidate("b"))
    return found


def choose_candidates(
    candidates: str | Sequence[Candidate],
    model: nn.Module,
    val_data: ImageData,
    shifts: list[str],
    seed: int,
) -> list[Candidate]:
    """The candidate list (``"auto"``, a ``--candidates`` string or a list), every one planned."""
    if isinstance(candidates, str):
        chosen = (
            auto_candidates(model, val_data, shifts, seed)
            if candidates.strip().lower() == "auto"
            else parse_candidates(candidates)
        )
    else:
        chosen = list(candidates)
    _check_candidates(model, chosen, tuple(val_data.dataset[0][0].shape))  # type: ignore[arg-type]
    return chosen


def _check_candidates(
    model: nn.Module, candidates: Sequence[Candidate], input_size: tuple[int, int, int]
) -> None:
    """Plan every candidate before any training, so a bad one fails in seconds, not hours."""
    for candidate in candidates:
        try:
            make_plan(
                model,
                layout=candidate.layout,
                stages=candidate.stages or None,
                ratio=candidate.ratio,
                input_size=input_size,
            )
        except IbnifyError as exc:
            raise type(exc)(f"candidate {candidate.name}: {exc}") from exc
