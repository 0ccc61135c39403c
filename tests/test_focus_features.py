"""The quality model's focus features: what they must respond to."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, uniform_filter1d

from training.tasks.quality import DirectionalEnergy, SeparableBlur

SIDE = 448


def _texture(seed: int = 0) -> np.ndarray:
    """A grey, cervix-like random texture in the model's [-1, 1] units."""
    texture = gaussian_filter(np.random.default_rng(seed).normal(size=(SIDE, SIDE)), 1.0)
    return 0.25 * texture / texture.std()


def _energies(grey: np.ndarray) -> torch.Tensor:
    image = torch.from_numpy(np.repeat(grey[None, None], 3, axis=1).astype(np.float32))
    return DirectionalEnergy()(image, SeparableBlur(1.0)(image))[0]


def test_directional_energy_is_weakest_along_a_linear_motion_blur() -> None:
    texture = _texture()
    sharp = _energies(texture)
    shaken = _energies(uniform_filter1d(texture, size=9, axis=1))  # horizontal motion over 9 px
    # The first four values: full-resolution log energies along 0, 90, 45 and 135 degrees.
    assert int(torch.argmin(shaken[:4])) == 0
    assert float(shaken[8]) > float(sharp[8]) + 0.5  # the spread (anisotropy) of the sorted energies


def test_directional_energies_of_a_sharp_isotropic_texture_agree() -> None:
    # Diagonal differences are per pixel of distance, so no direction reads sharper by construction.
    assert float(_energies(_texture(seed=1))[8]) < 0.15
