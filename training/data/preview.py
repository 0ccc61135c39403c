"""Real-vs-synthetic contact sheet: IARC atlas thumbnails beside generator output, to judge realism by eye."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.data.synthetic import generate_scene

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = _REPO / "docs" / "real_vs_synthetic.png"
DEFAULT_ATLAS = _REPO.parent / "shared" / "data" / "iarc-atlas"
THUMB = (184, 138)
RENDER_SIZE = (800, 600)  # the atlas size, so both sides are downscaled the same way
_COLS = 4  # thumbnails per side per row
_GAP = 4
_HEADER = 18
_BG = (24, 24, 24)
_FG = (235, 235, 235)
_MAX_BYTES = 1_450_000  # docs/ stays light


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: %(default)s)")
    parser.add_argument(
        "--atlas",
        type=Path,
        default=DEFAULT_ATLAS,
        help="IARC atlas folder with images_*/case_*/*.jpg (default: %(default)s)",
    )
    parser.add_argument("--n", type=int, default=24, help="thumbnails per side (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="picks the real images and the synthetic seeds")


def _real_paths(atlas: Path, n: int, seed: int) -> list[Path]:
    paths = sorted(atlas.glob("images_*/case_*/*.jpg"))
    if not paths:
        return []
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    return [paths[i] for i in sorted(pick)]


def _thumb(im: Image.Image) -> Image.Image:
    return im.convert("RGB").resize(THUMB, Image.Resampling.LANCZOS)


def _panel(thumbs: list[Image.Image], title: str, rows: int) -> Image.Image:
    """One side of the sheet: a header with its title over a grid of thumbnails."""
    w = _COLS * THUMB[0] + (_COLS - 1) * _GAP
    h = _HEADER + rows * THUMB[1] + (rows - 1) * _GAP
    panel = Image.new("RGB", (w, h), _BG)
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    tw = draw.textlength(title, font=font)
    draw.text(((w - tw) / 2, 3), title, fill=_FG, font=font)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, _COLS)
        panel.paste(t, (c * (THUMB[0] + _GAP), _HEADER + r * (THUMB[1] + _GAP)))
    return panel


def make_sheet(atlas: Path, n: int, seed: int) -> tuple[Image.Image, bool]:
    """Build the sheet; the flag says whether real images were found."""
    real = [_thumb(Image.open(p)) for p in _real_paths(atlas, n, seed)]
    synth = [_thumb(Image.fromarray(generate_scene(seed * 100_003 + i, RENDER_SIZE).image)) for i in range(n)]
    rows = -(-n // _COLS)
    right = _panel(synth, "synthetic", rows)
    if not real:
        return right, False
    left = _panel(real, "real", rows)
    sheet = Image.new("RGB", (left.width + right.width + 4 * _GAP, left.height), _BG)
    sheet.paste(left, (0, 0))
    sheet.paste(right, (left.width + 4 * _GAP, 0))
    return sheet, True


def _png(sheet: Image.Image, max_bytes: int = _MAX_BYTES) -> tuple[bytes, int]:
    """Encode as PNG within max_bytes, dropping low bits per channel only as far as needed.

    Photos compress badly as PNG. A 256-colour palette posterises them (shared by 48 photos, it has a
    handful of levels per hue); rounding each channel to 7 or 6 bits (128 or 64 levels, steps of 2-4 on 255)
    keeps every hue and is invisible at a glance, yet compresses far better.
    """
    data = b""
    for bits in (8, 7, 6, 5):
        im = sheet
        if bits < 8:
            drop = 8 - bits
            half = 1 << (drop - 1)
            lut = [min(255, ((v >> drop) << drop) + half) for v in range(256)]
            im = sheet.point(lut * 3)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
        if len(data) <= max_bytes:
            return data, bits
    return data, 5


def run(args: argparse.Namespace) -> Path:
    sheet, has_real = make_sheet(Path(args.atlas), int(args.n), int(args.seed))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data, bits = _png(sheet)
    out.write_bytes(data)
    if not has_real:
        print(f"no atlas images under {args.atlas}: wrote a synthetic-only sheet")
    print(f"wrote {out} ({sheet.width}x{sheet.height}, {bits} bits per channel, {len(data)} bytes)")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
