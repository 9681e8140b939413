"""The README's adaptation table: none / bn / entropy (BN affine, BN+IN affine) for the demo's
control and IBN models on the printed-digits target, over several demo seeds, with the spread.

For each seed it trains the demo (``ibnify demo --seed S --no-export``, about a minute on one
thread; a folder that already holds the demo's checkpoints is reused), adapts both models on
the target folder with the library's defaults, and measures the accuracy on the target and the
clean accuracy on the source (the digits test split) after adaptation. Prints one Markdown
table (seed 0's figure, then the mean and [min, max] over the seeds) and the machine line.

    python examples/target_domain.py --out printed-digits
    python examples/adapt_table.py --target printed-digits --seeds 0-2 [--work adapt-table]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import ibnify
from ibnify.demo import DemoConfig, run_demo

# (row label, adapt() keyword arguments; None = the model as trained)
METHODS = {
    "none": None,
    "bn": {"method": "bn"},
    "entropy --norms bn": {"method": "entropy", "norms": "bn"},
    "entropy --norms both": {"method": "entropy", "norms": "both"},
}


def parse_seeds(text: str) -> list[int]:
    """``0-2`` or ``0,3,4`` → a list of seeds."""
    if "-" in text:
        first, last = (int(v) for v in text.split("-"))
        return list(range(first, last + 1))
    return [int(v) for v in text.split(",")]


def demo_models(work: Path, seed: int) -> dict[str, torch.nn.Module]:
    """The demo's control and IBN models for ``seed`` (trained once into ``work/seed-S``)."""
    out = work / f"seed-{seed}"
    if not (out / "ibn.safetensors").exists():
        run_demo(out, DemoConfig(seed=seed, export=False), force=True)
    return {name: ibnify.load(out / f"{name}.safetensors") for name in ("control", "ibn")}


def measure(work: Path, target: str, seed: int) -> dict[tuple[str, str], tuple[float, float]]:
    """``{(model, method): (target %, source clean %)}`` for one demo seed."""
    found = {}
    for name, model in demo_models(work, seed).items():
        runs = {}
        for label, kwargs in METHODS.items():
            if name == "control" and label == "entropy --norms both":
                continue  # no IN: both is bn
            runs[label] = model if kwargs is None else ibnify.adapt(model, target, **kwargs)
        report = ibnify.evaluate(runs, "digits", shifts="none", domains={"target": target})
        for label in runs:
            accuracy = report.accuracy[label]
            found[(name, label)] = (100 * accuracy["target"], 100 * accuracy["clean"])
    return found


def table(results: dict[int, dict[tuple[str, str], tuple[float, float]]]) -> str:
    """Seed 0's figures (the first seed's), then mean [min, max] over every seed."""
    seeds = sorted(results)
    first = seeds[0]
    lines = [
        f"| model | adaptation | target % (seed {first}) | target mean [min, max] | "
        f"source clean % (seed {first}) | source clean mean [min, max] |",
        "|---|---|---|---|---|---|",
    ]
    for key in results[first]:
        cells = [key[0], key[1]]
        for column in (0, 1):
            values = [results[seed][key][column] for seed in seeds]
            spread = f"{statistics.mean(values):.1f} [{min(values):.1f}, {max(values):.1f}]"
            cells += [f"{results[first][key][column]:.1f}", spread]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed(results: dict[int, dict[tuple[str, str], tuple[float, float]]]) -> str:
    """Target accuracy % per seed: the pairs the README's words compare seed by seed."""
    seeds = sorted(results)
    lines = [
        "| model | adaptation | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for key in results[seeds[0]]:
        cells = [f"{results[seed][key][0]:.1f}" for seed in seeds]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="printed-digits", help="labelled target folder")
    parser.add_argument("--seeds", default="0-2", help="demo seeds, e.g. 0-2 or 0,3")
    parser.add_argument("--work", default="adapt-table", help="folder for the demo runs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the demo's setting: tiny convolutions, the same digits every run
    seeds = parse_seeds(args.seeds)
    results = {seed: measure(Path(args.work), args.target, seed) for seed in seeds}
    print(table(results))
    print()
    print("target accuracy % per seed:")
    print(per_seed(results))
    print(
        f"seeds {', '.join(map(str, seeds))}; torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, 1 thread; adapt defaults (entropy: 1 "
        "epoch, lr 0.005, batch 64)"
    )


if __name__ == "__main__":
    main()
