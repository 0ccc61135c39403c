"""Test-time voting for the severity model (the U-Net++/RepVGG paper's scheme), in numpy.

The service and the evaluation step both build the variants here, so the reported "with voting"
figures are exactly what is served. Variants and weights are read from the severity manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.inference.manifest import InputSpec
from service.inference.preprocess import standardize_planar

# name -> weight, in the paper's order: original, lesion-only, both flipped, two brightness variants.
PAPER_WEIGHTS: dict[str, float] = {
    "original": 0.2,
    "lesion_only": 0.25,
    "original_flipped": 0.15,
    "lesion_only_flipped": 0.2,
    "brighter": 0.11,
    "darker": 0.09,
}
PAPER_BRIGHTNESS = {"brighter": 1.2, "darker": 0.8}


def voting_variants(
    rgb: np.ndarray, lesion: np.ndarray, brightness: Mapping[str, float] = PAPER_BRIGHTNESS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HxWx3 uint8 RGB and HxW uint8 lesion probability (0..255) -> named (rgb, lesion) variants.

    "lesion_only" keeps the RGB where the lesion channel says lesion and blacks out the rest, so the
    classifier must judge the lesion itself; brightness variants scale the RGB (clipped), not the mask.
    """
    lesion_only = (rgb.astype(np.uint16) * lesion[..., None] // 255).astype(np.uint8)
    variants = {
        "original": (rgb, lesion),
        "lesion_only": (lesion_only, lesion),
        "original_flipped": (rgb[:, ::-1], lesion[:, ::-1]),
        "lesion_only_flipped": (lesion_only[:, ::-1], lesion[:, ::-1]),
    }
    for name, factor in brightness.items():
        variants[name] = (np.clip(rgb.astype(np.float32) * factor, 0, 255).astype(np.uint8), lesion)
    return variants


def weighted_vote(probabilities: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of per-variant probabilities; weights need not sum to 1."""
    missing = set(weights) - set(probabilities)
    if missing:
        raise ValueError(f"no probability for voting variant(s) {sorted(missing)}")
    total = sum(weights.values())
    return float(sum(probabilities[name] * w for name, w in weights.items()) / total)


def variant_batch(
    variants: Mapping[str, tuple[np.ndarray, np.ndarray]], order: Sequence[str], spec: InputSpec
) -> np.ndarray:
    """Variants in `order` as one Nx4xHxW float32 batch, normalised as the severity manifest says."""
    height, width = variants[order[0]][1].shape
    planar = np.empty((len(order), 4, height, width), dtype=np.uint8)  # built planar: no strided float pass
    for index, name in enumerate(order):
        rgb, lesion = variants[name]
        planar[index, :3] = rgb.transpose(2, 0, 1)
        planar[index, 3] = lesion
    return standardize_planar(planar, spec)
