"""Constructed inputs for the service tests: real atlas photos made into each kind of bad capture.

Every degradation is physical and generic (a blur kernel, a gain, a reframing), never tuned to a case.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter
from scipy.ndimage import convolve


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **options: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        options.setdefault("quality", 92)
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def defocused(image: Image.Image, fraction: float = 0.01) -> Image.Image:
    """Gaussian blur with sigma = `fraction` of the short side (well past the 'not sharp' line)."""
    return image.filter(ImageFilter.GaussianBlur(fraction * min(image.size)))


def shaken(image: Image.Image, fraction: float = 0.03) -> Image.Image:
    """Horizontal motion blur over `fraction` of the width: a hand moving during the exposure."""
    length = max(3, round(fraction * image.width)) | 1
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    pixels = np.asarray(image, dtype=np.float32)
    out = np.stack([convolve(pixels[..., c], kernel, mode="reflect") for c in range(3)], axis=-1)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def gained(image: Image.Image, gain: float) -> Image.Image:
    """Exposure change by a linear gain, clipped like a sensor."""
    return Image.fromarray((np.asarray(image, dtype=np.float32) * gain).clip(0, 255).astype(np.uint8))


def glared(image: Image.Image, coverage: float = 0.2, seed: int = 0) -> Image.Image:
    """Specular reflections: clipped-white discs over about `coverage` of the central tissue."""
    pixels = np.asarray(image).copy()
    height, width = pixels.shape[:2]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    radius = 0.09 * min(width, height)
    target = coverage * np.pi * (0.35 * width) * (0.35 * height)
    covered = np.zeros((height, width), bool)
    while covered.sum() < target:
        cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
        covered |= (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
    pixels[covered] = 255
    return Image.fromarray(pixels)
