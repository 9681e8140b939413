"""Which stages and ratio, measured: convert, fine-tune and evaluate candidate IBN layouts.

Every candidate layout (IBN-a on some stages at some ratio, or IBN-b) is converted from the same
base weights, fine-tuned with the same seed and schedule (:func:`ibnify.finetune`) and evaluated
clean and under the appearance shifts of :mod:`ibnify.evaluation`. A control — the unconverted
model fine-tuned identically — separates the effect of the IN halves from that of the extra
training. Finished candidates are recorded in ``OUT/results.jsonl`` and never rerun, so a search
can be interrupted and resumed, or widened later with more candidates.

This module runs the search; :mod:`ibnify.search_report` holds the results, their ranking and
output (table, JSON, Pareto plot, reproduce command), whose names are re-exported here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._io import atomic_write_bytes
from .._report import stage_range_text
from ..api import convert
from ..api import plan as make_plan
from ..core.generic import require_batchnorm
from ..core.graph import analyze
from ..data.images import ImageData
from ..data.shifts import parse_shifts
from ..errors import CheckpointError, IbnifyError, InvalidOptionError
from ..evaluation import evaluate
from ..models.checkpoint import save
from ..train.config import FinetuneConfig
from ..train.loop import finetune
from .divergence import analyze_divergence, check_same_classes
from .search_report import CONTROL_NAME, FORMAT, RANK_RULE, CandidateResult, SearchReport

__all__ = [
    "RANK_RULE",
    "RESULTS_FILE",
    "Candidate",
    "CandidateResult",
    "SearchReport",
    "auto_candidates",
    "parse_candidates",
    "search_placement",
]

RESULTS_FILE = "results.jsonl"


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
    :func:`ibnify.analyze_divergence` suggests on ``val_data``, and IBN-b where the family has it.
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


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _settings(
    model: nn.Module, train: ImageData, val: ImageData, config: FinetuneConfig, shifts: list[str]
) -> dict[str, Any]:
    tune = {
        k: getattr(config, k)
        for k in ("epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay",
                  "decay_norm_and_bias", "decay_in_affine", "warmup_epochs", "min_lr", "seed")
    }  # fmt: skip
    return {
        "base_weights": _weights_digest(model),
        "train": f"{train.name} ({len(train)} images)",
        "val": f"{val.name} ({len(val)} images)",
        "shifts": shifts,
        "finetune": tune,
    }


def _read_results(out: Path, settings: dict[str, Any], force: bool) -> dict[str, CandidateResult]:
    """Finished candidates recorded in ``out/results.jsonl`` (checked against ``settings``)."""
    path = out / RESULTS_FILE
    if force or not path.exists():
        return {}
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        recorded = lines[0]["settings"]
        results = [CandidateResult(**line["result"]) for line in lines[1:]]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is damaged ({exc}); pass --force to start over"
        ) from exc
    if recorded != settings:
        changed = sorted(k for k in settings if recorded.get(k) != settings[k])
        raise InvalidOptionError(
            f"{str(out)!r} holds a search with other settings (differs in: {', '.join(changed)}); "
            "pass --force to start over or choose another --out"
        )
    return {r.name: r for r in results}


def _write_results(
    out: Path, settings: dict[str, Any], results: dict[str, CandidateResult]
) -> None:
    lines = [json.dumps({"format": FORMAT, "settings": settings})]
    lines += [json.dumps({"result": asdict(r)}) for r in results.values()]
    atomic_write_bytes(out / RESULTS_FILE, ("\n".join(lines) + "\n").encode())


@dataclass
class _Search:
    """The fixed inputs of one search: base model, data, schedule, where results go."""

    model: nn.Module
    train: ImageData
    val: ImageData
    config: FinetuneConfig
    shifts: list[str]
    out: Path | None
    arch: str | None
    model_kwargs: dict[str, Any] | None
    say: Callable[[str], None]

    def run(self, candidate: Candidate) -> CandidateResult:
        """Convert (unless control), fine-tune, evaluate, save the checkpoint."""
        started = time.perf_counter()
        if candidate == CONTROL:
            model = copy.deepcopy(self.model)
        else:
            model = convert(
                self.model,
                layout=candidate.layout,
                stages=candidate.stages or None,
                ratio=candidate.ratio,
                input_size=tuple(self.val.dataset[0][0].shape),  # type: ignore[arg-type]
                arch=self.arch,
                model_kwargs=self.model_kwargs,
            )
        finetune(model, self.train, self.config)
        # noise seed 0, as `ibnify evaluate` and the demo use: the same table for the same model
        report = evaluate({"m": model}, self.val, shifts=self.shifts, seed=0, device="cpu")
        checkpoint = None
        if self.out is not None and candidate != CONTROL:
            folder = self.out / "candidates"
            folder.mkdir(exist_ok=True)
            checkpoint = str(save(model, folder / f"{candidate.slug}.safetensors"))
        return CandidateResult(
            name=candidate.name,
            layout=candidate.layout,
            stages=list(candidate.stages),
            ratio=candidate.ratio,
            accuracy=dict(report.accuracy["m"]),
            seconds=round(time.perf_counter() - started, 3),
            checkpoint=checkpoint,
        )


def search_placement(
    model: nn.Module,
    train_data: ImageData,
    val_data: ImageData,
    *,
    candidates: str | Sequence[Candidate] = "auto",
    config: FinetuneConfig | None = None,
    shifts: str | Sequence[str] | None = "all",
    budget_min: float | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
) -> SearchReport:
    """Try candidate IBN layouts on ``model`` and rank them by accuracy under appearance shift.

    Args:
        model: the unconverted, trained base model (left untouched).
        train_data: labelled training images for the fine-tune (same for every candidate).
        val_data: labelled images for the clean and shifted evaluation.
        candidates: ``"auto"`` (:func:`auto_candidates`), a ``--candidates`` string, or a list.
        config: the fine-tune schedule and seed (:class:`ibnify.train.FinetuneConfig`), used
            unchanged for every candidate and the control.
        shifts: shifts to evaluate under (default all).
        budget_min: stop starting candidates once elapsed time plus the estimated time of the
            next one (mean of the runs so far) would exceed this many minutes.
        out_dir: where ``results.jsonl``, ``candidates/*.safetensors``, ``best.safetensors``,
            ``report.json`` and ``pareto.png`` go; finished candidates recorded there are reused.
        force: discard the results recorded in ``out_dir``.
        arch, model_kwargs: recorded in the candidates' checkpoints so ``ibnify.load`` can
            rebuild them (``source:name`` and constructor arguments of the base model).
        echo: called with one progress line per step.
    """
    say = echo or (lambda _line: None)
    config = copy.deepcopy(config or FinetuneConfig(quiet=True))
    config.out_dir, config.resume = None, False
    config.validate()
    require_batchnorm(model, arch or type(model).__name__)
    shift_names = list(parse_shifts(shifts))
    check_same_classes(train_data, val_data, "training and validation folders")
    if not train_data.labelled or not val_data.labelled:
        raise InvalidOptionError("search needs labelled training and validation data")
    chosen = _choose_candidates(candidates, model, val_data, shift_names, config.seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    settings = _settings(model, train_data, val_data, config, shift_names)
    done = _read_results(out, settings, force) if out is not None else {}
    search = _Search(model, train_data, val_data, config, shift_names, out, arch, model_kwargs, say)
    report = SearchReport([], shift_names, settings)
    _run_all(search, [CONTROL, *chosen], done, report, budget_min)
    if out is not None:
        _write_outputs(out, report)
    return report


def _choose_candidates(
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


def _run_all(
    search: _Search,
    queue: list[Candidate],
    done: dict[str, CandidateResult],
    report: SearchReport,
    budget_min: float | None,
) -> None:
    """Run (or reuse) each candidate in order, respecting the time budget."""
    started = time.perf_counter()
    total = len(queue)
    for index, candidate in enumerate(queue, start=1):
        if candidate.name in done:
            report.results.append(done[candidate.name])
            report.reused.append(candidate.name)
            search.say(f"candidate {index} of {total}: {candidate.name} (finished earlier, reused)")
            continue
        timings = [r.seconds for r in done.values()]
        estimate = sum(timings) / len(timings) if timings else 0.0
        elapsed = time.perf_counter() - started
        if budget_min is not None and timings and elapsed + estimate > 60 * budget_min:
            report.not_run = [c.name for c in queue[index - 1 :] if c.name not in done]
            report.stopped = (
                f"budget: stopped before candidate {index} of {total} ({candidate.name}); "
                f"{elapsed / 60:.1f} min spent and about {estimate / 60:.1f} min per candidate "
                f"would exceed --budget-min {budget_min:g}; not run: {', '.join(report.not_run)} "
                "(rerun with a larger budget: finished candidates are kept)"
            )
            search.say(report.stopped)
            break
        search.say(f"candidate {index} of {total}: {candidate.name} ...")
        result = search.run(candidate)
        done[candidate.name] = result
        report.results.append(result)
        if search.out is not None:
            _write_results(search.out, report.settings, done)
        search.say(
            f"candidate {index} of {total}: {candidate.name} done in {result.seconds:.1f} s: "
            f"clean {100 * result.clean:.1f}%, mean drop {100 * result.mean_drop:.1f} points"
        )


def _write_outputs(out: Path, report: SearchReport) -> None:
    """report.json, pareto.png and best.safetensors (a copy of the winner's checkpoint)."""
    report.files["results"] = out / RESULTS_FILE
    winner = report.winner
    if winner is not None and winner.checkpoint and Path(winner.checkpoint).is_file():
        best = out / "best.safetensors"
        report.files["best"] = atomic_write_bytes(best, Path(winner.checkpoint).read_bytes())
    if report.results:
        report.files["plot"] = report.plot(out / "pareto.png")
    report.files["report"] = atomic_write_bytes(
        out / "report.json", (report.to_json() + "\n").encode()
    )
