"""Classical exposure and glare measures: what the service reports and what training labels with.

One copy, so a training label "dark" and the service's `too_dark` reason mean the same pixels.
Thresholds and their reasons are documented in `training/data/degrade.py` (where they were measured
on the IARC atlas); the service reads the values from the quality model's manifest.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

DARK_MAX = 0.28  # tissue mean sRGB luma below: "dark"
OVER_MIN = 0.85  # tissue mean sRGB luma above: "over" ...
WHITE_LUMA = 0.92  # ... or more than OVER_WHITE_MAX of the tissue at or above this luma (washed out)
OVER_WHITE_MAX = 0.30
GLARE_MAX = 0.10  # clipped-white fraction of the tissue ellipse above which the photo is glare-washed
SATURATED_LEVEL = 245  # a pixel whose every channel reaches this is clipped white
TISSUE_SEMI_AXES = (0.35, 0.35)  # central ellipse, as fractions of (W, H)
_MAX_SAMPLED_PIXELS = 250_000  # a regular grid this dense is plenty for a mean and a fraction


@dataclass(frozen=True)
class ExposureRule:
    dark_max: float = DARK_MAX
    over_min: float = OVER_MIN
    white_luma: float = WHITE_LUMA
    over_white_max: float = OVER_WHITE_MAX


@functools.lru_cache(maxsize=16)
def _tissue_ellipse_cached(height: int, width: int) -> np.ndarray:
    ax, ay = TISSUE_SEMI_AXES
    y = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / max(ay * height, 0.5)
    x = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / max(ax * width, 0.5)
    mask = (y[:, None] ** 2 + x[None, :] ** 2) <= 1.0
    mask.flags.writeable = False  # shared by every caller through the cache
    return mask


def tissue_ellipse(height: int, width: int) -> np.ndarray:
    """HxW bool (read-only): the central ellipse where the cervix sits in a framed colposcopy photo."""
    return _tissue_ellipse_cached(int(height), int(width))


def tissue_pixels(image: np.ndarray) -> np.ndarray:
    """Nx3 uint8: the tissue ellipse's pixels, on a regular grid for large images."""
    h, w = image.shape[:2]
    stride = max(1, int(math.sqrt(h * w / _MAX_SAMPLED_PIXELS)))
    return image[::stride, ::stride][tissue_ellipse(h, w)[::stride, ::stride]]


def luma(pixels: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in 0..1 of Nx3 uint8 pixels (integer weights: exact and fast)."""
    return (pixels @ np.array([77, 150, 29], dtype=np.uint16)).astype(np.float32) / np.float32(256 * 255)


def exposure_from_luma(values: np.ndarray, rule: ExposureRule = ExposureRule()) -> tuple[str, float]:
    """("ok" | "dark" | "over", mean luma) by the exposure rule."""
    if values.size == 0:
        return "ok", float("nan")
    mean = float(values.mean(dtype=np.float64))
    if mean < rule.dark_max:
        return "dark", mean
    if mean > rule.over_min or float((values >= rule.white_luma).mean()) > rule.over_white_max:
        return "over", mean
    return "ok", mean


def measure_exposure(image: np.ndarray, rule: ExposureRule = ExposureRule()) -> tuple[str, float]:
    """(label, tissue mean sRGB luma in 0..1) of a uint8 RGB image."""
    return exposure_from_luma(luma(tissue_pixels(image)), rule)


def measure_glare(image: np.ndarray) -> float:
    """Fraction of the tissue ellipse that is clipped white (every channel >= SATURATED_LEVEL)."""
    roi = tissue_ellipse(*image.shape[:2])
    if not roi.any():
        return 0.0
    darkest = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])
    return float(np.count_nonzero((darkest >= SATURATED_LEVEL) & roi) / np.count_nonzero(roi))
