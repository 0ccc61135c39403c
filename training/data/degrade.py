"""Physically-modelled capture degradations, applied to sharp source images at SOURCE resolution.

The quality model learns "retake this photo" from sharp real colposcopy images that we degrade
here. Every operation works in linear light where physics says it should (blur, exposure, glare,
sensor noise) and in the camera's output domain where the camera pipeline does (resolution loss,
JPEG). Recipes (`Degradation`) use strengths relative to the image size, so one recipe means the
same thing on an 800x600 atlas image and on a 4032x3024 phone photo.

Definition of "sharp" (used by the whole project)
-------------------------------------------------
Blur extent is the PSF's effective radius relative to the image's short side::

    blur_extent = radius_px / short_side

with radius = disk radius (defocus); 2*sigma (Gaussian: a disk of radius r has per-axis sigma r/2,
so the two agree in second moment); half the path extent (linear motion, hand shake); and, for
resolution loss to a short side of N px, 1/N (box downscale + bilinear upscale spread ~ one source
pixel-of-the-small-image, 2*sigma ~= factor). Several blurs add in quadrature (variances add under
convolution). Thresholds:

* ``blur_extent <= SHARP_MAX = 0.0025``: sharp. The focus check sees a cervix crop resized to
  256-384 px, i.e. a pixel pitch of ~0.16-0.39 % of the frame's short side; 0.25 % is about one
  check pixel, below what the check (or a clinician on a phone screen) can see. It is also the
  intrinsic softness of the atlas itself (~1.5 px at 600 px), which clinicians accept as reference.
* ``blur_extent >= BLUR_MIN = 0.005``: not sharp. At 0.5 % the blur spans 1.3-3 check pixels and a
  disk PSF's first MTF zero is at a period of 1.64 r = 0.8 % of the short side, so punctation and
  mosaic (vessel spacing ~0.3-0.5 % of the short side) are erased, not just softened.
* in between: ``QualityLabel.sharp is None`` -- ambiguous, do not train the focus head on it.

What the thresholds mean on real images (19 sharp IARC atlas acetic-acid photos, marks removed,
defocus added at 600 px, variance of the Laplacian of a 256 px-short-side downscale, median ratio to
the unblurred image): 0.001 -> 0.88, 0.0025 -> 0.54, 0.004 -> 0.26, 0.005 -> 0.16, 0.01 -> 0.03. On a
central 60 % crop (as the service checks) the fall is steeper: 0.29 at SHARP_MAX, 0.06 at BLUR_MIN.
Sources are not perfectly sharp: pass `source_blur_extent` if known; it adds in quadrature. (The
atlas' 800x600 frames look like upscaled SD video, plausibly ~1 px soft = ~0.0017; not measured.)

Exposure is *measured*, so a source that was already dark is labelled dark: the mean sRGB luma
(Rec. 601, 0..1) of the central tissue ellipse (semi-axes 0.35 W x 0.35 H, where the cervix sits in
a framed colposcopy photo), on the glare-free scene after the recipe's exposure change. All 209 IARC
atlas images, which clinicians accept, measure 0.37-0.76 (median 0.60).
``DARK_MAX = 0.28``: the median atlas image turns "dark" at -2.25 EV (10-90 %: -2.75 to -1.75 EV);
the darkest atlas images (iodine-stained, dark by nature) at -1 EV. ``OVER_MIN = 0.85``, or more
than 30 % of the tissue at luma >= 0.92: acetowhite tissue is washed out and its whitening can no
longer be judged; the median atlas image turns "over" at +1.25 EV (10-90 %: +0.75 to +2.25 EV), no
atlas image is "over" as is (max 16 % near-white). The measured luma rides along in the label so a
trainer can drop samples near a threshold.

Glare is the fraction of the tissue ellipse that is clipped white (every channel >= 245, no tissue
visible), measured at nominal exposure so over-exposure is not double-counted as glare: the two
need different fixes (less light vs. another angle). Wet acetic-acid tissue always has speckle
highlights: the atlas measures median 0.8 %, 95th percentile 4.1 %, max 7 %. ``GLARE_MAX = 0.10``
(a tenth of the tissue hidden under clipped white, above every atlas image) is where the service
should ask for a retake.

The exposure and glare measures and their thresholds live in `service/pipeline/measures.py`: the service
reports exactly what these labels mean.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.signal import fftconvolve

# Labels use the service's own measures, so a training label and a served reason cannot drift apart.
from service.pipeline.measures import (
    SATURATED_LEVEL,
    exposure_from_luma,
    luma,
    measure_glare,
    tissue_ellipse,
    tissue_pixels,
)

# --- label vocabulary and thresholds -------------------------------------------------------------

BLUR_KINDS = ("none", "defocus", "motion")  # what the service reports
EXPOSURES = ("ok", "dark", "over")
# Kinds a recipe can use; the service only distinguishes isotropic (defocus) from directional (motion).
RECIPE_BLURS = ("none", "defocus", "gaussian", "motion", "shake")
_SERVICE_KIND = {
    "none": "none",
    "defocus": "defocus",
    "gaussian": "defocus",
    "motion": "motion",
    "shake": "motion",
    "resolution": "defocus",
    "source": "defocus",
}

SHARP_MAX = 0.0025  # blur_extent at or below: sharp
BLUR_MIN = 0.005  # blur_extent at or above: not sharp; in between: ambiguous (sharp=None)
# Radiance of an 8-bit-clipped specular relative to white; true value unknown (>1), 4 is conservative.
SPECULAR_GAIN = 4.0
# Under-exposed photos never come noise-free: the phone raises gain. Minimum noise level when dark.
DARK_NOISE_LEVEL = 0.02


@dataclass(frozen=True)
class QualityLabel:
    """What a degraded image should be reported as. `sharp=None` means ambiguous: skip it for focus."""

    sharp: bool | None
    blur_kind: str  # one of BLUR_KINDS; "none" iff sharp is True
    blur_extent: float  # combined PSF radius / short side
    exposure: str  # one of EXPOSURES, measured on the output
    glare_fraction: float  # measured clipped-white fraction of the tissue ellipse
    luminance: float = float("nan")  # measured tissue mean sRGB luma the exposure label came from


@dataclass(frozen=True)
class Degradation:
    """A sampled recipe. Strengths are relative to the image, so one recipe fits any size."""

    blur_kind: str = "none"  # one of RECIPE_BLURS
    blur_extent: float = 0.0  # equivalent radius / short side (see module docstring)
    motion_angle_deg: float = 0.0  # direction of linear motion blur
    exposure_stops: float = 0.0  # +1 doubles the light
    glare_fraction: float = 0.0  # target clipped-glare fraction of the tissue ellipse
    noise_level: float = 0.0  # Poisson-Gaussian noise std at full-scale white, linear units
    jpeg_quality: int = 0  # 0: no re-compression
    resolution_short_side: int = 0  # downscale so the short side is this many px, then back; 0: none
    seed: int = 0  # drives every random part (shake path, glare blobs, noise)

    def __post_init__(self) -> None:
        if self.blur_kind not in RECIPE_BLURS:
            raise ValueError(f"blur_kind {self.blur_kind!r} is not one of {RECIPE_BLURS}")
        if self.blur_extent < 0 or self.glare_fraction < 0 or self.noise_level < 0:
            raise ValueError("strengths must be non-negative")


# --- sRGB <-> linear ------------------------------------------------------------------------------


def _srgb_to_linear_float(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


_TO_LINEAR = _srgb_to_linear_float(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
# 16-bit linear -> 8-bit sRGB table: a lookup is ~10x faster than pow() and exact to the 8-bit output.
_LIN_STEPS = 65535
_lin_grid = np.arange(_LIN_STEPS + 1, dtype=np.float64) / _LIN_STEPS
_TO_SRGB = np.round(
    255.0 * np.where(_lin_grid <= 0.0031308, 12.92 * _lin_grid, 1.055 * _lin_grid ** (1 / 2.4) - 0.055)
).astype(np.uint8)


def to_linear(image: np.ndarray) -> np.ndarray:
    """uint8 sRGB -> float32 linear light in [0, 1]."""
    return _TO_LINEAR[image]


def to_srgb(linear: np.ndarray) -> np.ndarray:
    """float linear light (any range; clipped to [0, 1] like a sensor) -> uint8 sRGB."""
    index = np.clip(linear, 0.0, 1.0) * np.float32(_LIN_STEPS) + np.float32(0.5)
    return _TO_SRGB[index.astype(np.int32)]


# --- point spread functions -----------------------------------------------------------------------


def disk_psf(radius: float) -> np.ndarray:
    """Pillbox (defocus) PSF of `radius` px, pixel-integrated by 8x8 supersampling; sums to 1.

    Support is (2*ceil(radius - 0.5) + 1) px square: a pixel is included iff the disk reaches it.
    """
    if radius <= 0.5:
        return np.ones((1, 1), dtype=np.float32)
    half = math.ceil(radius - 0.5)
    ss = 8
    offsets = (np.arange(ss) + 0.5) / ss - 0.5
    grid = np.arange(-half, half + 1, dtype=np.float64)
    fine = (grid[:, None] + offsets[None, :]).ravel()
    inside = (fine[:, None] ** 2 + fine[None, :] ** 2) <= radius**2
    psf = inside.reshape(2 * half + 1, ss, 2 * half + 1, ss).mean(axis=(1, 3))
    return (psf / psf.sum()).astype(np.float32)


def _splat(points: np.ndarray) -> np.ndarray:
    """Render (N, 2) x/y points, equally weighted, into a kernel by bilinear splatting; sums to 1."""
    points = points - (points.min(axis=0) + points.max(axis=0)) / 2  # centre the path on the kernel
    half = math.ceil(np.abs(points).max() + 1e-9)
    size = 2 * half + 1
    x = points[:, 0] + half
    y = points[:, 1] + half
    x0 = np.floor(x).astype(int)
    y0 = np.floor(y).astype(int)
    fx = x - x0
    fy = y - y0
    psf = np.zeros((size + 1, size + 1), dtype=np.float64)
    corners = ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy))
    for dy, dx, w in corners:
        np.add.at(psf, (y0 + dy, x0 + dx), w)
    psf = psf[:size, :size]
    # Trim rows/columns that got no weight (bilinear weights of exactly 0 at the far edge).
    rows = np.nonzero(psf.sum(axis=1) > 0)[0]
    cols = np.nonzero(psf.sum(axis=0) > 0)[0]
    r = max(half - rows.min(), rows.max() - half)
    c = max(half - cols.min(), cols.max() - half)
    psf = psf[half - r : half + r + 1, half - c : half + c + 1]
    return (psf / psf.sum()).astype(np.float32)


def _resample_path(path: np.ndarray, step: float = 0.25) -> np.ndarray:
    """Points every `step` px along a polyline, so splatting leaves no gaps (constant speed)."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, math.ceil(arc[-1] / step) + 1)
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, path[:, 0]), np.interp(s, arc, path[:, 1])], axis=1)


