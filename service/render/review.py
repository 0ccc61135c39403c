"""Images for clinician review, on request only: the lesion mask and an overlay on the cervix crop."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

_TINT = np.array([0, 255, 96], dtype=np.float32)  # green reads on pink tissue and on white lesions alike
_OVERLAY_MAX_SIDE = 512


def mask_png(probability: np.ndarray, threshold: float) -> str:
    """Base64 PNG, 255 where P(lesion) >= threshold."""
    mask = np.where(probability >= threshold * 255.0, 255, 0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_jpeg(crop_rgb: np.ndarray, probability: np.ndarray, threshold: float) -> str:
    """Base64 JPEG of the cervix crop (at most 512 px) with the lesion blended in green. No EXIF."""
    image = Image.fromarray(crop_rgb)
    image.thumbnail((_OVERLAY_MAX_SIDE, _OVERLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    mask = Image.fromarray(probability).resize(image.size, Image.Resampling.BILINEAR)
    alpha = (np.asarray(mask, dtype=np.float32) >= threshold * 255.0)[..., None] * 0.45
    pixels = np.asarray(image, dtype=np.float32)
    blended = (pixels * (1 - alpha) + _TINT * alpha).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
