"""Time per training step of ``ibnify.finetune`` against a plain hand-written torch loop.

Same model (the digits ResNet converted to IBN-a), same data, same batch size, optimizer and
cosine schedule; the two run interleaved in one process (alternating which goes first) and the
ratio of the median per-step times is reported. Target: ≤ 1.05. Writes its section of
``benchmarks/RESULTS.md``.

    python benchmarks/finetune_overhead.py [--rounds 11] [--epochs 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ibnify
from benchmarks._results import machine_line, update_section
from ibnify.data.digits import digits_data
from ibnify.data.images import ImageData
from ibnify.models.registry import build_model
from ibnify.train.config import FinetuneConfig
from ibnify.train.loop import finetune

BATCH = 64
LR = 0.02


def plain_loop(model: nn.Module, data: ImageData, epochs: int, seed: int) -> tuple[float, int]:
    """The loop a user would write by hand; returns (seconds in the epoch loops, steps)."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(data) // BATCH
    total = steps_per_epoch * epochs
    warmup = min(steps_per_epoch, total // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    model.train()
    seconds, steps = 0.0, 0
    for epoch in range(epochs):
        sampler = RandomSampler(
            data.dataset, generator=torch.Generator().manual_seed(seed * 1000 + epoch)
        )
        loader = DataLoader(data.dataset, batch_size=BATCH, sampler=sampler, drop_last=True)
        start = time.perf_counter()
        for images, labels in loader:
            logits = model((images - mean) / std)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
        seconds += time.perf_counter() - start
    return seconds, steps


def ibnify_loop(model: nn.Module, data: ImageData, epochs: int, seed: int) -> tuple[float, int]:
    """``ibnify.finetune`` with the same settings; seconds are its own per-epoch timings."""
    config = FinetuneConfig(
        epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, quiet=True, device="cpu"
    )
    result = finetune(model, data, config)
    seconds = sum(line["seconds"] for line in result.history)
    steps = sum(line["images"] for line in result.history) // BATCH
    return seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = digits_data("train")
    base, source = build_model("ibnify:digits_resnet")
    model = ibnify.convert(base, stages=(1, 2), arch=source)
    ibnify_loop(copy.deepcopy(model), data, 1, 0)  # warm up allocator and kernels
    plain_loop(copy.deepcopy(model), data, 1, 0)
    per_step: dict[str, list[float]] = {"plain": [], "ibnify": []}
    runners = {"plain": plain_loop, "ibnify": ibnify_loop}
    for round_index in range(args.rounds):
        order = ["plain", "ibnify"] if round_index % 2 == 0 else ["ibnify", "plain"]
        for name in order:
            seconds, steps = runners[name](copy.deepcopy(model), data, args.epochs, round_index)
            per_step[name].append(seconds / steps)
        print(
            f"round {round_index + 1}: plain {1000 * per_step['plain'][-1]:.2f} ms/step, "
            f"ibnify {1000 * per_step['ibnify'][-1]:.2f} ms/step",
            flush=True,
        )
    plain = statistics.median(per_step["plain"])
    ours = statistics.median(per_step["ibnify"])
    ratios = [a / b for a, b in zip(per_step["ibnify"], per_step["plain"], strict=True)]
    ratio = statistics.median(ratios)
    verdict = "meets" if ratio <= 1.05 else "misses"
    command = "python benchmarks/finetune_overhead.py " + " ".join(sys.argv[1:])
    markdown = f"""## Fine-tuning overhead: `ibnify.finetune` vs a plain torch loop

Command: `{command.strip()}` ({machine_line()}).
Model: `ibnify:digits_resnet` converted to IBN-a (stages 1-2); data: digits train split
({len(data)} images, 3×16×16), batch {BATCH}, SGD momentum 0.9, cosine schedule with warmup.
Both loops run {args.epochs} epochs per round, {args.rounds} rounds interleaved in one process
(alternating which goes first); per-step time = time in the epoch loops / steps.

| loop | median ms/step |
|---|---|
| plain hand-written loop | {1000 * plain:.2f} |
| `ibnify.finetune` | {1000 * ours:.2f} |
| ratio of the medians | {ours / plain:.3f} |
| **median of the per-round ratios** | **{ratio:.3f}** (range {min(ratios):.3f}-{max(ratios):.3f}) |

Target ≤ 1.05 (median per-round ratio): {verdict}. The per-round spread is machine noise
(other processes share the CPUs); the two loops alternate, so it hits both alike.
`ibnify.finetune` does per step what the plain loop does plus
accuracy bookkeeping on detached tensors (no host sync per step without a progress bar).
"""
    print(markdown)
    if not args.no_write:
        update_section("finetune_overhead", markdown)
        print("updated benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
