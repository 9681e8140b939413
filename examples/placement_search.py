"""Where should IN go? `analyze` and `search` on the digits demo's baseline, in about a minute.

1. Trains the demo's BN baseline (``ibnify:digits_resnet`` on scikit-learn's digits, the same
   seed and schedule as ``ibnify demo``).
2. ``analyze``: feature divergence between the test digits and their shifted copies (all
   appearance shifts, averaged) at every norm layer, against the content baseline; prints the
   table and the suggested ``--stages``; writes ``divergence.png``.
3. ``search``: converts five candidate layouts from the same baseline, fine-tunes each and an
   unconverted control with one seed and the full schedule (no successive halving), evaluates
   them clean and under the shifts, prints the ranked table and writes ``search/pareto.png``
   and ``search/best.safetensors``.

    python examples/placement_search.py [--out out/placement] [--seed 0] [--force]
        [--workers 2] [--figures docs]

The default ``--out`` lies in ``out/``, which git ignores. Rerunning with the same ``--out``
reuses the finished candidates (the study in ``search/study.journal``); ``--figures DIR``
copies the two plots the README shows (``placement_divergence.png``, ``placement_pareto.png``)
there.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import ibnify
from ibnify.data import digits_data
from ibnify.demo import DemoConfig
from ibnify.models import build_model
from ibnify.placement import StudyOptions

SOURCE = "ibnify:digits_resnet"
CANDIDATES = "a:1;a:1-2;a:1-3;a:1-2@0.25;b"


def train_baseline(config: DemoConfig) -> torch.nn.Module:
    """The demo's baseline: same seed, epochs, learning rate and weight decay."""
    torch.manual_seed(config.seed)
    model, _ = build_model(SOURCE)
    schedule = ibnify.FinetuneConfig(
        epochs=config.baseline_epochs,
        lr=config.baseline_lr,
        batch_size=config.batch_size,
        weight_decay=config.weight_decay,
        seed=config.seed,
        quiet=True,
        device="cpu",
    )
    ibnify.finetune(model, digits_data("train", seed=config.seed), schedule)
    return model


def search_schedule(config: DemoConfig, seed: int) -> ibnify.FinetuneConfig:
    """Every candidate's fine-tuning schedule: the demo's settings, seeded with ``seed + 1``."""
    return ibnify.FinetuneConfig(
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        batch_size=config.batch_size,
        weight_decay=config.weight_decay,
        seed=seed + 1,
        quiet=True,
        device="cpu",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="IBN placement from evidence, on digits")
    parser.add_argument("--out", default="out/placement", help="output folder (git ignores out/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="start the search over")
    parser.add_argument("--workers", type=int, default=1, help="search worker processes")
    parser.add_argument("--figures", help="copy the README's two plots into this folder")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the tiny digits model runs fastest on one thread
    config = DemoConfig(seed=args.seed)
    started = time.perf_counter()

    baseline = train_baseline(config)
    print(f"1. trained the BN baseline in {time.perf_counter() - started:.0f} s")
    test = digits_data("test", seed=args.seed)
    divergence = ibnify.analyze(
        baseline, test, shifts="all", images=None, seed=args.seed, progress=False, arch=SOURCE
    )
    divergence.plot(out / "divergence.png", title="digits baseline: clean vs shifted digits")
    print("2. feature divergence, test digits vs their shifted copies (mean over all shifts):")
    print(divergence.table())
    print(divergence.summary())

    print("3. search: each candidate converted from the baseline, fine-tuned, evaluated")
    schedule = search_schedule(config, args.seed)
    report = ibnify.search_placement(
        baseline,
        digits_data("train", seed=args.seed),
        test,
        candidates=CANDIDATES,
        config=schedule,
        out_dir=out / "search",
        force=args.force,
        arch=SOURCE,
        echo=print,
        halving=False,  # every candidate gets the full fine-tune: a comparison, not a race
        study=StudyOptions(workers=args.workers, threads=1),
    )
    print(report.table())
    if report.winner is not None:
        print(f"winner: {report.winner.name}; files: {', '.join(map(str, report.files.values()))}")
    if args.figures:
        figures = Path(args.figures)
        figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "divergence.png", figures / "placement_divergence.png")
        shutil.copyfile(out / "search" / "pareto.png", figures / "placement_pareto.png")
    print(f"finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
