"""Manifest-driven preprocessing: the only place that turns pixels into model inputs.

Training calls these same functions for its deterministic (evaluation) transforms, so serving can
never drift from what a model was trained and measured with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.inference.manifest import InputSpec

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Placement:
    """Where the source image landed inside the model input: maps model-space boxes back to pixels."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_source(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        return (
            (x0 - self.pad_x) / self.scale_x,
            (y0 - self.pad_y) / self.scale_y,
            (x1 - self.pad_x) / self.scale_x,
            (y1 - self.pad_y) / self.scale_y,
        )

    def interior(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a `width` x `height` source's own pixels in the model input (the
        letterbox without its padding), as whole pixels."""
        left, top = round(self.pad_x), round(self.pad_y)
        return (
            left,
            top,
            left + max(1, round(width * self.scale_x)),
            top + max(1, round(height * self.scale_y)),
        )

    def to_input(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        return (
            x0 * self.scale_x + self.pad_x,
            y0 * self.scale_y + self.pad_y,
            x1 * self.scale_x + self.pad_x,
            y1 * self.scale_y + self.pad_y,
        )


def fit(image: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Placement]:
    """Resize an HxWxC uint8 image to the spec's size by its resize rule."""
    height, width = image.shape[:2]
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize == "stretch":
        resized = _resize(image, spec.width, spec.height, resample)
        return resized, Placement(spec.width / width, spec.height / height, 0.0, 0.0)
    scale = min(spec.width / width, spec.height / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    pad_x, pad_y = (spec.width - new_w) // 2, (spec.height - new_h) // 2
    canvas = np.full((spec.height, spec.width, image.shape[2]), spec.pad_value, dtype=np.uint8)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = _resize(image, new_w, new_h, resample)
    return canvas, Placement(new_w / width, new_h / height, float(pad_x), float(pad_y))


def _resize(image: np.ndarray, width: int, height: int, resample: Image.Resampling) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    # Pillow resizes one band at a time for modes it has no multi-band type for (e.g. 4 channels of data).
    if image.shape[2] == 3:
        return np.asarray(Image.fromarray(image).resize((width, height), resample))
    bands = [Image.fromarray(np.ascontiguousarray(image[..., c])) for c in range(image.shape[2])]
    return np.stack([np.asarray(b.resize((width, height), resample)) for b in bands], axis=-1)


def normalize(fitted: np.ndarray, spec: InputSpec) -> np.ndarray:
    """HxWxC uint8 at model size -> 1xCxHxW float32, scaled and standardised as the manifest says."""
    return normalize_batch(fitted[None], spec)


def normalize_batch(fitted: np.ndarray, spec: InputSpec) -> np.ndarray:
    """NxHxWxC uint8 at model size -> NxCxHxW float32, scaled and standardised as the manifest says."""
    if fitted.shape[3] != len(spec.channels):
        raise ValueError(f"image has {fitted.shape[3]} channels, model expects {len(spec.channels)}")
    # Make the uint8 planar first (a cheap byte copy), then one contiguous float pass: ~10x faster than
    # converting to float and transposing the float copy.
    return standardize_planar(np.ascontiguousarray(fitted.transpose(0, 3, 1, 2)), spec)


def standardize_planar(planar: np.ndarray, spec: InputSpec) -> np.ndarray:
    """NxCxHxW uint8 -> float32: (x * scale - mean) / std per channel, as (x - mean/scale) * (scale/std)."""
    mean = np.asarray(spec.mean, dtype=np.float32) / np.float32(spec.scale)
    inv_std = np.float32(spec.scale) / np.asarray(spec.std, dtype=np.float32)
    tensor = np.empty(planar.shape, dtype=np.float32)
    np.subtract(planar, mean[None, :, None, None], out=tensor, dtype=np.float32)
    tensor *= inv_std[None, :, None, None]
    return tensor


def prepare(image: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Placement]:
    """fit + normalize: the full deterministic path from an RGB(+extra) uint8 image to a model input."""
    fitted, placement = fit(image, spec)
    return normalize(fitted, spec), placement


def crop_box(
    box: tuple[float, float, float, float], width: int, height: int, margin: float
) -> tuple[int, int, int, int]:
    """The region the crop-level models see around a detected cervix.

    The box grows by `margin` of its size on every side (the detector's box is tight and the
    transformation zone's edge matters), then its short side grows to make it square where the
    frame allows, because the crop models letterbox a square. Clipped to the image; never empty.
    """
    x0, y0, x1, y1 = box
    grow_x, grow_y = (x1 - x0) * margin, (y1 - y0) * margin
    x0, y0, x1, y1 = x0 - grow_x, y0 - grow_y, x1 + grow_x, y1 + grow_y
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    right, bottom = min(width, round(cx + side / 2)), min(height, round(cy + side / 2))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def crop(image: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = region
    return image[top:bottom, left:right]
