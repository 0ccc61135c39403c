"""Degradation model: PSF shapes, identities, monotone blur, label thresholds, determinism, shapes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from service.pipeline import measures
from training.data import degrade as dg
from training.data.degrade import Degradation


def _texture(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """Tissue-ish test image: pink base, fine random texture (to have high frequencies) and a bright edge."""
    rng = np.random.default_rng(seed)
    base = np.array([190, 120, 130], dtype=np.float32)
    fine = ndimage.gaussian_filter(rng.standard_normal((h, w)), 0.7) * 90
    img = base + fine[:, :, None]
    img[:, w // 2 :] += 25
    return np.clip(img, 0, 255).astype(np.uint8)


def _hf_energy(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    return float(ndimage.laplace(grey)[4:-4, 4:-4].var())


# --- PSFs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [0.0, 0.4, 0.6, 1.0, 2.5, 7.3, 20.0])
def test_disk_psf_sums_to_one_with_the_right_support(radius: float) -> None:
    psf = dg.disk_psf(radius)
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    expected = 1 if radius <= 0.5 else 2 * math.ceil(radius - 0.5) + 1
    assert psf.shape == (expected, expected)
    assert np.allclose(psf, psf.T) and np.allclose(psf, psf[::-1, ::-1]), "a pillbox is symmetric"
    if radius >= 5:
        # Flat inside, zero in the corners the disk does not reach.
        c = psf.shape[0] // 2
        assert psf[c, c] == pytest.approx(psf[c, c + int(radius) - 1])
        assert psf[0, 0] == 0.0


@pytest.mark.parametrize("length", [0.0, 1.0, 5.0, 12.5, 40.0])
def test_motion_psf_is_a_normalised_line_of_the_given_length(length: float) -> None:
    horizontal = dg.motion_psf(length, 0.0)
    assert horizontal.sum() == pytest.approx(1.0, abs=1e-5)
    assert horizontal.shape[0] == 1, "horizontal motion smears along x only"
    assert math.ceil(length) <= horizontal.shape[1] <= math.ceil(length) + 3
    vertical = dg.motion_psf(length, 90.0)
    assert vertical.shape[1] == 1 and vertical.shape[0] == horizontal.shape[1]
    diagonal = dg.motion_psf(length, 45.0)
    assert diagonal.sum() == pytest.approx(1.0, abs=1e-5)
    if length >= 5:
        # Up-right line: weight on the anti-diagonal, none in the opposite corners.
        assert diagonal[0, -1] > 0 and diagonal[-1, 0] > 0 and diagonal[0, 0] == 0 and diagonal[-1, -1] == 0


@pytest.mark.parametrize("extent", [3.0, 10.0, 30.0])
def test_shake_psf_spans_its_extent(extent: float) -> None:
    for seed in range(5):
        psf = dg.shake_psf(extent, np.random.default_rng(seed))
        assert psf.sum() == pytest.approx(1.0, abs=1e-5)
        assert (psf >= 0).all()
        ys, xs = np.nonzero(psf > 1e-6)
        span = math.hypot(ys.max() - ys.min(), xs.max() - xs.min())
        assert extent - 1 <= span <= math.sqrt(2) * extent + 3
    assert dg.shake_psf(0.0, np.random.default_rng(0)).shape == (1, 1)


# --- identities and basic properties -----------------------------------------------------------------


def test_srgb_round_trip_is_exact() -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert np.array_equal(dg.to_srgb(dg.to_linear(levels)), levels)


def test_zero_strength_ops_are_identity() -> None:
    img = _texture()
    rng = np.random.default_rng(0)
    for out in (
        dg.defocus(img, 0.0),
        dg.gaussian_blur(img, 0.0),
        dg.motion_blur(img, 0.0, 33.0),
        dg.shake(img, 0.0, rng),
        dg.expose(img, 0.0),
        dg.add_glare(img, rng, 0.0),
        dg.sensor_noise(img, rng, 0.0),
        dg.resolution_loss(img, 1.0),
        dg.apply_degradation(img, Degradation())[0],
    ):
        assert out.dtype == np.uint8 and np.array_equal(out, img)


@pytest.mark.parametrize(
    ("kind", "op"),
    [
        ("defocus", lambda img, s: dg.defocus(img, s)),
        ("gaussian", lambda img, s: dg.gaussian_blur(img, s / 2)),
        ("motion", lambda img, s: dg.motion_blur(img, 2 * s, 30.0)),
        ("shake", lambda img, s: dg.shake(img, 2 * s, np.random.default_rng(1))),
        ("resolution", lambda img, s: dg.resolution_loss(img, 1 + s)),
    ],
)
def test_blur_removes_high_frequencies_monotonically(kind: str, op) -> None:
    img = _texture()
    energies = [_hf_energy(img)] + [_hf_energy(op(img, s)) for s in (0.75, 1.5, 3.0, 6.0)]
    assert all(a > b for a, b in itertools.pairwise(energies)), f"{kind}: {energies}"
    assert energies[-1] < 0.2 * energies[0]


def test_blur_conserves_light_and_has_no_dark_border() -> None:
    img = _texture()
    out = dg.defocus(img, 6.0)
    # Blur happens in linear light, so it is the linear mean (the light) that is conserved.
    assert float(dg.to_linear(out).mean()) == pytest.approx(float(dg.to_linear(img).mean()), rel=0.01)
    # Reflective padding: the outermost columns keep the brightness of the image, no black frame.
    assert abs(float(out[:, :3].mean()) - float(img[:, :6].mean())) < 10


# --- labels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "extent", "sharp", "service_kind"),
    [
        ("defocus", 0.001, True, "none"),
        ("defocus", dg.SHARP_MAX, True, "none"),
        ("defocus", 0.0035, None, "defocus"),
        ("gaussian", 0.004, None, "defocus"),
        ("defocus", dg.BLUR_MIN, False, "defocus"),
        ("gaussian", 0.01, False, "defocus"),
        ("motion", 0.002, True, "none"),
        ("motion", 0.0045, None, "motion"),
        ("motion", 0.008, False, "motion"),
        ("shake", 0.02, False, "motion"),
    ],
)
def test_sharpness_labels_follow_the_thresholds(
    kind: str, extent: float, sharp: bool | None, service_kind: str
) -> None:
    img = _texture(90, 130)
    _, label = dg.apply_degradation(img, Degradation(blur_kind=kind, blur_extent=extent, seed=3))
    assert label.sharp is sharp
    assert label.blur_kind == service_kind and label.blur_kind in dg.BLUR_KINDS
    assert label.blur_extent == pytest.approx(extent)


def test_resolution_loss_and_source_softness_add_in_quadrature() -> None:
    img = _texture(200, 300)
    _, low_res = dg.apply_degradation(img, Degradation(resolution_short_side=100))
    assert low_res.blur_extent == pytest.approx(0.01) and low_res.sharp is False
    assert low_res.blur_kind == "defocus"
    _, mixed = dg.apply_degradation(
        img, Degradation(blur_kind="motion", blur_extent=0.002), source_blur_extent=0.002
    )
    assert mixed.blur_extent == pytest.approx(math.hypot(0.002, 0.002))
    assert mixed.sharp is None, "two sub-threshold blurs together land in the ambiguous band"
    # A resolution the image already has below is no loss at all.
    _, noop = dg.apply_degradation(img, Degradation(resolution_short_side=400))
    assert noop.sharp is True and noop.blur_extent == 0.0


def test_exposure_labels() -> None:
    img = _texture()
    assert measures.measure_exposure(img)[0] == "ok"
    labels = {
        s: dg.apply_degradation(img, Degradation(exposure_stops=s, seed=1))[1]
        for s in (-3.5, -0.5, 0, 0.4, 2.5)
    }
    assert labels[-3.5].exposure == "dark" and labels[2.5].exposure == "over"
    assert labels[-0.5].exposure == labels[0].exposure == labels[0.4].exposure == "ok"
    lum = [labels[s].luminance for s in sorted(labels)]
    assert lum == sorted(lum), "measured luminance rises with exposure"
    # The label measures the picture: a dark source is dark even with a neutral recipe.
    dark_source = (img * 0.2).astype(np.uint8)
    assert dg.apply_degradation(dark_source, Degradation())[1].exposure == "dark"


def test_under_exposure_adds_relative_noise() -> None:
    flat = np.full((80, 80, 3), 150, dtype=np.uint8)
    normal, _ = dg.apply_degradation(flat, Degradation(noise_level=0.01, seed=2))
    dark, _ = dg.apply_degradation(flat, Degradation(exposure_stops=-3.0, seed=2))
    rel = [float(dg.to_linear(x).std() / dg.to_linear(x).mean()) for x in (normal, dark)]
    assert rel[1] > 2 * rel[0]


def test_glare_label_matches_the_clipped_fraction() -> None:
    img = _texture(240, 320)
    for seed, fraction in [(0, 0.02), (1, 0.08), (2, 0.25)]:
        out, label = dg.apply_degradation(img, Degradation(glare_fraction=fraction, seed=seed))
        measured = measures.measure_glare(out)
        assert label.glare_fraction == pytest.approx(measured, abs=0.01)
        assert 0.7 * fraction <= measured <= 1.6 * fraction + 0.01
        assert label.exposure == "ok", "glare is not reported as over-exposure"
        # Highlights sit on the tissue: most added clipped pixels are inside the central ellipse.
        clipped = out.min(axis=2) >= measures.SATURATED_LEVEL
        roi = measures.tissue_ellipse(*img.shape[:2])
        assert clipped[roi].sum() > 0.6 * clipped.sum()
        # Soft falloff: a ring of bright-but-unclipped pixels borders the clipped cores.
        ring = ndimage.binary_dilation(clipped, iterations=2) & ~clipped
        assert (out[ring].astype(int).min(axis=1) - img[ring].astype(int).min(axis=1)).mean() > 8


def test_over_exposure_is_not_reported_as_glare() -> None:
    img = _texture()
    _, label = dg.apply_degradation(img, Degradation(exposure_stops=2.5))
    assert label.exposure == "over" and label.glare_fraction < 0.01


# --- determinism, shapes, sampling ------------------------------------------------------------------------


def test_same_seed_same_output_and_different_seed_differs() -> None:
    img = _texture()
    deg = Degradation(blur_kind="shake", blur_extent=0.02, glare_fraction=0.05, noise_level=0.02, seed=7)
    a, la = dg.apply_degradation(img, deg)
    b, lb = dg.apply_degradation(img, deg)
    assert np.array_equal(a, b) and la == lb
    c, _ = dg.apply_degradation(img, Degradation(**{**deg.__dict__, "seed": 8}))
    assert not np.array_equal(a, c)
    d1 = dg.sample_degradation(np.random.default_rng(5))
    d2 = dg.sample_degradation(np.random.default_rng(5))
    assert d1 == d2


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (5, 7), (1, 1), (300, 120)])
def test_every_op_preserves_dtype_and_shape(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    outs = [
        dg.defocus(img, 4.0),
        dg.gaussian_blur(img, 2.0),
        dg.motion_blur(img, 9.0, 120.0),
        dg.shake(img, 9.0, rng),
        dg.expose(img, -1.5),
        dg.add_glare(img, rng, 0.1),
        dg.sensor_noise(img, rng, 0.05),
        dg.jpeg_recompress(img, 30),
        dg.resolution_loss(img, 3.0),
    ]
    for i in range(25):
        outs.append(
            dg.apply_degradation(img, dg.sample_degradation(np.random.default_rng(i), p_clean=0.0))[0]
        )
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == img.shape


def test_sampler_mix_is_realistic_and_balanced() -> None:
    rng = np.random.default_rng(0)
    degs = [dg.sample_degradation(rng) for _ in range(2000)]
    clean = [d for d in degs if d.blur_kind == "none" and d.exposure_stops == 0 and d.glare_fraction == 0]
    assert 0.35 <= len(clean) / len(degs) <= 0.65
    blurred = [d for d in degs if d.blur_kind != "none"]
    iso = sum(d.blur_kind in ("defocus", "gaussian") for d in blurred) / len(blurred)
    assert 0.4 <= iso <= 0.6, "defocus-like and motion-like blur are balanced"
    extents = np.array([d.blur_extent for d in blurred])
    assert (extents <= dg.SHARP_MAX).mean() > 0.15 and (extents >= dg.BLUR_MIN).mean() > 0.4
    assert sum(d.exposure_stops < -2 for d in degs) > 50 and sum(d.exposure_stops > 1 for d in degs) > 50
    assert sum(d.glare_fraction > measures.GLARE_MAX for d in degs) > 50
    combined = [d for d in blurred if d.noise_level > 0 and d.jpeg_quality > 0]
    assert len(combined) > 50, "nuisances are combined, not applied one at a time"
    assert all(d.blur_extent >= 0 and 0 <= d.jpeg_quality <= 95 for d in degs)
    assert dg.sample_degradation(rng, p_clean=1.0).blur_kind == "none"


def test_recipe_is_relative_to_image_size() -> None:
    """One recipe gives the same label, and proportionally the same blur, at two resolutions."""
    small = _texture(100, 140)
    big = np.asarray(Image.fromarray(small).resize((420, 300), Image.Resampling.BILINEAR))
    deg = Degradation(blur_kind="defocus", blur_extent=0.03)
    out_small, l_small = dg.apply_degradation(small, deg)
    out_big, l_big = dg.apply_degradation(big, deg)
    assert (l_small.sharp, l_small.blur_kind, l_small.exposure) == (
        l_big.sharp,
        l_big.blur_kind,
        l_big.exposure,
    )
    assert l_small.blur_extent == l_big.blur_extent
    assert l_small.luminance == pytest.approx(l_big.luminance, abs=0.01)
    back = np.asarray(Image.fromarray(out_big).resize((140, 100), Image.Resampling.BOX))
    assert np.abs(back.astype(int) - out_small.astype(int)).mean() < 6


@pytest.mark.parametrize("kind", ["defocus", "gaussian", "motion"])
def test_large_psf_fast_path_matches_direct_blur(kind: str) -> None:
    """Big PSFs on big images are applied at 1/k resolution. That is the PSF (shrunk in quadrature)
    plus an isotropic spread of equivalent radius k px: compare with exactly that, done directly."""
    lin = dg.to_linear(_texture(240, 320))
    deg = Degradation(blur_kind=kind, blur_extent=0.004, motion_angle_deg=30.0)
    # As if the short side were 3000 px: radius 12 px, reduction factor k = 3.
    fast = dg._blur_linear(lin, deg, 3000, np.random.default_rng(0))
    shrunk = dg._psf_blur(lin, kind, math.sqrt(12.0**2 - 3.0**2), 30.0, np.random.default_rng(0))
    model = dg._gaussian_linear(shrunk, 3.0 / 2)
    assert fast.shape == lin.shape
    inner = (slice(12, -12), slice(12, -12))
    assert np.abs(fast - model)[inner].mean() < 0.025 * float(lin.mean())
