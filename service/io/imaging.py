"""Image decoding shared by the service and by training, so both see identical pixels.

Kept free of web and ML frameworks: training imports it, and the service must never import torch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read. The message says what was wrong."""


ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the pixels upright (the table ImageOps.exif_transpose uses).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8), or 1 when there is none or it cannot be read: a photo with broken
    metadata is still a photo. Read once, so the size the service reports and the pixels agree."""
    try:
        value = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # any EXIF parser failure means "no usable tag"
        return 1
    return value if value in _UPRIGHT else 1


def upright(image: Image.Image, orientation: int | None = None) -> Image.Image:
    orientation = exif_orientation(image) if orientation is None else orientation
    return image.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else image


def to_rgb(image: Image.Image, orientation: int | None = None) -> Image.Image:
    """Upright 8-bit RGB from whatever mode a camera, scanner or editor produced.

    EXIF orientation is applied first because phones store portrait shots sideways plus a tag; pass
    `orientation` when it was already read. Only the pixels are transposed (ImageOps.exif_transpose
    would also rewrite the EXIF block, which fails on malformed metadata). Alpha is composited on black,
    the colour of the colposcope's dark surround, so a transparent border does not read as a bright frame.
    """
    image = upright(image, orientation)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale: keep the top 8 bits instead of letting convert() clip everything above 255.
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    # Already RGB: no copy (convert() would make one, the size of the photo).
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(source: str | Path | bytes) -> np.ndarray:
    """Decode a file or bytes to an upright HxWx3 uint8 RGB array."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as image:
            return np.asarray(to_rgb(image))
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from error


def load_mask(path: str | Path) -> np.ndarray:
    """A binary mask image as HxW uint8 in {0, 1}: any non-zero pixel is foreground."""
    with Image.open(path) as image:
        return (np.asarray(upright(image).convert("L")) > 0).astype(np.uint8)
