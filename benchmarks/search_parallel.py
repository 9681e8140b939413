"""Search time with 1 vs 2 workers, and with vs without pruning, on the digits placement example.

The same baseline (``examples/placement_search.py``: the demo's BN baseline), the same five
candidates plus the control, schedule and seed. Three searches run in this one process, one
after the other, each in its own fresh study:

1. one worker, no pruning (the reference: wall and CPU time);
2. two worker processes (one torch thread each), no pruning: wall-time ratio to 1, with the
   same winner and a byte-identical winner checkpoint (target ≤ 0.6×);
3. one worker, successive halving: CPU-time ratio to 1, with the same winner (target ≤ 0.6×).

CPU time is this process's plus its finished worker processes' (``getrusage``). Writes its
section of ``benchmarks/RESULTS.md``.

    python benchmarks/search_parallel.py [--no-write]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import optuna
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


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children (the worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def busiest_worker_cpu(out: Path) -> float:
    """CPU seconds of the worker that spent the most on its trials: the wall time the search
    would take if every worker had a core of its own (the machine's other load aside)."""
    backend = optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    study = optuna.load_study(
        study_name="ibnify-search", storage=optuna.storages.JournalStorage(backend)
    )
    per_worker: dict[str, float] = {}
    for trial in study.get_trials():
        worker = trial.user_attrs.get("worker", "?")
        per_worker[worker] = per_worker.get(worker, 0.0) + trial.user_attrs.get("cpu_s", 0.0)
    return max(per_worker.values())


def timed_search(baseline, config: DemoConfig, out: Path, workers: int, pruner: str):
    """One search of the example's candidates; returns (report, wall seconds, CPU seconds)."""
    started, cpu = time.perf_counter(), _cpu()
    report = ibnify.search_placement(
        baseline,
        digits_data("train", seed=config.seed),
        digits_data("test", seed=config.seed),
        candidates=CANDIDATES,
        config=search_schedule(config, config.seed),
        out_dir=out,
        arch=SOURCE,
        study=StudyOptions(workers=workers, threads=1, pruner=pruner),
    )
    return report, time.perf_counter() - started, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = DemoConfig(seed=0)
    baseline = train_baseline(config)
    runs, best, busiest = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, workers, pruner in (
            ("one", 1, "none"),
            ("two", 2, "none"),
            ("pruned", 1, "halving"),
        ):
            out = Path(scratch) / label
            runs[label] = timed_search(baseline, config, out, workers, pruner)
            report, wall, cpu = runs[label]
            best[label] = (out / "best.safetensors").read_bytes()
            busiest[label] = busiest_worker_cpu(out)
            name = report.winner.name if report.winner else "-"
            print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU, winner {name}", flush=True)
    text = markdown(runs, best, busiest, config)
    print(text)
    if not args.no_write:
        update_section("search_parallel", text)
        print("updated benchmarks/RESULTS.md")


def markdown(runs: dict, best: dict, busiest: dict, config: DemoConfig) -> str:
    """The RESULTS.md section: the three searches, the two ratios, winners, verdicts."""
    (one, one_wall, one_cpu), (_, two_wall, two_cpu) = runs["one"], runs["two"]
    pruned, pruned_wall, pruned_cpu = runs["pruned"]
    names = {k: (r.winner.name if r.winner else "-") for k, (r, _, _) in runs.items()}
    wall_ratio, cpu_ratio = two_wall / one_wall, pruned_cpu / one_cpu
    span_ratio = busiest["two"] / busiest["one"]
    same_two = names["two"] == names["one"] != "-" and best["two"] == best["one"]
    same_pruned = names["pruned"] == names["one"] != "-"
    yes = {True: "yes", False: "no"}
    verdict = {True: "meets", False: "misses"}
    parallel_ok = verdict[wall_ratio <= 0.6 and same_two]
    pruning_ok = verdict[cpu_ratio <= 0.6 and same_pruned]
    halving_row = f"1 worker, successive halving (rungs {pruned.halving})"
    stops = ", ".join(f"{r.name} after epoch {r.stopped_at}" for r in pruned.results if not r.full)
    epochs = config.finetune_epochs
    trained = sum(r.stopped_at or epochs for r in pruned.results)
    capability = torch.backends.cpu.get_cpu_capability()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"""## Layout search: 2 workers vs 1, successive halving vs none

Command: `python benchmarks/search_parallel.py` ({machine_line()}, CPU capability
{capability}). The digits placement example (`examples/placement_search.py`): the demo's BN
baseline, the candidates `{CANDIDATES}` plus the control, {epochs} fine-tuning epochs each, all
shifts, one Optuna study per search (journal file). All three run in one process, one after the
other; each worker has one torch thread. CPU time counts the worker processes too.

| search | wall s | CPU s | winner |
|---|---|---|---|
| 1 worker, no pruning | {one_wall:.1f} | {one_cpu:.1f} | {names["one"]} |
| 2 workers, no pruning | {two_wall:.1f} | {two_cpu:.1f} | {names["two"]} |
| {halving_row} | {pruned_wall:.1f} | {pruned_cpu:.1f} | {names["pruned"]} |

- **2 workers / 1 worker, wall time: {wall_ratio:.2f}** (target ≤ 0.6: {parallel_ok});
  same winner and byte-identical winner checkpoint: {yes[same_two]}. The busiest worker's
  CPU time over the one worker's ({busiest["two"]:.1f} s / {busiest["one"]:.1f} s, trials only):
  **{span_ratio:.2f}**, the wall-time ratio on two otherwise idle cores.
- **Halving / none, CPU time: {cpu_ratio:.2f}** (target ≤ 0.6: {pruning_ok});
  same winner: {yes[same_pruned]}. Stopped early: {stops or "none"}; training epochs
  {trained} with halving, {epochs * len(one.results)} without.

Where the time goes. Two workers: a worker is busy only while it trains or evaluates, so on
two free cores the wall time is the busiest worker's CPU time (the ratio above); six trials of
unequal length (the control and IBN-b are cheaper than IBN-a on three stages) cannot split
evenly, and when other processes hold the cores (the load average is at the end of this
section) both searches wait for CPU alike and the wall ratio tends to 1. Halving: the
control always runs the full schedule (the clean reference); every candidate trains to the
first rung and is measured there on 200 images per data set (clean plus every shift, about a
third of a training epoch per rung); and Optuna's successive halving is asynchronous: with one
worker a candidate reaching a rung is compared with those that reached it before it, and the
first always goes on. This list runs weakest-first (IN on one stage, then two, then three), so
each newcomer tends to beat those before it and few stop; the saved epochs do not pay for the
rung evaluations. Load average at the end of the run: {load}.
"""


if __name__ == "__main__":
    main()
