"""Classical focus measures, evaluated beside the quality model on the same crops.

The ColpoNet study filtered blurry images with the variance of the Laplacian; the focus-assessment
study claims CNNs beat such measures. These are the usual three, on 8-bit grey of the model crop.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ _GREY


def variance_of_laplacian(rgb: np.ndarray) -> float:
    return float(ndimage.laplace(grey(rgb)).var())


def tenengrad(rgb: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude."""
    g = grey(rgb)
    return float(np.mean(ndimage.sobel(g, axis=0) ** 2 + ndimage.sobel(g, axis=1) ** 2))


def brenner(rgb: np.ndarray) -> float:
    """Mean squared difference of pixels two apart (horizontal and vertical)."""
    g = grey(rgb)
    return float(np.mean((g[:, 2:] - g[:, :-2]) ** 2) + np.mean((g[2:] - g[:-2]) ** 2))


FOCUS_MEASURES = {"variance_of_laplacian": variance_of_laplacian, "tenengrad": tenengrad, "brenner": brenner}
