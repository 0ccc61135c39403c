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
MAX_SAMPLED_PIXELS = 65_536  # a regular grid this dense is plenty for a mean and a fraction (±0.5 %)


@dataclass(frozen=True)
class ExposureRule:
    dark_max: float = DARK_MAX
    over_min: float = OVER_MIN
    white_luma: float = WHITE_LUMA
    over_white_max: float = OVER_WHITE_MAX
    # What the thresholds are measured over: part of the rule, so a served model keeps the definition its
    # manifest was written with.
    saturated_level: int = SATURATED_LEVEL
    tissue_semi_axes: tuple[float, float] = TISSUE_SEMI_AXES


@functools.lru_cache(maxsize=16)
def _tissue_ellipse_cached(height: int, width: int, semi_axes: tuple[float, float]) -> np.ndarray:
    ax, ay = semi_axes
    y = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / max(ay * height, 0.5)
    x = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / max(ax * width, 0.5)
    mask = (y[:, None] ** 2 + x[None, :] ** 2) <= 1.0
    mask.flags.writeable = False  # shared by every caller through the cache
    return mask


def tissue_ellipse(height: int, width: int, semi_axes: tuple[float, float] = TISSUE_SEMI_AXES) -> np.ndarray:
    """HxW bool (read-only): the central ellipse where the cervix sits in a framed colposcopy photo."""
    return _tissue_ellipse_cached(int(height), int(width), (float(semi_axes[0]), float(semi_axes[1])))


@functools.lru_cache(maxsize=16)
def _sampled_ellipse(height: int, width: int, stride: int, semi_axes: tuple[float, float]) -> np.ndarray:
    return np.ascontiguousarray(tissue_ellipse(height, width, semi_axes)[::stride, ::stride])


def tissue_pixels(image: np.ndarray, semi_axes: tuple[float, float] = TISSUE_SEMI_AXES) -> np.ndarray:
    """Nx3 uint8: the tissue ellipse's pixels, on a regular grid of at most about 65k points."""
    h, w = image.shape[:2]
    stride = max(1, math.ceil(math.sqrt(h * w / MAX_SAMPLED_PIXELS)))
    return image[::stride, ::stride][_sampled_ellipse(h, w, stride, tuple(semi_axes))]


def luma(pixels: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in 0..1 of Nx3 uint8 pixels (integer weights: exact and fast)."""
    # Channel by channel: numpy's integer matmul has no fast path and was 10x slower for the same sums,
    # which stay exact in uint16 (at most 255 * 256).
    wide = pixels.astype(np.uint16)
    weighted = wide[:, 0] * np.uint16(77) + wide[:, 1] * np.uint16(150) + wide[:, 2] * np.uint16(29)
    return weighted.astype(np.float32) / np.float32(256 * 255)


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
    return exposure_from_luma(luma(tissue_pixels(image, rule.tissue_semi_axes)), rule)


def measure_glare(image: np.ndarray) -> float:
    """Fraction of the tissue ellipse that is clipped white (every channel >= SATURATED_LEVEL)."""
    return glare_fraction(tissue_pixels(image))


def glare_fraction(pixels: np.ndarray, saturated_level: int = SATURATED_LEVEL) -> float:
    if pixels.size == 0:
        return 0.0
    clipped = (
        (pixels[:, 0] >= saturated_level)
        & (pixels[:, 1] >= saturated_level)
        & (pixels[:, 2] >= saturated_level)
    )
    return float(np.count_nonzero(clipped) / len(pixels))


@dataclass(frozen=True)
class TissueMeasures:
    exposure: str  # ok | dark | over
    luma: float
    glare_fraction: float


def measure_tissue(image: np.ndarray, rule: ExposureRule = ExposureRule()) -> TissueMeasures:
    """Exposure and glare from one sample of the tissue ellipse (what the service reports)."""
    pixels = tissue_pixels(image, rule.tissue_semi_axes)
    exposure, mean = exposure_from_luma(luma(pixels), rule)
    return TissueMeasures(exposure, mean, glare_fraction(pixels, rule.saturated_level))
