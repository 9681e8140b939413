"""Coverage sweep: convert every BatchNorm classifier in timm and torchvision with the IBN-a rule.

Steps per model: build on the ``meta`` device to count parameters and look for BatchNorm cheaply;
skip models without BatchNorm or above ``--max-params``; build the rest with random weights, find
a small valid input size, ``ibnify.plan`` + apply (timed), then run the converted model forward in
train and eval mode and check the output shape. Results go to ``benchmarks/zoo_results.jsonl``
(one line per model, so a sweep can be resumed) and ``benchmarks/ZOO.md``.

Models run in a worker subprocess with a per-model timeout; a crash or timeout restarts the worker
and is recorded as a failure of that model.

    python benchmarks/zoo_sweep.py --budget-min 60            # as much as fits in an hour
    python benchmarks/zoo_sweep.py --families resnet,efficientnet --limit 20
    python benchmarks/zoo_sweep.py --report-only              # rewrite ZOO.md from the results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import selectors
import shlex
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "zoo_results.jsonl"
SCAN = HERE / "zoo_scan.json"
RUNS = HERE / "zoo_runs.log"  # the commands whose results zoo_results.jsonl holds
REPORT = HERE / "ZOO.md"
CANDIDATE_SIZES = (64, 96, 128, 160, 224, 299)
DEFAULT_MAX_PARAMS = 60_000_000


# --------------------------------------------------------------------------- enumeration


def _torchvision_models() -> list[tuple[str, str]]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    out = []
    for name in names:
        module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        out.append((f"tv:{name}", f"tv.{module}"))
    return out


def _timm_models() -> list[tuple[str, str]]:
    import timm

    family: dict[str, str] = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            family[name] = module
    return [(f"timm:{name}", family.get(name, "other")) for name in timm.list_models()]


def _build(model_id: str, device: str | None = None):
    import torch

    source, _, name = model_id.partition(":")
    context = torch.device(device) if device else _nullcontext()
    with context:
        if source == "tv":
            import torchvision

            return torchvision.models.get_model(name, weights=None)
        import timm

        return timm.create_model(name, pretrained=False)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def scan(models: list[tuple[str, str]], cache: dict) -> dict:
    """{model: {family, params, batchnorm, note}} from meta-device builds (cached)."""
    from torch import nn

    for model_id, family in models:
        if model_id in cache:
            continue
        entry = {"family": family}
        try:
            model = _build(model_id, device="meta")
            entry["params"] = sum(p.numel() for p in model.parameters())
            entry["batchnorm"] = any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
            )
            del model
        except Exception as exc:  # a meta build can fail (e.g. .item() in __init__)
            entry["params"] = None
            entry["batchnorm"] = None
            entry["note"] = f"meta build failed: {type(exc).__name__}: {_line(exc)}"
        cache[model_id] = entry
    return cache


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# --------------------------------------------------------------------------- one model


def run_one(model_id: str, max_params: float = DEFAULT_MAX_PARAMS) -> dict:
    """Build, plan, convert and run one model; return a result record (never raises)."""
    import torch

    from ibnify.api import plan as make_plan
    from ibnify.core.surgery import apply_plan
    from ibnify.errors import IbnifyError

    record: dict = {"model": model_id}
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = _build(model_id)
        record["params"] = sum(p.numel() for p in model.parameters())
        if record["params"] > max_params:  # its meta build failed, so the size was unknown
            record.update(status="too_big", reason="above the size limit (counted after build)")
            return record
        size = _input_size(model)
        record["input"] = size
        if size is None:
            record.update(status="skipped", reason="no input size in 64-224 px runs the model")
            return record
        x = torch.randn(2, 3, size, size)
        model.eval()
        with torch.no_grad():
            reference = model(x)
        t0 = time.perf_counter()
        try:
            plan = make_plan(model, input_size=(3, size, size))
            converted = apply_plan(model, plan)
        except IbnifyError as exc:
            record.update(status="refused", reason=f"{type(exc).__name__}: {_line(exc)}")
            return record
        record["convert_s"] = round(time.perf_counter() - t0, 3)
        record["layout"] = plan.layout
        record["stages"] = list(plan.stages)
        record["sites"] = {str(k): v for k, v in plan.sites_per_stage().items()}
        record["rules"] = dict(Counter(site.rule.split(":")[0] for site in plan.sites))
        record["skipped"] = len(plan.skipped)
        same_params = sum(p.numel() for p in converted.parameters()) == record["params"]
        converted.train()
        out_train = converted(x)
        converted.eval()
        with torch.no_grad():
            out_eval = converted(x)
        shapes_ok = _shapes(out_eval) == _shapes(reference) and _shapes(out_train) is not None
        finite = all(torch.isfinite(t).all().item() for t in _tensors(out_eval))
        if not (shapes_ok and finite):
            record.update(status="failed", reason=f"output shape/finite check failed ({size}px)")
        else:
            record["status"] = "converted"
            if not same_params:
                record["note"] = "parameter count changed"
    except Exception as exc:
        record.update(status="failed", reason=f"{type(exc).__name__}: {_line(exc)}")
        record["trace"] = traceback.format_exc(limit=3)[-600:]
    finally:
        record["total_s"] = round(time.perf_counter() - started, 2)
        gc.collect()
    return record


def _input_size(model) -> int | None:
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = cfg.get("input_size", (3, 224, 224))[-1] if isinstance(cfg, dict) else 224
    fixed = cfg.get("fixed_input_size", False) if isinstance(cfg, dict) else False
    sizes = (default,) if fixed else (*CANDIDATE_SIZES, default)
    for size in sizes:
        try:  # both modes: some heads (Inception's aux logits) only run in train mode
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, size, size))
                model.train()(torch.randn(2, 3, size, size))
            return int(size)
        except Exception:
            continue
        finally:
            model.eval()
    return None


def _tensors(output) -> list:
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def _shapes(output) -> list | None:
    tensors = _tensors(output)
    return [tuple(t.shape) for t in tensors] if tensors else None


def worker() -> None:
    """Read model ids from stdin, write one JSON record per line to stdout."""
    import torch

    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    import warnings

    warnings.filterwarnings("ignore")
    out = sys.stdout
    sys.stdout = sys.stderr  # keep model prints out of the protocol
    max_params = float(os.environ.get("ZOO_MAX_PARAMS", DEFAULT_MAX_PARAMS))
    for line in sys.stdin:
        model_id = line.strip()
        if model_id:
            out.write(json.dumps(run_one(model_id, max_params)) + "\n")
            out.flush()


# --------------------------------------------------------------------------- driver


class Worker:
    """A worker subprocess; restarted after a timeout or a crash."""

    def __init__(self, max_params: float) -> None:
        self.proc: subprocess.Popen | None = None
        self.max_params = max_params

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", ZOO_MAX_PARAMS=str(self.max_params))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def run(self, model_id: str, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(model_id + "\n")
        self.proc.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
        selector.close()
        if not ready:
            self.stop()
            return {"model": model_id, "status": "failed", "reason": f"timeout after {timeout}s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.poll()
            self.stop()
            return {"model": model_id, "status": "failed", "reason": f"worker died (exit {code})"}
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _load_results() -> dict[str, dict]:
    results = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                results[record["model"]] = record
    return results


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", choices=("all", "timm", "tv"), default="all")
    parser.add_argument("--families", help="comma-separated families (timm module / tv.module)")
    parser.add_argument("--models", help="comma-separated model ids (tv:NAME, timm:NAME)")
    parser.add_argument("--limit", type=int, help="at most this many models to run")
    parser.add_argument("--max-params", type=float, default=DEFAULT_MAX_PARAMS)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per model")
    parser.add_argument("--budget-min", type=float, help="stop starting models after this")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results")
    parser.add_argument("--retry", help="comma-separated statuses to run again (failed,refused)")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def _selected(
    every_model: list[tuple[str, str]], args: argparse.Namespace
) -> list[tuple[str, str]]:
    """The ``(model id, family)`` pairs ``--source``, ``--families`` and ``--models`` choose."""
    models = [m for m in every_model if args.source == "all" or m[0].startswith(args.source)]
    if args.families:
        wanted = set(args.families.split(","))
        models = [m for m in models if m[1] in wanted]
    if args.models:
        wanted = set(args.models.split(","))
        models = [m for m in models if m[0] in wanted]
    return models


def _earlier_results(args: argparse.Namespace) -> dict[str, dict]:
    """The results this sweep resumes from: none with ``--fresh`` (whose files are removed),
    else the recorded ones less the statuses ``--retry`` names."""
    results = {} if args.fresh else _load_results()
    if args.retry:
        again = set(args.retry.split(","))
        results = {m: r for m, r in results.items() if r["status"] not in again}
    if args.fresh:
        RESULTS.unlink(missing_ok=True)
        RUNS.unlink(missing_ok=True)
    return results


def _todo(
    models: list[tuple[str, str]], cache: dict, results: dict, args: argparse.Namespace
) -> list[str]:
    """The models to run: not done yet, with BatchNorm, within ``--max-params``; small ones
    first (the most coverage per minute), at most ``--limit``."""
    todo = [
        m
        for m, _ in models
        if m not in results
        and cache.get(m, {}).get("batchnorm") is not False
        and (cache.get(m, {}).get("params") or 0) <= args.max_params
    ]
    todo.sort(key=lambda m: (cache.get(m, {}).get("params") or 10**12, m))
    return todo if args.limit is None else todo[: args.limit]


def _sweep(todo: list[str], results: dict, args: argparse.Namespace) -> None:
    """Run each model in the worker until ``--budget-min`` is spent; every record is appended
    to RESULTS as it comes (a sweep resumes from there) and put into ``results``."""
    deadline = time.time() + 60 * args.budget_min if args.budget_min else None
    pool = Worker(args.max_params)
    try:
        with RESULTS.open("a") as sink:
            for i, model_id in enumerate(todo, 1):
                if deadline is not None and time.time() > deadline:
                    print("time budget reached", flush=True)
                    break
                record = pool.run(model_id, args.timeout)
                results[model_id] = record
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                print(
                    f"[{i}/{len(todo)}] {model_id}: {record['status']} {record.get('reason', '')}",
                    flush=True,
                )
    finally:
        pool.stop()


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    if args.worker:
        worker()
        return
    command = shlex.join(
        ["python", "benchmarks/zoo_sweep.py", *(argv if argv is not None else sys.argv[1:])]
    )
    every_model = _torchvision_models() + _timm_models()  # the report always covers them all
    models = _selected(every_model, args)
    cache = json.loads(SCAN.read_text()) if SCAN.exists() else {}
    if not args.report_only:
        print(f"scanning {len(models)} models on the meta device ...", flush=True)
        scan(models, cache)
        SCAN.write_text(json.dumps(cache, indent=0, sort_keys=True))
    results = _earlier_results(args)
    if not args.report_only:
        with RUNS.open("a") as runs:
            runs.write(command + "\n")
        _sweep(_todo(models, cache, results, args), results, args)
    write_report(every_model, cache, results, args)


# --------------------------------------------------------------------------- report


def _family_counts(
    models: list[tuple[str, str]], cache: dict, results: dict, limit: float
) -> tuple[Counter, list[str], dict[str, list[str]]]:
    """(totals, one table row per family, the detail rows of the models tried per family)."""
    by_family: dict[str, list[str]] = defaultdict(list)
    for model_id, family in models:
        by_family[family].append(model_id)
    totals = Counter()
    family_rows = []
    detail: dict[str, list[str]] = defaultdict(list)
    for family in sorted(by_family):
        counts = Counter()
        for model_id in by_family[family]:
            entry = cache.get(model_id, {})
            record = results.get(model_id)
            if entry.get("batchnorm") is False:
                counts["no_bn"] += 1
            elif record is not None and record["status"] == "too_big":
                counts["too_big"] += 1
            elif record is not None:
                counts[record["status"]] += 1
                counts["tried"] += 1
                detail[family].append(_detail_row(model_id, record))
            elif (entry.get("params") or 0) > limit:
                counts["too_big"] += 1
            else:
                counts["not_run"] += 1
        totals.update(counts)
        family_rows.append(
            f"| {family} | {len(by_family[family])} | {counts['no_bn']} | {counts['too_big']} | "
            f"{counts['not_run']} | {counts['tried']} | {counts['converted']} | "
            f"{counts['refused']} | {counts['failed']} | {counts['skipped']} |"
        )
    return totals, family_rows, detail


def _method_lines(commands: list[str], limit: float) -> list[str]:
    """The report's head: the commands that ran, the machine and versions, the method."""
    import timm
    import torch
    import torchvision

    return [
        "# Zoo coverage: the generic IBN-a rule over timm and torchvision",
        "",
        "Commands, in the order they ran (each resumes from `benchmarks/zoo_results.jsonl`; "
        "`--report-only` rewrites this file from it):",
        "",
        *(f"    {c}" for c in commands),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, one torch thread per model; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
        f"{timm.__version__}. Random weights (no downloads).",
        "",
        "Per model: build on the `meta` device (parameter count, BatchNorm present?); models "
        f"above {limit / 1e6:.0f}M parameters (the largest `--max-params` above) are not run; "
        "the rest are built with "
        "random weights, run at the smallest input size from "
        f"{', '.join(map(str, CANDIDATE_SIZES))} px (or their fixed size) that the original "
        "accepts, planned with `ibnify.plan` (default layout `a`, default stages) and "
        "converted; the converted model must run forward in train mode and in eval mode "
        "(batch 2) with the original's output shapes and finite outputs.",
    ]


