"""Images for clinician review, on request only: the lesion mask, an overlay on the cervix crop, and an exam's
contact sheet."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

_TINT = np.array([0, 255, 96], dtype=np.float32)  # green reads on pink tissue and on white lesions alike
_OUTLINE = np.array([255, 255, 0], dtype=np.uint8)  # a yellow edge marks where the lesion map ends
_OVERLAY_MAX_SIDE = 512
_TILE, _CAPTION, _COLUMNS = 192, 22, 4
# Verdict frames from the Okabe-Ito palette: told apart with the common colour-vision deficiencies, and the
# caption says the verdict in words too.
VERDICT_COLOURS = {"used": (0, 158, 115), "accepted": (86, 180, 233), "retake": (213, 94, 0)}


def mask_png(probability: np.ndarray, threshold: float) -> str:
    """Base64 PNG, 255 where P(lesion) >= threshold."""
    mask = np.where(probability >= threshold * 255.0, 255, 0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_jpeg(crop_rgb: np.ndarray, probability: np.ndarray, threshold: float) -> str:
    """Base64 JPEG of the cervix crop (at most 512 px) with the lesion tinted green and outlined in yellow.
    No EXIF."""
    image = Image.fromarray(crop_rgb)
    image.thumbnail((_OVERLAY_MAX_SIDE, _OVERLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    mask = Image.fromarray(probability).resize(image.size, Image.Resampling.BILINEAR)
    lesion = np.asarray(mask, dtype=np.float32) >= threshold * 255.0
    alpha = lesion[..., None] * 0.45
    pixels = np.asarray(image, dtype=np.float32)
    blended = (pixels * (1 - alpha) + _TINT * alpha).clip(0, 255).astype(np.uint8)
    blended[outline(lesion)] = _OUTLINE
    return _jpeg(Image.fromarray(blended))


def outline(mask: np.ndarray) -> np.ndarray:
    """The edge of a boolean mask, about 2 px wide: mask pixels with a 4-neighbour outside it, and the pixels
    just below and right of those."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~interior
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:, 1:] |= edge[:, :-1]
    return thick


@dataclass(frozen=True)
class SheetTile:
    crop_rgb: np.ndarray | None  # the cervix crop the models judged; None when none was found
    caption: str  # e.g. "#2 acetic: used"
    verdict: str  # a key of VERDICT_COLOURS


def contact_sheet_jpeg(tiles: list[SheetTile]) -> str:
    """Base64 JPEG: a thumbnail per photo of an exam, in order, framed in its verdict's colour, captioned."""
    columns = min(_COLUMNS, max(1, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * _TILE, rows * (_TILE + _CAPTION)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for slot, tile in enumerate(tiles):
        x, y = (slot % columns) * _TILE, (slot // columns) * (_TILE + _CAPTION)
        colour = VERDICT_COLOURS[tile.verdict]
        if tile.crop_rgb is not None:
            thumb = Image.fromarray(tile.crop_rgb)
            thumb.thumbnail((_TILE - 10, _TILE - 10), Image.Resampling.BILINEAR)
            sheet.paste(thumb, (x + (_TILE - thumb.width) // 2, y + (_TILE - thumb.height) // 2))
        draw.rectangle((x + 1, y + 1, x + _TILE - 2, y + _TILE - 2), outline=colour, width=4)
        draw.text((x + 6, y + _TILE + 5), tile.caption, fill=colour)
    return _jpeg(sheet)


def _jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
