"""A second domain for the digits demo, offline: printed digits, scanned on another device.

The demo's source domain is scikit-learn's handwritten digits (light warm ink on dark grey,
3×16×16). This script writes a labelled target folder of *printed* digits: 0-9 typeset in the
fonts matplotlib ships (DejaVu Sans/Serif/Mono, STIX, Computer Modern; regular, bold, italic),
with a seeded jitter of size, position and slant, reduced exactly as scikit-learn's digits were
made (a 32×32 bitmap counted in 4×4 blocks to 8×8, 0-16) and rendered as pale green strokes on a
blue-grey ground. The digit shapes come from another source (type, not handwriting: a real change
of source); the stroke and ground colours are a constructed change, as another scanner would make.

    python examples/target_domain.py [--out printed-digits] [--per-class 60] [--seed 0]

Writes ``OUT/CLASS/NNN.png`` (16×16 RGB): a folder `ibnify evaluate --domain` and
`ibnify adapt --data` read. See docs/adapt.md, "Your own target domain".
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)
PAPER = (0.3, 0.34, 0.42)
INK = (0.72, 0.95, 0.82)


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def printed_digit(digit: int, rng: random.Random) -> np.ndarray:
    """One typeset digit as scikit-learn's digits were made: 32×32 bitmap → 8×8 counts, 0-16."""
    font = _font(rng.choice(FONTS), rng.randint(22, 30))
    canvas = Image.new("L", (48, 48), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    x = (48 - (right - left)) / 2 - left + rng.uniform(-2, 2)
    y = (48 - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
    draw.text((x, y), str(digit), fill=255, font=font)
    canvas = canvas.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR)
    box = canvas.getbbox() or (0, 0, 48, 48)
    glyph = canvas.crop(box)
    scale = 28 / max(glyph.size)  # the digits' bitmaps fill about 28 of 32 pixels
    glyph = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.BILINEAR
    )
    bitmap = Image.new("L", (32, 32), 0)
    bitmap.paste(glyph, ((32 - glyph.width) // 2, (32 - glyph.height) // 2))
    binary = (np.asarray(bitmap) > 127).astype(np.float32)
    return binary.reshape(8, 4, 8, 4).sum(axis=(1, 3))  # 0..16, like load_digits().images


def render(counts: np.ndarray) -> np.ndarray:
    """8×8 counts → a 16×16 RGB image (uint8): bilinear upsampling as the demo's digits, then
    pale green strokes on blue-grey instead of the source's warm strokes on dark grey."""
    ink = torch.from_numpy(counts / 16.0).view(1, 1, 8, 8)
    ink = torch.nn.functional.interpolate(ink, size=(16, 16), mode="bilinear", align_corners=False)
    ink = ink.clamp(0, 1)[0]
    paper = torch.tensor(PAPER).view(3, 1, 1)
    colour = torch.tensor(INK).view(3, 1, 1)
    image = paper * (1 - ink) + colour * ink
    return image.mul(255).round().byte().permute(1, 2, 0).numpy()


def write_folder(out: Path, per_class: int = 60, seed: int = 0) -> int:
    """Write ``per_class`` printed digits of each class under ``out/CLASS``; returns the count."""
    rng = random.Random(seed)
    for digit in range(10):
        folder = out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = render(printed_digit(digit, rng))
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return 10 * per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="printed-digits", help="output folder")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    count = write_folder(Path(args.out), args.per_class, args.seed)
    print(f"wrote {count} printed digits (10 classes) under {args.out}")


if __name__ == "__main__":
    main()
