"""How many damaged HEICs does the service refuse? An atlas photo as an 800x600 HEIC (one picture) and as a
12 MP one laid out as an iPhone writes it (48 grid tiles, a 320 px thumbnail), with 10 bytes or 0.1-100 % of
the media data (`mdat`) overwritten by random bytes, at random positions or as one span; each copy goes
through `decode_upload`, with both damage checks: the container's (`service.io.heif_items`, before decoding)
and the thumbnail's (`service.io.decoding.check_heif_thumbnail`, after a full decode). `--without container`
and/or `--without thumbnail` leave them out (both: libheif's own errors only, as before either). A refusal is
a 422; anything else decoded into pixels.

`python -m bench.heic_damage --trials 30` prints one line per size and amount (a few minutes here: each
12 MP copy the container check lets through decodes its 48 tiles).
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from bench.run import ATLAS, PHONE_SIZE, heic
from service.io import decoding
from service.io.decoding import DecodeLimits, UploadRejected, decode_upload, register_heif
from service.io.heif_items import boxes

AMOUNTS = ("10 bytes", 0.001, 0.01, 0.1, 1.0)  # a count of bytes, or a share of the media data
LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=64, decode_min_side=320)
Damage = Callable[[np.ndarray, int, int, np.random.Generator], None]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=30, help="damaged copies per size, amount and kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--without",
        choices=("container", "thumbnail"),
        action="append",
        default=[],
        help="leave a check out (give both for libheif alone, as before either)",
    )
    return parser


def media_data(data: bytes) -> tuple[int, int]:
    """(first, one past the last) byte of the top-level `mdat` box's payload."""
    mdat = next((box for box in boxes(memoryview(data), 0, len(data)) if box.kind == b"mdat"), None)
    if mdat is None:
        raise ValueError("the HEIC has no mdat box")
    return mdat.start, mdat.end


def _at_random_positions(file_bytes: np.ndarray, start: int, count: int, rng: np.random.Generator) -> None:
    span = len(file_bytes) - start
    file_bytes[start + rng.choice(span, count, replace=False)] = rng.integers(0, 256, count)


def _as_one_span(file_bytes: np.ndarray, start: int, count: int, rng: np.random.Generator) -> None:
    first = start + int(rng.integers(0, len(file_bytes) - start - count + 1))
    file_bytes[first : first + count] = rng.integers(0, 256, count)


DAMAGES: dict[str, Damage] = {"random positions": _at_random_positions, "one span": _as_one_span}


def damaged_bytes(amount: str | float, media_bytes: int) -> int:
    return int(amount.split()[0]) if isinstance(amount, str) else max(1, int(amount * media_bytes))


def refused(data: bytes, amount: str | float, damage: Damage, rng: np.random.Generator) -> bool:
    start, end = media_data(data)
    damaged = np.frombuffer(data[:end], np.uint8).copy()  # what follows mdat (if anything) stays as it is
    damage(damaged, start, damaged_bytes(amount, end - start), rng)
    try:
        decode_upload(damaged.tobytes() + data[end:], LIMITS)
    except UploadRejected:
        return True
    return False


def photos() -> dict[str, bytes]:
    source = sorted(ATLAS.glob("images_*/case_*/*cetic*.jpg"))[0]
    image = Image.open(source).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "HEIF", quality=90)
    phone = image.resize(PHONE_SIZE, Image.Resampling.LANCZOS)
    return {"800x600 (one picture)": buffer.getvalue(), "12 MP (48 tiles)": heic(phone, [320])}


def main(args: argparse.Namespace) -> None:
    register_heif(2)
    if "container" in args.without:
        decoding.check_heif = lambda data: None
    if "thumbnail" in args.without:
        decoding.check_heif_thumbnail = lambda picture, data: None
    rng = np.random.default_rng(args.seed)
    for name, data in photos().items():
        decode_upload(data, LIMITS)  # the undamaged photo decodes
        for amount in AMOUNTS:
            counts = [
                f"{kind} {sum(refused(data, amount, damage, rng) for _ in range(args.trials))}/{args.trials}"
                for kind, damage in DAMAGES.items()
            ]
            label = amount if isinstance(amount, str) else f"{100 * amount:g} % of mdat"
            print(f"{name}, {label} overwritten, refused: {', '.join(counts)}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