def _coverage_lines(models: list[tuple[str, str]], totals: Counter, results: dict) -> list[str]:
    """The coverage summary: what was enumerated, skipped, tried and converted."""
    tried = totals["tried"]
    rate = 100.0 * totals["converted"] / tried if tried else 0.0
    times = sorted(r["convert_s"] for r in results.values() if "convert_s" in r)
    median = times[len(times) // 2] if times else 0.0
    return [
        "## Coverage",
        "",
        f"- architectures enumerated: {len(models)} "
        f"({sum(1 for m in models if m[0].startswith('tv:'))} torchvision, "
        f"{sum(1 for m in models if m[0].startswith('timm:'))} timm)",
        f"- without BatchNorm (not applicable): {totals['no_bn']}",
        f"- with BatchNorm, above the size limit: {totals['too_big']}",
        f"- with BatchNorm, not reached in this run: {totals['not_run']}",
        f"- **tried: {tried}; converted and ran: {totals['converted']} ({rate:.1f}%)**; "
        f"refused with a clear error: {totals['refused']}; failed: {totals['failed']}; "
        f"skipped (no valid input size): {totals['skipped']}",
        f"- median plan+convert time: {median:.2f} s",
    ]


def write_report(
    models: list[tuple[str, str]], cache: dict, results: dict, args: argparse.Namespace
) -> None:
    """Write ZOO.md: coverage summary, per-family table, every failure and refusal."""
    commands = RUNS.read_text().splitlines() if RUNS.exists() else []
    limit = max((_max_params_of(c) for c in commands), default=args.max_params)
    totals, family_rows, detail = _family_counts(models, cache, results, limit)
    lines = [
        *_method_lines(commands, limit),
        "",
        *_coverage_lines(models, totals, results),
        "",
        "## Not converted",
        "",
        "Every BN model tried that did not convert and run, with the reason:",
        "",
        *(
            f"- `{m}` ({r['status']}): {r.get('reason', '')}"
            for m, r in sorted(results.items())
            if r["status"] not in ("converted", "too_big")
        ),
        "",
        "## Per family",
        "",
        "| family | models | no BN | too big | not run | tried | converted | refused | failed "
        "| skipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *family_rows,
        "",
        "## Models tried",
        "",
        "`sites` is sites per stage (stage: count); `rules` counts the rule that picked each "
        "site (resnet-a, densenet-a or generic-a residual / depthwise-separable / plain stack).",
    ]
    for family in sorted(detail):
        lines += [
            "",
            f"### {family}",
            "",
            "| model | status | input | layout | sites | rules | convert s | reason / note |",
            "|---|---|---|---|---|---|---|---|",
            *sorted(detail[family]),
        ]
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT} ({totals['tried']} tried, {totals['converted']} converted)", flush=True)


def _max_params_of(command: str) -> float:
    """The ``--max-params`` a logged sweep command ran with (the default when it has none)."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word == "--max-params":
            return float(words[i + 1])
    return DEFAULT_MAX_PARAMS


def _detail_row(model_id: str, record: dict) -> str:
    sites = ", ".join(f"{k}: {v}" for k, v in record.get("sites", {}).items())
    rules = ", ".join(
        f"{k.replace('generic-a ', '')} {v}" for k, v in record.get("rules", {}).items()
    )
    note = record.get("reason", record.get("note", "")).replace("|", "/")
    return (
        f"| {model_id} | {record['status']} | {record.get('input', '')} | "
        f"{record.get('layout', '')} | {sites} | {rules} | {record.get('convert_s', '')} | "
        f"{note} |"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
