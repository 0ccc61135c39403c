"""HEIC files built by the tests (pillow-heif writes them; none is stored): sound ones in the layouts phones
write, and copies damaged where only decoding can see it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bench.heic_damage import media_data
from service.io.decoding import register_heif


def scene(size: tuple[int, int]) -> Image.Image:
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float64)
    ripple = 40 * np.sin(x / 29.0) * np.cos(y / 17.0)
    pixels = np.dstack([x * 200 / size[0] + ripple, y * 200 / size[1] - ripple, np.full_like(x, 90.0)])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def heic(size: tuple[int, int], **options: object) -> bytes:
    register_heif(1)
    buffer = io.BytesIO()
    scene(size).save(buffer, "HEIF", quality=80, enc_params={"preset": "ultrafast"}, **options)
    return buffer.getvalue()


def vcl_units(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each coded slice's NAL unit payload in the media data, which libheif writes as one
    run of 4-byte length-prefixed NAL units, picture after picture."""
    position, end = media_data(data)
    units = []
    while position < end:
        length = int.from_bytes(data[position : position + 4], "big")
        if (data[position + 4] >> 1) & 63 < 32:
            units.append((position + 4, position + 4 + length))
        position += 4 + length
    return units


def damaged_inside_a_slice(data: bytes, unit: int) -> bytes:
    """Random bytes over the middle half of one coded slice: every NAL length and header stays intact."""
    start, end = vcl_units(data)[unit]
    first, last = start + (end - start) // 4, end - (end - start) // 4
    noise = np.random.default_rng(unit).integers(1, 256, last - first, np.uint8).tobytes()
    return data[:first] + noise + data[last:]
