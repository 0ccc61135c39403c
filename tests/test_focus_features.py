"""The quality model's focus features: what they must respond to."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, uniform_filter1d

from training.tasks.quality import (
    DirectionalEnergy,
    QualityFeatures,
    SeparableBlur,
    quarter_turn,
    tissue_mask,
)

SIDE = 448


def _texture(seed: int = 0) -> np.ndarray:
    """A grey, cervix-like random texture in the model's [-1, 1] units."""
    texture = gaussian_filter(np.random.default_rng(seed).normal(size=(SIDE, SIDE)), 1.0)
    return 0.25 * texture / texture.std()


def _energies(grey: np.ndarray, *, masked: bool = True) -> torch.Tensor:
    image = torch.from_numpy(np.repeat(grey[None, None], 3, axis=1).astype(np.float32))
    tissue = tissue_mask(image) if masked else torch.ones_like(image[:, :1])
    return DirectionalEnergy()(image, SeparableBlur(1.0)(image), tissue)[0]


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


def test_a_dark_aperture_does_not_change_the_focus_statistics() -> None:
    """A blurred cervix behind a round field of view reads the same as without it: over the whole crop, the
    flat surround and the aperture's sharp edge would move every energy by how much of the crop they take."""
    blurred = gaussian_filter(_texture(seed=2), 3.0)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    framed = np.where((yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 > (0.4 * SIDE) ** 2, -1.0, blurred)
    plain = _energies(blurred)
    assert torch.allclose(_energies(framed), plain, atol=0.03)
    assert float((_energies(framed, masked=False)[:4] - plain[:4]).abs().min()) > 0.2


def test_the_tissue_mask_skips_the_surround_its_margin_and_the_border() -> None:
    image = torch.zeros(1, 3, 64, 64)
    image[..., :, 40:] = -1.0  # a dark band on the right
    tissue = tissue_mask(image)[0, 0]
    assert tissue[20:44, 20:31].all()  # tissue 9 px or more from the band and the border
    assert not tissue[:, 32:].any() and not tissue[:8].any() and not tissue[:, :8].any()


def test_quarter_turn_is_rot90() -> None:
    image = torch.randn(2, 3, 6, 6)
    for turns in range(-1, 5):
        assert torch.equal(quarter_turn(image, turns), torch.rot90(image, turns, dims=(2, 3)))


def test_the_turns_stage_view_reads_a_turned_crop_as_the_crop_itself() -> None:
    """A phone held sideways must not change the exam stage: the four-turn view's features are the same for
    a crop and its quarter turns (each is the other's views in another order); a single view's are not."""
    features = QualityFeatures(pretrained=True, stage_views=("turns112", "crop224")).eval()
    crop = torch.from_numpy(np.repeat(_texture(seed=3)[None, None], 3, axis=1).astype(np.float32))
    crop[:, 0] += 0.3 * torch.linspace(-1, 1, SIDE)  # a colour gradient, so orientation shows
    with torch.no_grad():
        upright = features(crop)
        for turns in (1, 2, 3):
            turned = features(torch.rot90(crop, turns, dims=(2, 3)))
            assert torch.allclose(turned["pooled_turns112"], upright["pooled_turns112"], atol=1e-4)
        assert not torch.allclose(turned["pooled_crop224"], upright["pooled_crop224"], atol=1e-2)