def motion_psf(length: float, angle_deg: float) -> np.ndarray:
    """Uniform linear-motion PSF: a line of `length` px at `angle_deg` (0 = horizontal); sums to 1."""
    if length <= 0:
        return np.ones((1, 1), dtype=np.float32)
    a = math.radians(angle_deg)
    # Image rows grow downwards, so a positive angle tilts the line up-right as in a photo.
    end = 0.5 * length * np.array([math.cos(a), -math.sin(a)])
    return _splat(_resample_path(np.stack([-end, end])))


def shake_trajectory(rng: np.random.Generator, steps: int = 512) -> np.ndarray:
    """Random camera path (x, y) after Boracchi & Foi (2012): an inertial random walk with Gaussian
    jitter, a centripetal pull back towards the aim point and occasional abrupt, mostly reversing,
    jerks. Units follow their generator (path length 60); callers rescale to the wanted extent."""
    total = 60.0
    step_len = total / (steps - 1)
    centripetal = 0.7 * rng.random()
    jitter = 10.0 * rng.random()
    jerk_rate = 0.2 * rng.random()
    # Their anxiety range (0-0.1); with 512 steps the paths look like measured shake PSFs (Levin 2009).
    anxiety = 0.1 * rng.random()
    angle = 2 * math.pi * rng.random()
    v = step_len * complex(math.cos(angle), math.sin(angle))
    x = np.zeros(steps, dtype=np.complex128)
    noise = rng.standard_normal((steps, 2))
    jerks = rng.random(steps) < jerk_rate * anxiety
    turns = rng.random(steps) - 0.5
    for t in range(steps - 1):
        kick = 2 * v * complex(math.cos(math.pi + turns[t]), math.sin(math.pi + turns[t])) if jerks[t] else 0
        dv = kick + anxiety * (jitter * complex(noise[t, 0], noise[t, 1]) - centripetal * x[t]) * step_len
        v = v + dv
        v = v / (abs(v) + 1e-12) * step_len
        x[t + 1] = x[t] + v
    return np.stack([x.real, x.imag], axis=1)


