"""Cost of the unreadable-image check an image folder gets before a run (every image decoded
once; JPEGs at 1/8 scale), against one pass of the data as a run reads it (decode + timm's eval
transform at 224, no model), and against PIL's ``verify()`` (cheaper, but blind to a truncated
JPEG). A folder of ``--images`` noise JPEGs of 500×375 (ImageNet's typical size) in 10 classes;
the three timings interleave ``--repeats`` times and the medians are reported. Target: the check
costs well under one pass of the data. Writes the ``bad_image_scan`` section of
``benchmarks/RESULTS.md``.

    python benchmarks/bad_image_scan.py [--images 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import machine_line, update_section
from ibnify.data.images import image_files, image_folder_data, unreadable_images
from ibnify.models.registry import build_model


def write_folder(root: Path, count: int) -> None:
    """``count`` noise JPEGs (quality 90) in 10 class folders; a seeded generator."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)


def verify_all(files: list[Path]) -> None:
    """PIL's own check: reads the headers and (for PNG) the chunks, decodes nothing."""
    for file in files:
        with Image.open(file) as image:
            image.verify()


def one_pass(root: Path, model: torch.nn.Module) -> None:
    """Every image as a run reads it: decoded, resized, centre-cropped to 224, as a tensor."""
    data = image_folder_data(root, model, input_size=(3, 224, 224))
    for index in range(len(data)):
        data.dataset[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model("resnet18")[0]
    times: dict[str, list[float]] = {"check": [], "verify": [], "pass": []}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_folder(root, args.images)
        files = image_files(root)
        steps = {
            "check": lambda: unreadable_images(files),
            "verify": lambda: verify_all(files),
            # one_pass runs the check too (image_folder_data): subtract it below
            "pass": lambda: one_pass(root, model),
        }
        for _ in range(args.repeats):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
    check, verify = statistics.median(times["check"]), statistics.median(times["verify"])
    read = statistics.median(times["pass"]) - check
    print(f"check {check:.2f} s, verify {verify:.2f} s, one pass {read:.2f} s")
    rows = [
        ("the check (decode at 1/8 scale)", check),
        ("PIL `verify()` (misses truncated JPEGs)", verify),
        ("one pass of the data (decode + eval transform at 224)", read),
    ]
    table = "\n".join(
        f"| {name} | {seconds:.2f} | {1000 * seconds / args.images:.1f} | {seconds / read:.2f} |"
        for name, seconds in rows
    )
    update_section(
        "bad_image_scan",
        f"""## The unreadable-image check before a run

`python benchmarks/bad_image_scan.py --images {args.images} --repeats {args.repeats}`
({machine_line()}): {args.images} noise JPEGs of 500×375 in 10 class folders; medians of
{args.repeats} interleaved repeats.

| step | seconds | per image (ms) | / one pass |
| --- | ---: | ---: | ---: |
{table}

Target: the check costs well under one pass of the data (it runs once per folder a command
reads, before the first epoch).""",
    )


if __name__ == "__main__":
    main()
