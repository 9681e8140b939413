"""The spread of the README's placement figures over seeds and CPU kernels.

Runs the digits placement example (``examples/placement_search.py``: baseline, ``analyze`` on
all shifts, the five-candidate search without pruning) for each seed, here and once more under
another CPU capability (``ATEN_CPU_CAPABILITY=avx2``, another set of float kernels: on an
AVX-512 machine the figures move as they would on another CPU), and writes per stage and per
candidate the range of what the README's placement section states. Writes its section of
``benchmarks/RESULTS.md``.

    python benchmarks/search_seeds.py [--seeds 0,1,2] [--no-kernels] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from placement_search import CANDIDATES, SOURCE, search_schedule, train_baseline  # noqa: E402

import ibnify  # noqa: E402
from benchmarks._results import machine_line, update_section  # noqa: E402
from ibnify.data.digits import digits_data  # noqa: E402
from ibnify.demo import DemoConfig  # noqa: E402
from ibnify.placement.search import StudyOptions  # noqa: E402

OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def one_seed(seed: int, out: Path) -> dict:
    """The example's figures for ``seed``: per-stage ×content, suggestion, per candidate."""
    config = DemoConfig(seed=seed)
    baseline = train_baseline(config)
    test = digits_data("test", seed=seed)
    divergence = ibnify.analyze(
        baseline, test, shifts="all", images=None, seed=seed, progress=False, arch=SOURCE
    )
    content = divergence.stage_content
    stages = {str(k): v / content[k] for k, v in divergence.stage_divergence.items()}
    report = ibnify.search_placement(
        baseline,
        digits_data("train", seed=seed),
        test,
        candidates=CANDIDATES,
        config=search_schedule(config, seed),
        out_dir=out,
        arch=SOURCE,
        halving=False,
        study=StudyOptions(workers=2, threads=1),
    )
    return {
        "seed": seed,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "suggested": list(divergence.suggested_stages),
        "times_content": stages,
        "winner": report.winner.name if report.winner else None,
        "results": {r.name: {"clean": r.clean, "mean_drop": r.mean_drop} for r in report.results},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-kernels", action="store_true", help="Skip the AVX2 run.")
    parser.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in seeds:
            runs.append(one_seed(seed, Path(scratch) / str(seed)))
            print(json.dumps(runs[-1]), flush=True)
    if args.emit_json:
        return
    if not args.no_kernels:
        env = {**os.environ, **OTHER_KERNELS}
        done = subprocess.run(
            [sys.executable, __file__, "--seeds", str(seeds[0]), "--emit-json", "--no-write"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    text = markdown(runs)
    print(text)
    if not args.no_write:
        update_section("search_seeds", text)
        print("updated benchmarks/RESULTS.md")


def _range(values: list[float], scale: float = 100.0) -> str:
    low, high = min(values), max(values)
    return f"{scale * low:.1f}–{scale * high:.1f}" if high != low else f"{scale * low:.1f}"


def markdown(runs: list[dict]) -> str:
    """Ranges over the runs: ×content per stage, clean and mean drop per candidate."""
    labels = ", ".join(f"seed {r['seed']} ({r['capability']})" for r in runs)
    stages = sorted(runs[0]["times_content"])
    stage_rows = "\n".join(
        f"| {s} | {_range([r['times_content'][s] for r in runs], 1.0)} |" for s in stages
    )
    names = list(runs[0]["results"])
    rows = []
    for name in names:
        clean = [r["results"][name]["clean"] for r in runs]
        drop = [r["results"][name]["mean_drop"] for r in runs]
        control = [r["results"]["control"]["mean_drop"] for r in runs]
        ratio = [d / c for d, c in zip(drop, control, strict=True)]
        rows.append(f"| {name} | {_range(clean)} | {_range(drop)} | {_range(ratio, 1.0)} |")
    winners = ", ".join(str(r["winner"]) for r in runs)
    suggested = ", ".join("-".join(map(str, r["suggested"])) or "none" for r in runs)
    return f"""## Placement example: spread over seeds and CPU kernels

Command: `python benchmarks/search_seeds.py` ({machine_line()}). Runs: {labels}; the last
under `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (other float kernels, as on another
CPU). Each run: the demo's baseline for that seed, `analyze` on all shifts, the five-candidate
search without pruning (fine-tune seed = seed + 1).

| stage | divergence ×content (min–max) |
|---|---|
{stage_rows}

| candidate | clean % | mean drop (points) | ×control |
|---|---|---|---|
{chr(10).join(rows)}

Suggested stages: {suggested}. Winners: {winners}.
"""


if __name__ == "__main__":
    main()