def _diameter(points: np.ndarray) -> float:
    sub = points[:: max(1, len(points) // 256)]
    return float(np.sqrt(((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1)).max())


def shake_psf(extent: float, rng: np.random.Generator) -> np.ndarray:
    """Hand-shake PSF: a random trajectory scaled so its diameter is `extent` px; sums to 1."""
    if extent <= 0:
        return np.ones((1, 1), dtype=np.float32)
    path = shake_trajectory(rng)
    # Boracchi & Foi also vary the exposure time: the shutter sees only part of the hand's path.
    keep = int(len(path) * rng.uniform(0.25, 1.0))
    start = int(rng.integers(0, len(path) - keep + 1))
    path = path[start : start + keep]
    diameter = _diameter(path)
    path = path * (extent / diameter) if diameter > 0 else path
    return _splat(_resample_path(path))


# --- blur ops ------------------------------------------------------------------------------------


def _convolve(linear: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Convolve HxWxC float with a 2D PSF, reflecting at the borders (no dark frame from zero-padding)."""
    if psf.size == 1:
        return linear.copy()
    kh, kw = psf.shape
    if psf.size <= 25:
        # A handful of taps: direct convolution beats the FFT's fixed cost.
        kernel = psf[:, :, None]
        return ndimage.convolve(linear, kernel, mode="reflect")  # = numpy "symmetric", as below
    ph, pw = kh // 2, kw // 2
    padded = np.pad(linear, ((ph, ph), (pw, pw), (0, 0)), mode="symmetric")
    return fftconvolve(padded, psf[:, :, None], mode="valid", axes=(0, 1)).astype(np.float32)


def _gaussian_linear(linear: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return linear.copy()
    return ndimage.gaussian_filter(linear, sigma=(sigma, sigma, 0), mode="reflect", truncate=3.0)


def defocus(image: np.ndarray, radius_px: float) -> np.ndarray:
    """Out-of-focus blur: pillbox PSF of `radius_px`, in linear light."""
    return to_srgb(_convolve(to_linear(image), disk_psf(radius_px)))


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (separable), in linear light. Equivalent radius for labels: 2 * sigma."""
    return to_srgb(_gaussian_linear(to_linear(image), sigma_px))


def motion_blur(image: np.ndarray, length_px: float, angle_deg: float) -> np.ndarray:
    """Linear motion blur of `length_px` at `angle_deg`, in linear light."""
    return to_srgb(_convolve(to_linear(image), motion_psf(length_px, angle_deg)))


def shake(image: np.ndarray, extent_px: float, rng: np.random.Generator) -> np.ndarray:
    """Hand-shake blur along a random trajectory of diameter `extent_px`, in linear light."""
    return to_srgb(_convolve(to_linear(image), shake_psf(extent_px, rng)))


# --- exposure, glare, noise ------------------------------------------------------------------------


def expose(image: np.ndarray, stops: float) -> np.ndarray:
    """Change exposure by `stops` (EV) in linear light; the sensor clips highlights at white."""
    if stops == 0:
        return image.copy()
    return to_srgb(to_linear(image) * np.float32(2.0**stops))


def _poisson_gaussian(linear: np.ndarray, rng: np.random.Generator, level: float) -> np.ndarray:
    """Signal-dependent sensor noise: var = a*x + b (shot + read noise), Gaussian approximation.

    `level` is the std at full-scale white; read noise is a quarter of it, so dark pixels keep a floor
    and their relative noise (std / x) grows as exposure falls, as on a real sensor."""
    if level <= 0:
        return linear
    a = level**2
    b = (0.25 * level) ** 2
    std = np.sqrt(a * np.clip(linear, 0.0, None) + b, dtype=np.float32)
    return linear + std * rng.standard_normal(linear.shape, dtype=np.float32)


def sensor_noise(image: np.ndarray, rng: np.random.Generator, level: float) -> np.ndarray:
    """Poisson-Gaussian (signal-dependent) noise in linear light; `level` = std at white."""
    if level <= 0:
        return image.copy()
    return to_srgb(_poisson_gaussian(to_linear(image), rng, level))


def _glare_site_weights(linear: np.ndarray) -> np.ndarray:
    """Where speculars land, on a coarse grid: wet tissue is pink/white and central, the speculum and
    dark vaginal walls less so. Returned weights are non-negative, at most 64 px on the long side."""
    h, w = linear.shape[:2]
    step = max(1, math.ceil(max(h, w) / 64))
    small = linear[::step, ::step]
    sh, sw = small.shape[:2]
    y = (np.arange(sh) * step - (h - 1) / 2) / (0.5 * h)
    x = (np.arange(sw) * step - (w - 1) / 2) / (0.5 * w)
    # ~90 % of the weight falls inside the tissue ellipse (r ~ 0.7) when the colours are uniform.
    centrality = np.exp(-((y[:, None] ** 2 + x[None, :] ** 2) / 0.45**2))
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    tissue_like = 0.15 + (r >= np.maximum(g, b)).astype(np.float64) * (0.3 + np.clip(r, 0, 1))
    return centrality * tissue_like


def _glare_blob(rng: np.random.Generator, core_area: float) -> tuple[np.ndarray, int]:
    """Radiance patch of one specular highlight whose clipped core covers ~`core_area` px.

    Shape: an irregular ellipse (low-order angular wobble plus a lumpy rim) -- wet tissue ridges give
    elongated, ragged highlights. Core profile exp(k*(1 - d^2)): >= 1 (clips) inside d <= 1, peaks at
    e^k ~ 7-55x white so it still clips under moderate under-exposure and blooms when blurred.
    Around it a smooth, dim halo (veiling glare / scattering in the mucus film) of 15-40 % of white
    at the rim, fading by d ~ 2.5: the soft falloff real highlights have.
    """
    aspect = 1.0 + 2.0 * rng.random()
    ry = math.sqrt(max(core_area, 1.0) / (math.pi * aspect))
    rx = ry * aspect
    k = 2.0 + 2.0 * rng.random()
    half = math.ceil(2.6 * rx) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    theta = rng.random() * math.pi
    c, s = math.cos(theta), math.sin(theta)
    u = (c * xx + s * yy) / rx
    v = (-s * xx + c * yy) / ry
    phi = np.arctan2(v, u)
    wobble = np.ones_like(phi)
    for order in (2, 3):
        phase = np.float32(rng.random() * 2 * math.pi)
        wobble += np.float32(0.08 * rng.standard_normal()) * np.cos(order * phi + phase)
    smooth_d2 = (u * u + v * v) / np.clip(wobble, 0.5, None) ** 2
    # Lumpy rim: smooth random field at ~1/6 of the blob size, as wet epithelium ridges break the edge.
    lumps = ndimage.gaussian_filter(rng.standard_normal(phi.shape).astype(np.float32), max(0.15 * ry, 0.7))
    lumps *= np.float32(0.25) / max(float(lumps.std()), 1e-6)
    d2 = smooth_d2 * np.clip(1.0 + lumps, 0.4, None)
    core = np.where(d2 < 2.6, np.exp(np.float32(k) * (1.0 - np.minimum(d2, 2.6))), 0.0)
    halo = np.float32(0.15 + 0.25 * rng.random()) * np.exp(-smooth_d2 / np.float32(2 * 0.8**2))
    halo[smooth_d2 > 6.5] = 0.0  # keeps the patch finite
    return (core + halo).astype(np.float32), half


def _saturated_linear(linear: np.ndarray) -> np.ndarray:
    """HxW bool: every channel at or above the clipped-white level (linear-light input)."""
    level = _TO_LINEAR[SATURATED_LEVEL]
    return np.minimum(np.minimum(linear[..., 0], linear[..., 1]), linear[..., 2]) >= level


def _expand_highlights(linear: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Give the source's clipped speculars back some of the radiance the 8-bit file cut off (gain
    SPECULAR_GAIN): without it a blurred or darkened photo would lose its highlights, while a real
    camera's speculars stay white under -2 EV and bloom when blurred. `image` is the uint8 source of
    `linear` (the clip test is 3x cheaper on it). In place; returns `linear`."""
    clipped = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2]) >= SATURATED_LEVEL
    linear[clipped] *= np.float32(SPECULAR_GAIN)
    return linear


def _add_glare_linear(linear: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Add white specular blobs (HDR radiance, may exceed 1) until ~`fraction` of the tissue ellipse
    is clipped white. Works in place on a copy; returns it."""
    out = linear.copy()
    if fraction <= 0:
        return out
    h, w = out.shape[:2]
    roi = tissue_ellipse(h, w)
    roi_area = max(int(roi.sum()), 1)
    target = fraction * roi_area
    clipped = _saturated_linear(out) & roi
    have = float(clipped.sum())
    weights = _glare_site_weights(out)
    cdf = np.cumsum(weights.ravel())
    cdf /= cdf[-1]
    sh, sw = weights.shape
    # Split the target into a few big highlights and a spray of specks, as on wet acetowhite tissue.
    shares = rng.dirichlet(np.full(int(rng.integers(1, 10)), 0.7))
    queue = list(shares * (target - have))
    for _ in range(64):  # bounded: each pass adds one blob
        need = target - have
        if need <= max(0.002 * roi_area, 1.0):
            break
        area = queue.pop(0) if queue else need
        area = min(max(area, 4.0), need * 1.2)
        blob, half = _glare_blob(rng, area)
        cell = int(np.searchsorted(cdf, rng.random()))
        cy = int((cell // sw + rng.random()) * h / sh)
        cx = int((cell % sw + rng.random()) * w / sw)
        y0, y1 = max(cy - half, 0), min(cy + half + 1, h)
        x0, x1 = max(cx - half, 0), min(cx + half + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        patch = blob[y0 - (cy - half) : y1 - (cy - half), x0 - (cx - half) : x1 - (cx - half)]
        before = int((_saturated_linear(out[y0:y1, x0:x1]) & roi[y0:y1, x0:x1]).sum())
        out[y0:y1, x0:x1] += patch[:, :, None]
        after = int((_saturated_linear(out[y0:y1, x0:x1]) & roi[y0:y1, x0:x1]).sum())
        have += after - before
    return out


def add_glare(image: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Specular glare: soft-edged, clipped white blobs, mostly on the central tissue, until about
    `fraction` of the tissue ellipse is clipped white (pre-existing highlights count)."""
    if fraction <= 0:
        return image.copy()
    return to_srgb(_add_glare_linear(to_linear(image), rng, fraction))


# --- camera-pipeline ops (sRGB domain) ----------------------------------------------------------------


def jpeg_recompress(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG at `quality` (1-95) with 4:2:0 chroma, as phones and messengers do."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality), subsampling=2)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def resolution_loss(image: np.ndarray, factor: float) -> np.ndarray:
    """Downscale by `factor` (box filter, like sensor binning) and upscale back (bilinear, like a
    viewer or digital zoom). factor <= 1 is the identity."""
    if factor <= 1:
        return image.copy()
    h, w = image.shape[:2]
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    pil = Image.fromarray(image).resize(small, Image.Resampling.BOX)
    return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR))


# --- measurement and labels -----------------------------------------------------------------------


def _tissue_luma(image: np.ndarray, stops: float = 0.0) -> np.ndarray:
    """Luma (0..1) of the tissue ellipse's pixels as they would be re-exposed by `stops`."""
    pixels = tissue_pixels(image)
    if stops != 0:
        pixels = to_srgb(to_linear(pixels) * np.float32(2.0**stops))
    return luma(pixels)


def sharpness_label(blur_extent: float) -> bool | None:
    """True (sharp), False (not sharp) or None (ambiguous band) for a combined blur extent."""
    if blur_extent <= SHARP_MAX:
        return True
    if blur_extent >= BLUR_MIN:
        return False
    return None


def blur_components(deg: Degradation, short_side: int, source_blur_extent: float = 0.0) -> dict[str, float]:
    """Blur extents (relative) the recipe produces on an image with this short side, by kind."""
    parts: dict[str, float] = {}
    if deg.blur_kind != "none" and deg.blur_extent > 0:
        parts[deg.blur_kind] = deg.blur_extent
    if 0 < deg.resolution_short_side < short_side:
        parts["resolution"] = 1.0 / deg.resolution_short_side
    if source_blur_extent > 0:
        parts["source"] = source_blur_extent
    return parts


# --- sampling and applying recipes -------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _sample_blur(rng: np.random.Generator, severe: bool) -> tuple[str, float, float]:
    # Balanced service kinds: half isotropic (defocus, Gaussian), half directional (motion, shake).
    if rng.random() < 0.5:
        kind = "defocus" if rng.random() < 0.6 else "gaussian"
    else:
        kind = "motion" if rng.random() < 0.5 else "shake"
    # Severe blur spans the ambiguous band's top into clearly unusable; mild stays mostly sharp.
    extent = _log_uniform(rng, 0.004, 0.03) if severe else float(rng.uniform(0.0, 0.003))
    return kind, extent, float(rng.uniform(0.0, 180.0))


def sample_degradation(rng: np.random.Generator, *, p_clean: float = 0.35) -> Degradation:
    """A realistic field mix: clean (benign JPEG/noise only), mild (sub-threshold nuisances) and severe
    (at least one retake-worthy failure, often with other nuisances on top)."""
    seed = int(rng.integers(0, 2**63 - 1))
    jpeg = int(rng.integers(70, 96)) if rng.random() < 0.5 else 0
    if rng.random() < p_clean:
        noise = float(rng.uniform(0.0, 0.01)) if rng.random() < 0.3 else 0.0
        return Degradation(noise_level=noise, jpeg_quality=jpeg, seed=seed)

    severe = rng.random() < 0.6
    failure = str(rng.choice(["blur", "dark", "over", "glare"], p=[0.5, 0.17, 0.15, 0.18])) if severe else ""
    kind, extent, angle = "none", 0.0, 0.0
    if failure == "blur" or rng.random() < 0.45:
        kind, extent, angle = _sample_blur(rng, severe=failure == "blur")
    if failure == "dark":
        stops = float(rng.uniform(-4.0, -2.0))  # the median atlas image reads "dark" from -2.25 EV
    elif failure == "over":
        stops = float(rng.uniform(1.0, 2.5))  # ... and "over" from +1.25 EV
    else:
        stops = float(rng.uniform(-0.8, 0.4)) if rng.random() < 0.5 else 0.0
    if failure == "glare":
        glare = _log_uniform(rng, 0.12, 0.4)
    else:
        glare = _log_uniform(rng, 0.005, 0.05) if rng.random() < 0.25 else 0.0
    noise = _log_uniform(rng, 0.004, 0.05) if rng.random() < 0.4 else 0.0
    if rng.random() < 0.5:
        jpeg = int(rng.integers(25, 96))
    resolution = int(rng.integers(160, 480)) if rng.random() < 0.12 else 0
    return Degradation(
        blur_kind=kind,
        blur_extent=extent,
        motion_angle_deg=angle,
        exposure_stops=stops,
        glare_fraction=glare,
        noise_level=noise,
        jpeg_quality=jpeg,
        resolution_short_side=resolution,
        seed=seed,
    )


def _blur_linear(linear: np.ndarray, deg: Degradation, short: int, rng: np.random.Generator) -> np.ndarray:
    radius = deg.blur_extent * short  # equivalent radius in source px
    if deg.blur_kind == "none" or radius <= 0:
        return linear
    # Large PSFs on large images: blur at 1/k resolution. Box-down + bilinear-up add an isotropic
    # spread of equivalent radius ~k px, taken out of the PSF in quadrature; k is capped at 0.1 % of
    # the short side, so what it adds to a directional blur's minor axis stays far below SHARP_MAX.
    k = max(1, min(int(radius // 3), int(0.001 * short)))
    if k > 1:
        reduced = math.sqrt(radius**2 - k**2) / k
        blurred = _psf_blur(_box_down(linear, k), deg.blur_kind, reduced, deg.motion_angle_deg, rng)
        return _bilinear_up(blurred, linear.shape[:2], k)
    return _psf_blur(linear, deg.blur_kind, radius, deg.motion_angle_deg, rng)


def _psf_blur(
    linear: np.ndarray, kind: str, radius: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """Blur by a recipe kind whose equivalent radius is `radius` px (see the module docstring)."""
    if kind == "defocus":
        return _convolve(linear, disk_psf(radius))
    if kind == "gaussian":
        return _gaussian_linear(linear, radius / 2.0)
    if kind == "motion":
        return _convolve(linear, motion_psf(2.0 * radius, angle))
    return _convolve(linear, shake_psf(2.0 * radius, rng))


def _box_down(linear: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks (edge-padded to a multiple of k)."""
    h, w, c = linear.shape
    ph, pw = -h % k, -w % k
    padded = np.pad(linear, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else linear
    # Two single-axis means: much faster than one mean over two axes of a 5-D view.
    rows = padded.reshape(h + ph, (w + pw) // k, k, c).mean(axis=2, dtype=np.float32)
    return rows.reshape((h + ph) // k, k, (w + pw) // k, c).mean(axis=1, dtype=np.float32)


def _bilinear_up(small: np.ndarray, shape: tuple[int, int], k: int) -> np.ndarray:
    """Bilinear resize of each float channel of a `_box_down(..., k)` result back to `shape`."""
    h, w = shape
    box = (0.0, 0.0, w / k, h / k)  # the original extent inside the edge-padded small image
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(small[..., c]), mode="F").resize(
                (w, h), Image.Resampling.BILINEAR, box=box
            )
        )
        for c in range(small.shape[2])
    ]
    return np.stack(channels, axis=2)


def apply_degradation(
    image: np.ndarray,
    deg: Degradation,
    rng: np.random.Generator | None = None,
    *,
    source_blur_extent: float = 0.0,
) -> tuple[np.ndarray, QualityLabel]:
    """Degrade a sharp HxWx3 uint8 image by `deg` at its own resolution; return it and its label.

    Order follows light through the camera: glare is scene light (added as HDR radiance, so a blurred
    highlight blooms), then optics (blur), exposure, sensor noise, clip + gamma, then the ISP/app
    (resolution loss, JPEG). Random parts come from `rng` if given, else from `deg.seed`, so a
    recipe alone reproduces its output. `source_blur_extent` is the source's own softness, if known.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    short = min(h, w)
    seeds = np.random.SeedSequence(deg.seed if rng is None else int(rng.integers(2**63)))
    glare_rng, shake_rng, noise_rng = (np.random.default_rng(s) for s in seeds.spawn(3))

    out = image
    # Labels for exposure and glare are kept apart, because the health worker's fix differs (less light
    # vs. a different angle): exposure is measured on the glare-free re-exposed scene, glare (specular
    # clipping) at nominal exposure.
    exposure, mean_luma = exposure_from_luma(_tissue_luma(image, deg.exposure_stops))
    roi = tissue_ellipse(h, w)
    glare_fraction = measure_glare(image)
    noise = max(deg.noise_level, DARK_NOISE_LEVEL) if deg.exposure_stops <= -1.0 else deg.noise_level
    if deg.glare_fraction > 0 or deg.blur_kind != "none" or deg.exposure_stops != 0 or noise > 0:
        linear = _expand_highlights(to_linear(image), image)
        linear = _add_glare_linear(linear, glare_rng, deg.glare_fraction)
        linear = _blur_linear(linear, deg, short, shake_rng)
        if deg.glare_fraction > 0 or deg.blur_kind != "none":
            clipped = int(np.count_nonzero(_saturated_linear(linear) & roi))
            glare_fraction = clipped / max(int(np.count_nonzero(roi)), 1)
        if deg.exposure_stops != 0:
            linear *= np.float32(2.0**deg.exposure_stops)
        out = to_srgb(_poisson_gaussian(linear, noise_rng, noise))
    if 0 < deg.resolution_short_side < short:
        out = resolution_loss(out, short / deg.resolution_short_side)
    if deg.jpeg_quality > 0:
        out = jpeg_recompress(out, deg.jpeg_quality)
    if out is image:
        out = image.copy()

    parts = blur_components(deg, short, source_blur_extent)
    extent = math.sqrt(sum(v * v for v in parts.values()))
    sharp = sharpness_label(extent)
    kind = "none" if sharp is True or not parts else _SERVICE_KIND[max(parts, key=lambda k: parts[k])]
    label = QualityLabel(
        sharp=sharp,
        blur_kind=kind,
        blur_extent=extent,
        exposure=exposure,
        glare_fraction=float(glare_fraction),
        luminance=mean_luma,
    )
    return out, label
