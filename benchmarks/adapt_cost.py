"""Adaptation cost per image, relative to one plain forward pass (inference) of the same model.

Same model (the digits ResNet converted to IBN-a, stages 1-2), the same 3×16×16 batches in
memory (no image decoding, so the figures are the adaptation's own cost). Per round, in an
order that rotates: a no-grad eval forward over the images (the unit), ``ibnify.adapt`` with
``method="bn"`` (AdaBN: one forward pass with the statistics hooks), with ``method="entropy"``
(one learning pass, forward + backward + SGD on the chosen affine, then the statistics pass),
and an :class:`~ibnify.adaptation.OnlineAdapter` over the same batches (one update per batch).
The ratio is the median over rounds of (method time / forward time) within a round. Writes its
section of ``benchmarks/RESULTS.md``.

    python benchmarks/adapt_cost.py [--rounds 7] [--images 1024] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ibnify
from benchmarks._results import machine_line, update_section
from ibnify.adaptation import OnlineAdapter
from ibnify.data.images import ImageData
from ibnify.models.registry import build_model
from tests.helpers import randomize_norms

# What each method costs at least, in forward passes per image: AdaBN is one forward; entropy
# is a forward + backward (about 2 forwards more) then the statistics forward; online is a
# forward + backward per batch. The targets leave 25% for hooks, mode switches, the optimizer.
TARGETS = {"bn": 1.25, "entropy (1 epoch)": 5.0, "online": 3.75}


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md.")
    return parser.parse_args()


def _runners(images: int, batch: int) -> dict[str, Callable[[], object]]:
    """The timed calls on one seeded model and one set of images: ``forward`` (the unit) first,
    then each adaptation method."""
    torch.manual_seed(0)
    base, source = build_model("ibnify:digits_resnet")
    model = randomize_norms(ibnify.convert(base, stages=(1, 2), arch=source)).eval()
    x = torch.rand(images, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(images, dtype=torch.long)
    data = ImageData(TensorDataset(x, labels), (0.0,) * 3, (1.0,) * 3, labelled=False)
    batches = x.split(batch)

    @torch.no_grad()
    def forward() -> None:
        for chunk in batches:
            model(chunk)

    def online() -> None:
        adapter = OnlineAdapter(model)
        for chunk in batches:
            adapter(chunk)

    return {
        "forward": forward,
        "bn": lambda: ibnify.adapt(model, data, batch_size=batch),
        "entropy (1 epoch)": lambda: ibnify.adapt(model, data, method="entropy", batch_size=batch),
        "online": online,
    }


def _time_rounds(
    runners: dict[str, Callable[[], object]], rounds: int, images: int
) -> dict[str, list[float]]:
    """Seconds per runner and round, after one warm-up call each; the order rotates per round."""
    for runner in runners.values():  # warm up allocator and kernels
        runner()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            seconds[name].append(_timed(runners[name]))
        print(
            f"round {index + 1}: "
            + ", ".join(f"{n} {1000 * seconds[n][-1] / images:.3f} ms/image" for n in names),
            flush=True,
        )
    return seconds


def _rows(seconds: dict[str, list[float]], images: int) -> list[str]:
    """One table row per method: median ms/image, the median ratio to the forward in the same
    round (with its range) and the verdict against TARGETS."""
    rows = []
    for name in [n for n in seconds if n != "forward"]:
        ratios = [a / b for a, b in zip(seconds[name], seconds["forward"], strict=True)]
        ratio = statistics.median(ratios)
        verdict = "meets" if ratio <= TARGETS[name] else "MISSES"
        per_image = 1000 * statistics.median(seconds[name]) / images
        rows.append(
            f"| {name} | {per_image:.3f} | **{ratio:.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| ≤ {TARGETS[name]:.2f}: {verdict} |"
        )
    return rows


def _markdown(args: argparse.Namespace, rows: list[str], forward_ms: float) -> str:
    """The RESULTS.md section: the command, the setup, the table and how to read it."""
    command = "python benchmarks/adapt_cost.py " + " ".join(sys.argv[1:])
    return f"""## Adaptation cost per image, relative to one forward pass

Command: `{command.strip()}` ({machine_line()}).
Model: `ibnify:digits_resnet` converted to IBN-a (stages 1-2), random norm values; {args.images}
images of 3×16×16 held in memory, batch {args.batch}; {args.rounds} rounds, the order rotating.
Ratio: the median over rounds of (time of the method / time of a no-grad eval forward over the
same images) in the same round; the range is over rounds. Forward: {forward_ms:.3f} ms/image.

| method | median ms/image | × one forward (range) | target |
|---|---|---|---|
{chr(10).join(rows)}

`bn` is one forward in which every BN estimates its batch's statistics (torch's own train-mode
kernel; the hook only for frozen BN or a prior), plus what any `ibnify.adapt` call pays: a copy
of the model, the images through a DataLoader, the normalisation. `entropy` is one learning pass
(forward, backward through the network to the norm affine, an SGD step per batch) plus the
statistics pass; `online` one learning step per batch on batches already in memory and no
statistics pass. The targets are the passes each needs (1, 1 + 3, 3 forward-equivalents) with
25% for the copy, the loader, mode switches and the optimizer. The machine is shared: the range
over rounds shows how much other processes moved each round.

Where `bn`'s time goes (cProfile of one `ibnify.adapt` call on this model, 1024 images, measured
beside this script): `conv2d` about half, train-mode `batch_norm` about a fifth; the copy and the
loader under 2% each. A train-mode BN reduces its input to the batch's statistics and then
normalises, where an eval-mode BN only scales and shifts, and in this narrow 16-px network the
norms are a large share of the work: the statistics pass alone, without copy or loader, measured
1.2-1.4 forwards. The 1.25 target assumed a forward's cost for it; on this model it is not met.
"""


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    seconds = _time_rounds(_runners(args.images, args.batch), args.rounds, args.images)
    forward_ms = 1000 * statistics.median(seconds["forward"]) / args.images
    markdown = _markdown(args, _rows(seconds, args.images), forward_ms)
    print(markdown)
    if not args.no_write:
        update_section("adapt_cost", markdown)


if __name__ == "__main__":
    main()
