"""Procedural colposcopy-like scenes with exact labels.

There is no large labelled cervix data set, so the quality gate and the severity head are pre-trained on
scenes drawn here: a cervix (dome, lips, external os, columnar ectropion, transformation zone, nabothian
cysts, vessels, acetowhite lesions) seen through a speculum between vaginal walls, under one of the four
exam stages, with camera effects (wet-surface glare, colour cast, light falloff, vignette, defocus, sensor
noise, JPEG).

Every scene lives in a canonical frame: u runs left to right and v top to bottom, both 0..1 across the
nominal picture whatever its pixel size. Shapes are analytic in (u, v); textures are noise fields built on
small fixed grids over a padded canonical window and resampled to the target size. So the same `SceneParams`
render the same scene (stretched to the frame) at 512x512 or 800x600, and the labels (cervix box, lesion
mask) are read off the very masks that drew the pixels.

Randomness: `sample_subject(seed)` draws the anatomy (one patient), `render(..., seed=)` one shot of it
(framing jitter, glare, mucus, blood, lighting, white balance). Everything goes through
`np.random.default_rng`.

Speed matters (training draws scenes on the fly). The picture is drawn in horizontal bands of ~128 KB per
plane: full-frame temporaries would be fresh 1 MB allocations whose page faults cost ~10x the arithmetic.
Planes are kept separate (3, h, W) because broadcasting (h, W, 1) over (h, W, 3) is much slower in numpy,
and numpy scalars are turned into Python floats before touching arrays (NumPy 2 would otherwise promote to
float64)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from training.data.records import EXAM_STAGES, Box, LabelledImage, Labels, Severity

__all__ = [
    "Blob",
    "SceneParams",
    "generate_scene",
    "generate_subject",
    "render",
    "sample_subject",
]

_F32 = np.float32
_STAGE_CODE = {stage: i for i, stage in enumerate(EXAM_STAGES)}
# Noise fields cover this much beyond the nominal frame, so framing jitter never samples outside them.
_PAD = 0.35
_SPAN = 1.0 + 2.0 * _PAD
_BAND_FLOATS = 32768  # pixels per band: 128 KB float32 planes stay in cache and come from the heap
# generate_scene: how often each stage is drawn (acetic is what the gate mostly sees) and how often no cervix.
_STAGE_WEIGHTS = {"acetic": 0.45, "saline": 0.2, "iodine": 0.2, "green": 0.15}
_NO_CERVIX_RATE = 0.15
_SEVERITIES = (Severity.NORMAL, Severity.LOW_GRADE, Severity.HIGH_GRADE)
_SEVERITY_WEIGHTS = (0.35, 0.30, 0.35)
_SEED_MASK = 2**63 - 1

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Blob:
    """An ellipse in cervix-local units (cervix radius = 1, origin at the cervix centre)."""

    x: float
    y: float
    rx: float
    ry: float
    angle: float


@dataclass(frozen=True)
class SceneParams:
    """Every random choice about one subject's anatomy and exam set-up. Positions are canonical (u, v)."""

    seed: int
    severity: Severity
    cervix_in_view: bool
    view_kind: str  # "cervix", or where the camera points instead: "walls", "speculum", "closeup"
    # Cervix outline: centre, radii, tilt, and how lumpy the outline is.
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    wobble: float
    # External os in cervix-local units: round hole (nulliparous) or transverse slit (parous), maybe bent.
    os_x: float
    os_y: float
    os_len: float
    os_width: float
    os_curve: float
    lips: float  # how deep the groove between anterior and posterior lip is (parous)
    # Columnar epithelium (ectropion) around the os; the transformation zone reaches tz_scale times further.
    col_rx: float
    col_ry: float
    col_wobble: float
    tz_scale: float
    cysts: tuple[Blob, ...]
    lesions: tuple[Blob, ...]  # empty for NORMAL
    lesion_opacity: float  # how white the acetowhite gets (high grade: dense, low grade: thin)
    lesion_edge: float  # border softness, cervix-local units (high grade: sharp, low grade: feathery)
    lesion_wobble: float  # how geographic the border is
    mosaic: float  # 0..1 strength of a mosaic pattern inside the lesion
    punctation: float  # 0..1 strength of punctation inside the lesion
    vessel_density: float
    # Speculum and surroundings.
    speculum: str  # "metal", "plastic", "tube" or "none"
    speculum_vertical: bool  # blades top/bottom (True) or left/right
    blade_a: float  # how far each blade tip reaches into the frame (negative: not in frame)
    blade_b: float
    blade_curve: float
    side_walls: float  # how far lateral vaginal walls bulge in (0: not at all)
    fold_freq: float  # vaginal rugae spacing
    # Palette (RGB 0..1): squamous epithelium, columnar epithelium, vaginal wall; how dark iodine stains.
    squamous: RGB
    columnar: RGB
    wall: RGB
    iodine_depth: float
    tissue_seed: int  # seeds the anatomy noise fields (texture, outline, lesion border, vessels, folds)


@dataclass(frozen=True)
class _Shot:
    """Per-photo choices: framing jitter, lighting, camera, wet-surface effects."""

    u0: float
    v0: float
    span: float
    light_u: float
    light_v: float
    falloff: float
    vignette: float
    exposure: float
    gains: RGB
    gamma: float
    contrast: float
    saturation: float
    wetness: float
    glint_cut: float  # how few highlight clusters: the cut on the cluster field
    mucus: float
    mucus_u: float
    blood: float
    bloom: float
    blur: float
    aperture: float  # radius of the colposcope's round field of view (0: the sensor is filled)
    noise: float
    noise_offset: tuple[int, int]
    sharpen: float  # video-chain edge enhancement (0: none): dark-edged highlights, crisper texture
    jpeg: int  # quality, 0 for no JPEG round trip
    green_base: str  # which stage the green filter looks at
    blade_jitter: float
    field_seed: int  # seeds the per-shot noise grids (glare, blood, mucus)


# --------------------------------------------------------------------------- small vectorised helpers


def _smooth(e0: float | np.ndarray, e1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    """Smoothstep from e0 to e1 (e1 < e0 gives a falling edge); the edges may be arrays."""
    t = (x - e0) / (e1 - e0)
    np.maximum(t, 0.0, out=t)  # ufuncs: np.clip's Python wrapper costs more than the work on a band
    np.minimum(t, 1.0, out=t)
    r = t * -2.0
    r += 3.0
    r *= t
    r *= t
    return r


def _ramp(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Linear ramp from 0 at e0 to 1 at e1, clipped: half the work of _smooth, fine for edges and masks."""
    k = 1.0 / (e1 - e0)
    t = x * k
    t += -e0 * k
    np.maximum(t, 0.0, out=t)
    np.minimum(t, 1.0, out=t)
    return t


def _blend(img: np.ndarray, alpha: np.ndarray, colour: RGB | np.ndarray | tuple) -> None:
    """img <- img + alpha * (colour - img), in place on planes (3, h, w); colour: RGB triple or 3 planes."""
    for k in range(3):
        ch = img[k]
        ch += alpha * (colour[k] - ch)


def _scale(img: np.ndarray, factor: np.ndarray) -> None:
    for k in range(3):
        img[k] *= factor


def _fbm(seed: int, base: int, octaves: int, gain: float = 0.5) -> np.ndarray:
    """Fractal noise on a small square grid over the padded canonical window, unit std.

    Octaves are summed at the small size, so a field costs one resize to the target however many it has.
    """
    rng = np.random.default_rng((seed & _SEED_MASK, base, octaves))
    top = base << (octaves - 1)
    acc = np.zeros((top, top), _F32)
    amp = 1.0
    for o in range(octaves):
        g = base << o
        n = rng.standard_normal((g, g), dtype=_F32)
        if g != top:
            n = np.asarray(Image.fromarray(n, mode="F").resize((top, top), Image.Resampling.BICUBIC))
        acc += _F32(amp) * n
        amp *= gain
    acc /= acc.std()
    acc.flags.writeable = False
    return acc


def _fbm_wide(seed: int, rows: int, cols: int) -> np.ndarray:
    """One octave of noise on a rows x cols grid (rows > cols: features stretched horizontally), unit std."""
    n = np.random.default_rng((seed & _SEED_MASK, rows, cols)).standard_normal((rows, cols), dtype=_F32)
    n.flags.writeable = False
    return n


@lru_cache(maxsize=160)
def _fbm_cached(seed: int, base: int, octaves: int, gain: float = 0.5) -> np.ndarray:
    """Anatomy fields: the stages (and shots) of one subject share them."""
    return _fbm(seed, base, octaves, gain)


@lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """A fixed tile of Gaussian sensor noise; shots read it at a random offset (cheaper than drawing anew)."""
    return np.random.default_rng(0x4E015E).standard_normal((1024, 1024), dtype=_F32)


class _Frame:
    """One render's picture geometry plus its resampled noise fields.

    A field is resampled in two passes: horizontally once per render (PIL, bicubic, to (g, W)), then
    vertically per band as a 4-tap bicubic gather, far cheaper than a PIL resize per band.
    """

    def __init__(self, width: int, height: int, u0: float, v0: float, span: float) -> None:
        self.w, self.h = width, height
        self.u0, self.v0, self.span = u0, v0, span
        # Pixels per canonical unit (geometric mean of both axes): anti-aliasing widths, blur radii.
        self.px = math.sqrt(width * height) / span
        self._hpass: dict[object, np.ndarray] = {}
        self._vtaps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def hpass(self, key: object, small: np.ndarray) -> np.ndarray:
        t = self._hpass.get(key)
        if t is None:
            g, gx = small.shape  # rows may outnumber columns: a field stretched horizontally
            k = gx / _SPAN
            box = ((self.u0 + _PAD) * k, 0.0, (self.u0 + self.span + _PAD) * k, float(g))
            im = Image.fromarray(np.ascontiguousarray(small), mode="F")
            t = np.asarray(im.resize((self.w, g), Image.Resampling.BICUBIC, box=box))
            self._hpass[key] = t
        return t

    def vtaps(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Per picture row: the 4 grid rows and bicubic weights of the vertical pass."""
        taps = self._vtaps.get(g)
        if taps is None:
            v = self.v0 + self.span * (np.arange(self.h) + 0.5) / self.h
            s = (v + _PAD) * (g / _SPAN) - 0.5
            i = np.floor(s).astype(np.intp)
            t = s - i
            # Keys cubic convolution (a = -0.5), the kernel PIL's BICUBIC uses for the horizontal pass.
            w = np.stack(
                [
                    ((-0.5 * t + 1.0) * t - 0.5) * t,
                    (1.5 * t - 2.5) * t * t + 1.0,
                    ((-1.5 * t + 2.0) * t + 0.5) * t,
                    (0.5 * t - 0.5) * t * t,
                ],
                axis=1,
            )
            idx = np.clip(i[:, None] + np.arange(-1, 3)[None, :], 0, g - 1)
            taps = (idx, w.astype(_F32))
            self._vtaps[g] = taps
        return taps


class _Grid:
    """Pixels of one band of a render (rows r0..r1, columns c0..c1) and their canonical coordinates."""

    def __init__(self, frame: _Frame, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> None:
        c1 = frame.w if c1 is None else c1
        self.frame = frame
        self.w, self.h = c1 - c0, r1 - r0
        self.r0, self.r1, self.c0, self.c1 = r0, r1, c0, c1
        self.u0, self.su = frame.u0 + frame.span * c0 / frame.w, frame.span * (c1 - c0) / frame.w
        self.v0, self.sv = frame.v0 + frame.span * r0 / frame.h, frame.span * (r1 - r0) / frame.h
        self.u = (frame.u0 + frame.span * (np.arange(c0, c1) + 0.5) / frame.w).astype(_F32)[None, :]
        self.v = (frame.v0 + frame.span * (np.arange(r0, r1) + 0.5) / frame.h).astype(_F32)[:, None]
        self.px = frame.px

    def cols(self, c0: int, c1: int) -> _Grid:
        """The same band restricted to columns c0..c1 (relative to this grid)."""
        return _Grid(self.frame, self.r0, self.r1, self.c0 + c0, self.c0 + c1)

    def field(self, key: object, small: np.ndarray) -> np.ndarray:
        """This band of a small noise grid (over the padded window) resampled bicubically to the picture."""
        t = self.frame.hpass(key, small)[:, self.c0 : self.c1]
        idx, w = self.frame.vtaps(small.shape[0])
        # einsum, not a matmul: OpenBLAS threads spinning between many tiny calls would eat the other cores.
        return np.einsum("ij,ijk->ik", w[self.r0 : self.r1], t[idx[self.r0 : self.r1]])

    def noise(self, seed: int, base: int, octaves: int, gain: float = 0.5) -> np.ndarray:
        key = (seed, base, octaves, gain)
        return self.field(key, _fbm_cached(*key))

    def window(self, u: float, v: float, ru: float, rv: float) -> tuple[slice, slice] | None:
        """Band rows/cols covering the canonical box u±ru, v±rv, or None when it misses the band."""
        c0 = max(int((u - ru - self.u0) / self.su * self.w) - 1, 0)
        c1 = min(int((u + ru - self.u0) / self.su * self.w) + 2, self.w)
        r0 = max(int((v - rv - self.v0) / self.sv * self.h) - 1, 0)
        r1 = min(int((v + rv - self.v0) / self.sv * self.h) + 2, self.h)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)


# --------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options: tuple, weights: tuple[float, ...]) -> Any:
    p = np.asarray(weights, float)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _jitter_colour(rng: np.random.Generator, rgb: RGB, amount: float) -> RGB:
    c = np.clip(np.asarray(rgb) * (1.0 + rng.normal(0.0, amount, 3)), 0.0, 1.0)
    return float(c[0]), float(c[1]), float(c[2])


def _sample_lesions(
    rng: np.random.Generator, severity: Severity, col_r: float, ox: float, oy: float
) -> tuple[Blob, ...]:
    blobs: list[tuple[float, ...]] = []
    if severity is Severity.HIGH_GRADE:
        # Dense patches hugging the os and the squamocolumnar junction, often wrapping round the os.
        for i in range(int(rng.integers(1, 4))):
            ang = rng.uniform(0, 2 * np.pi)
            d = 0.0 if i == 0 and rng.random() < 0.5 else rng.uniform(0.3, 1.0) * max(col_r, 0.25)
            blobs.append(
                (
                    ox + d * np.cos(ang),
                    oy + 0.8 * d * np.sin(ang),
                    rng.uniform(0.22, 0.55),
                    rng.uniform(0.15, 0.4),
                    rng.uniform(-0.6, 0.6),
                )
            )
    elif severity is Severity.LOW_GRADE:
        # Thin, scattered, smaller patches in the TZ with satellites further out.
        for _ in range(int(rng.integers(1, 5))):
            ang = rng.uniform(0, 2 * np.pi)
            d = rng.uniform(0.15, 0.75)
            blobs.append(
                (
                    ox + d * np.cos(ang),
                    oy + 0.8 * d * np.sin(ang),
                    rng.uniform(0.1, 0.32),
                    rng.uniform(0.07, 0.22),
                    rng.uniform(-np.pi, np.pi),
                )
            )
    return tuple(Blob(*(float(f) for f in b)) for b in blobs)


def sample_subject(seed: int) -> SceneParams:
    """Draw one subject's anatomy and exam set-up from `seed` (the cervix is in view; see generate_scene)."""
    rng = np.random.default_rng((int(seed) & _SEED_MASK, 0x5CE7E))
    severity = _pick(rng, _SEVERITIES, _SEVERITY_WEIGHTS)
    # Colposcopes frame the cervix close: it fills half to all of the picture, sometimes cut by the edge.
    rx = rng.uniform(0.42, 0.8) if rng.random() < 0.7 else rng.uniform(0.8, 1.25)  # or zoomed right in
    ry = rx * rng.uniform(0.75, 1.05)
    cx = 0.5 + rng.uniform(-0.15, 0.15)
    cy = 0.5 + rng.uniform(-0.13, 0.13)
    parous = rng.random() < 0.6
    os_len = rng.uniform(0.12, 0.4) if parous else rng.uniform(0.04, 0.09)
    os_width = rng.uniform(0.03, 0.08) if parous else os_len * rng.uniform(0.6, 1.0)
    os_x, os_y = rng.normal(0, 0.08), rng.normal(0, 0.08)
    # Ectropion: from none to most of the face (young women, the pill, pregnancy).
    col_r = [rng.uniform(0.0, 0.12), rng.uniform(0.12, 0.4), rng.uniform(0.4, 0.75)][
        int(rng.choice(3, p=[0.25, 0.45, 0.3]))
    ]
    col_rx = max(col_r, os_len * 0.8 + 0.03)
    col_ry = col_rx * rng.uniform(0.55, 0.95)
    cysts = []
    for _ in range(int(rng.choice([0, 1, 2, 3, 5, 8], p=[0.35, 0.2, 0.15, 0.12, 0.1, 0.08]))):
        ang = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(col_rx + 0.05, min(0.9, col_rx + 0.45))
        r = rng.uniform(0.02, 0.08)
        cysts.append(
            Blob(
                float(os_x + d * np.cos(ang)),
                float(os_y + 0.8 * d * np.sin(ang)),
                float(r),
                float(r * rng.uniform(0.8, 1.2)),
                0.0,
            )
        )
    lesions = _sample_lesions(rng, severity, col_rx, os_x, os_y)
    high = severity is Severity.HIGH_GRADE
    speculum = str(_pick(rng, ("metal", "plastic", "tube", "none"), (0.4, 0.25, 0.25, 0.1)))
    # Squamous pink varies from pale to livid (pregnancy, inflammation) to pale-atrophic.
    squamous = _pick(
        rng,
        ((0.93, 0.62, 0.62), (0.9, 0.52, 0.54), (0.85, 0.5, 0.58), (0.94, 0.74, 0.72)),
        (0.35, 0.3, 0.15, 0.2),
    )
    return SceneParams(
        seed=int(seed),
        severity=severity,
        cervix_in_view=True,
        view_kind="cervix",
        cx=float(cx),
        cy=float(cy),
        rx=float(rx),
        ry=float(ry),
        angle=float(rng.normal(0, 0.15)),
        wobble=float(rng.uniform(0.03, 0.1)),
        os_x=float(os_x),
        os_y=float(os_y),
        os_len=float(os_len),
        os_width=float(os_width),
        os_curve=float(np.clip(rng.normal(0, 0.6), -1.2, 1.2)) if parous else 0.0,
        lips=float(rng.uniform(0.2, 0.6)) if parous else float(rng.uniform(0.0, 0.15)),
        col_rx=float(col_rx),
        col_ry=float(col_ry),
        col_wobble=float(rng.uniform(0.1, 0.3)),
        tz_scale=float(rng.uniform(1.25, 1.9)),
        cysts=tuple(cysts),
        lesions=lesions,
        lesion_opacity=float(rng.uniform(0.6, 0.9) if high else rng.uniform(0.3, 0.55)),
        lesion_edge=float(rng.uniform(0.01, 0.03) if high else rng.uniform(0.06, 0.14)),
        lesion_wobble=float(rng.uniform(0.15, 0.3) if high else rng.uniform(0.3, 0.5)),
        mosaic=float(rng.uniform(0.3, 1.0)) if high and rng.random() < 0.45 else 0.0,
        punctation=float(rng.uniform(0.3, 1.0)) if high and rng.random() < 0.4 else 0.0,
        vessel_density=float(rng.uniform(0.1, 1.0)),
        speculum=speculum,
        speculum_vertical=bool(rng.random() < 0.8),
        blade_a=float(rng.uniform(-0.12, 0.28)),
        blade_b=float(rng.uniform(-0.12, 0.28)),
        blade_curve=float(rng.uniform(0.05, 0.7)),
        side_walls=float(rng.uniform(0.03, 0.22)) if rng.random() < 0.55 else 0.0,
        fold_freq=float(rng.uniform(18.0, 40.0)),
        squamous=_jitter_colour(rng, squamous, 0.04),
        columnar=_jitter_colour(rng, (0.88, 0.2, 0.25), 0.06),
        wall=_jitter_colour(rng, (0.86, 0.52, 0.53), 0.07),
        iodine_depth=float(rng.uniform(0.5, 1.0)),
        tissue_seed=int(rng.integers(2**62)),
    )


def _sample_shot(rng: np.random.Generator, params: SceneParams, stage: str) -> _Shot:
    span = float(rng.uniform(0.94, 1.06)) * (0.45 if params.view_kind == "closeup" else 1.0)
    cast = rng.normal(0, 0.035, 3)
    if rng.random() < 0.15:  # a strong white-balance error: bluish, magenta or warm
        cast += np.asarray(_pick(rng, ((-0.12, 0.0, 0.12), (0.06, -0.1, 0.08), (0.1, 0.0, -0.12)), (1, 1, 1)))
    if stage == "green":  # behind a green filter the filter, not the white balance, sets the colour
        cast *= 0.3
    gains = np.exp(cast - cast.mean())
    return _Shot(
        u0=0.5 - span / 2 + float(rng.normal(0, 0.025)),
        v0=0.5 - span / 2 + float(rng.normal(0, 0.025)),
        span=span,
        light_u=float(rng.normal(0.5, 0.1)),
        light_v=float(rng.normal(0.5, 0.1)),
        falloff=float(rng.uniform(0.2, 1.0)),
        vignette=float(rng.uniform(0.2, 0.7)),
        exposure=float(np.exp(rng.normal(0.2, 0.15))),
        gains=(float(gains[0]), float(gains[1]), float(gains[2])),
        gamma=float(rng.uniform(0.8, 1.05)),
        contrast=float(rng.uniform(1.0, 1.3)),
        saturation=float(rng.uniform(0.9, 1.2)),
        wetness=float(rng.uniform(0.6, 1.2) * (1.2 if stage == "iodine" else 1.0)),
        glint_cut=float(rng.uniform(-1.4, 0.6)),
        mucus=float(rng.uniform(0.3, 1.0)) if rng.random() < 0.35 else 0.0,
        mucus_u=float(rng.normal(0, 0.1)),
        blood=float(rng.uniform(0.2, 1.0)) if rng.random() < (0.6 if params.severity else 0.3) else 0.0,
        bloom=float(rng.uniform(0.3, 1.0)) if rng.random() < 0.2 else 0.0,
        blur=float(rng.uniform(0.6, 2.2)) if rng.random() < 0.55 else 0.0,
        aperture=float(rng.uniform(0.55, 0.75)) if rng.random() < 0.5 else 0.0,
        noise=float(rng.uniform(0.005, 0.025)),
        noise_offset=(int(rng.integers(1024)), int(rng.integers(1024))),
        sharpen=float(rng.uniform(0.4, 1.2)) if rng.random() < 0.7 else 0.0,
        jpeg=int(rng.integers(55, 95)) if rng.random() < 0.5 else 0,
        green_base="acetic" if rng.random() < 0.6 else "saline",
        blade_jitter=float(rng.normal(0, 0.02)),
        field_seed=int(rng.integers(2**62)),
    )


@dataclass(frozen=True)
class _ShotFields:
    """Per-shot small noise grids, drawn once per render and resampled band by band."""

    clusters: np.ndarray
    sparkle: np.ndarray
    patches: np.ndarray
    wide: np.ndarray
    bloom: np.ndarray | None
    blood: np.ndarray | None
    mucus: np.ndarray | None

    @staticmethod
    def make(shot: _Shot) -> _ShotFields:
        s = shot.field_seed
        return _ShotFields(
            clusters=_fbm(s + 1, 6, 2),
            sparkle=_fbm(s + 2, 256, 1),
            patches=_fbm(s + 6, 48, 1),
            wide=_fbm_wide(s + 7, 72, 22),
            bloom=_fbm(s + 3, 5, 1) if shot.bloom > 0 else None,
            blood=_fbm(s + 4, 48, 2) if shot.blood > 0 else None,
            mucus=_fbm(s + 5, 16, 3) if shot.mucus > 0 else None,
        )


# --------------------------------------------------------------------------- palettes


@dataclass(frozen=True)
class _Palette:
    squamous: RGB
    squamous_dark: RGB  # where the mottling goes
    tz: RGB
    columnar: RGB
    papilla: RGB  # tips of the columnar villi
    os: RGB
    wall: RGB
    lesion: RGB
    lesion_alpha: float  # 0 where the stage does not show the acetowhite
    cyst: RGB
    blood: RGB
    mucus: RGB
    vessel: float  # how much vessels darken G and B


def _mul(c: RGB, m: RGB) -> RGB:
    return c[0] * m[0], c[1] * m[1], c[2] * m[2]


def _mix(c: RGB, d: RGB, t: float) -> RGB:
    return c[0] + t * (d[0] - c[0]), c[1] + t * (d[1] - c[1]), c[2] + t * (d[2] - c[2])


def _palette(p: SceneParams, stage: str) -> _Palette:
    if stage == "iodine":
        # Glycogen-rich squamous epithelium stains mahogany; columnar epithelium, immature TZ and lesions
        # don't (bright mustard-yellow / orange): a high-contrast picture, glossy near-black brown round
        # saturated orange.
        d = p.iodine_depth
        return _Palette(
            squamous=(0.72 - 0.22 * d, 0.38 - 0.14 * d, 0.2 - 0.08 * d),
            squamous_dark=(0.3, 0.1, 0.05),
            tz=(0.92, 0.52, 0.2),
            columnar=(0.98, 0.56, 0.22),
            papilla=(1.0, 0.7, 0.36),
            os=(0.16, 0.03, 0.02),
            wall=(0.52 - 0.14 * d, 0.27 - 0.08 * d, 0.15),
            lesion=(1.0, 0.72, 0.32),
            lesion_alpha=0.95,
            cyst=(0.9, 0.6, 0.28),
            blood=(0.42, 0.04, 0.03),
            mucus=(0.95, 0.7, 0.35),
            vessel=0.1,
        )
    acetic = stage == "acetic"
    # Acetic acid pales and slightly blues the whole surface; saline leaves it redder, vessels plainer.
    sq = _mix(p.squamous, (0.93, 0.88, 0.86), 0.2) if acetic else _mul(p.squamous, (1.05, 1.16, 1.08))
    return _Palette(
        squamous=sq,
        squamous_dark=_mul(sq, (0.92, 0.6, 0.6)),
        tz=_mul(sq, (0.98, 0.8, 0.78)),
        columnar=_mul(p.columnar, (1.05, 1.9, 1.7)) if acetic else _mul(p.columnar, (1.0, 1.4, 1.3)),
        papilla=(0.97, 0.78, 0.8) if acetic else _mul(p.columnar, (1.08, 1.9, 1.7)),
        os=(0.42, 0.05, 0.09),
        wall=_mul(p.wall, (1.0, 1.04, 1.02)) if acetic else _mul(p.wall, (1.0, 1.02, 1.0)),
        lesion=(0.93, 0.89, 0.9) if acetic else sq,  # oyster white, not paint
        lesion_alpha=1.0 if acetic else 0.0,
        cyst=(0.97, 0.86, 0.62),
        blood=(0.55, 0.05, 0.07),
        mucus=(0.96, 0.94, 0.92),
        vessel=0.25 if acetic else 0.45,
    )


# --------------------------------------------------------------------------- drawing (one band at a time)


def _background(p: SceneParams, g: _Grid, pal: _Palette) -> tuple[np.ndarray, np.ndarray]:
    """Vaginal walls round a dark fornix, brighter towards the camera; return (picture, fold crests).

    The rugae are transverse folds: seen down the canal they stack as broad horizontal arcs, each a lit
    crest over a dark crease, fading in and out along the wall.
    """
    du = g.u - p.cx
    dv = g.v - p.cy
    lo = g.noise(p.tissue_seed + 1, 5, 4, 0.55)
    warp = g.noise(p.tissue_seed + 11, 3, 2)
    rad = max(p.rx, p.ry)
    depth = _smooth(0.85 * rad, 1.7 * rad + 0.15, np.sqrt(du * du + dv * dv) + 0.06 * lo)
    t = np.sqrt(du * du * 0.16 + dv * dv)
    t *= p.fold_freq
    t += 2.2 * warp
    mid = g.noise(p.tissue_seed + 4, 12, 3)
    t += 0.8 * mid  # folds bend and pinch, not rings
    s = np.sin(t)
    amp = _ramp(-1.2, 0.6, lo + 0.4 * mid)
    crest = _ramp(0.2, 1.0, s)
    crest *= amp
    crease = _ramp(-0.55, -1.0, s)
    crease *= amp
    shade = 0.4 + 0.75 * depth
    shade *= 1.0 + 0.1 * lo + 0.06 * mid + 0.2 * crest - 0.35 * crease + 0.06 * np.cos(t) * amp
    img = np.empty((3, g.h, g.w), _F32)
    for k, c in enumerate(pal.wall):
        img[k] = shade * c
    img[0] *= 1.0 + 0.05 * lo
    crest *= depth
    return img, crest


def _local(p: SceneParams, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Cervix-local coordinates (a along the os slit, b across it), cervix radius = 1."""
    c, s = math.cos(p.angle), math.sin(p.angle)
    du = g.u - p.cx
    dv = g.v - p.cy
    a = du * (c / p.rx) + dv * (s / p.rx)
    b = dv * (c / p.ry) - du * (s / p.ry)
    return a, b


def _blob_window(p: SceneParams, g: _Grid, blob: Blob, reach: float) -> tuple[slice, slice] | None:
    c, s = math.cos(p.angle), math.sin(p.angle)
    u = p.cx + p.rx * blob.x * c - p.ry * blob.y * s
    v = p.cy + p.rx * blob.x * s + p.ry * blob.y * c
    rad = reach * max(blob.rx, blob.ry) * max(p.rx, p.ry)
    return g.window(u, v, rad, rad)


@dataclass(frozen=True)
class _Outline:
    """The cervix outline over one band: local coordinates, the low-frequency field, radius and coverage."""

    a: np.ndarray
    b: np.ndarray
    lo: np.ndarray
    bumps: np.ndarray
    rho: np.ndarray
    alpha: np.ndarray
    aa: float

    def cols(self, c0: int, c1: int) -> _Outline:
        return _Outline(
            self.a[:, c0:c1],
            self.b[:, c0:c1],
            self.lo[:, c0:c1],
            self.bumps[:, c0:c1],
            self.rho[:, c0:c1],
            self.alpha[:, c0:c1],
            self.aa,
        )


def _outline(p: SceneParams, g: _Grid) -> _Outline:
    a, b = _local(p, g)
    lo = g.noise(p.tissue_seed + 3, 4, 4, 0.55)
    bumps = g.noise(p.tissue_seed + 12, 10, 2)
    rho = np.sqrt(a * a + b * b)
    rho *= 1.0 + p.wobble * lo + 0.025 * bumps
    aa = 1.5 / (g.px * min(p.rx, p.ry))  # about 1.5 px of anti-aliasing
    # The rim rolls away into the fornix: a soft edge, symmetric about rho = 1 where the label is cut.
    soft = max(aa, 0.05)
    return _Outline(a, b, lo, bumps, rho, _smooth(1.0 + soft, 1.0 - soft, rho), aa)


def _fornix_shadow(img: np.ndarray, rho: np.ndarray, lo: np.ndarray) -> None:
    """The walls just outside the cervix rim sit in its shadow, deeper in some places than others."""
    rim = np.maximum(rho - 1.0, 0.0)
    rim *= 4.0 + 2.0 * lo
    _scale(img, 1.0 - 0.6 * np.exp(-rim))


def _cervix(
    img: np.ndarray,
    p: SceneParams,
    g: _Grid,
    ol: _Outline,
    pal: _Palette,
    stage: str,
    shot: _Shot,
    sf: _ShotFields,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the cervix onto img (this grid's columns); return (lesion mask, how much it faces the lens)."""
    a, b, lo, rho, alpha, aa = ol.a, ol.b, ol.lo, ol.rho, ol.alpha, ol.aa
    seed = p.tissue_seed
    mid = g.noise(seed + 4, 12, 3)
    z = np.minimum(rho * rho, 1.0)
    z = np.sqrt(1.0 - z)

    ao = a - p.os_x
    bo = b - p.os_y
    bend = bo - p.os_curve * ao * ao
    # Lips: the surface rolls into the slit, so it darkens towards the groove along its whole length.
    groove = (
        np.exp(-(bend * bend) * (1.0 / (p.os_width * 6.0) ** 2))
        * _smooth(1.0 + 2.5 * p.lips, 0.6, np.abs(ao) / (p.os_len + 0.05))
        * p.lips
    )
    # Dome shading: lit face, the periphery turning away into shadow (not a dark rim).
    shade = (0.4 + 0.6 * np.sqrt(z)) * (1.0 - 0.55 * groove) * (1.0 + 0.1 * mid)
    grain = g.noise(seed + 5, 128, 1)
    shade *= 1.0 + 0.025 * grain

    # Shallow creases of the epithelium: soft, slightly darker furrows.
    crease = _ramp(0.6, 0.97, 1.0 - np.abs(ol.bumps))
    shade *= 1.0 - 0.06 * crease
    tissue = np.empty_like(img)
    mott = _smooth(0.0, 1.9, lo + 0.5 * mid)
    for k in range(3):
        tissue[k] = pal.squamous[k] + mott * (pal.squamous_dark[k] - pal.squamous[k])

    # Columnar ectropion with the transformation zone round it; velvety papillary (grape) texture inside.
    dc = np.sqrt((ao * (1.0 / p.col_rx)) ** 2 + (bo * (1.0 / p.col_ry)) ** 2)
    tz = _smooth(p.tz_scale * 1.05, p.tz_scale * 0.75, dc * np.maximum(1.0 + 0.25 * lo, 0.4))
    _blend(tissue, tz * _ramp(-0.8, 0.9, mid) * 0.75, pal.tz)
    if stage == "iodine":  # immature metaplasia takes iodine patchily
        _blend(tissue, tz * _ramp(0.0, 1.0, mid) * 0.7, pal.columnar)
    col = _ramp(1.15, 0.88, dc * np.maximum(1.0 + p.col_wobble * mid, 0.4))
    # Islands of squamous metaplasia break the red up.
    vn = g.noise(seed + 6, 20, 3, 0.6)
    col *= 1.0 - 0.75 * _ramp(0.6, 1.6, vn)
    pap = _smooth(-1.6, 1.6, grain)
    pap2 = pap * pap
    colour = np.empty_like(img)
    for k in range(3):
        colour[k] = pal.columnar[k] * (0.9 + 0.1 * pap) + pap2 * (0.2 * (pal.papilla[k] - pal.columnar[k]))
    _blend(tissue, col, colour)

    # Fine vessels (and, in the TZ, gland openings) on the squamous surface.
    vessels = _ramp(0.93, 0.995, 1.0 - np.abs(vn))
    # Broken into short segments: unbroken ridge lines would close into loops no vessel draws.
    vessels *= _ramp(-0.5, 1.0, mid) * _ramp(0.0, 1.0, ol.bumps) * (0.6 * p.vessel_density * pal.vessel)
    vessels *= 1.0 - col
    tissue[1] *= 1.0 - vessels
    tissue[2] *= 1.0 - 0.8 * vessels
    dots = g.noise(seed + 9, 64, 1)
    glands = _ramp(2.1, 2.6, dots) * tz * (1.0 - col)
    _blend(tissue, glands * 0.5, _mul(pal.os, (1.8, 1.8, 1.8)))

    # Nabothian cysts: translucent yellowish domes.
    for cyst in p.cysts:
        win = _blob_window(p, g, cyst, 1.3)
        if win is None:
            continue
        q = np.sqrt(((a[win] - cyst.x) * (1.0 / cyst.rx)) ** 2 + ((b[win] - cyst.y) * (1.0 / cyst.ry)) ** 2)
        dome = _ramp(1.15, 0.8, q)
        bulge = 0.8 + 0.2 * np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))
        sub = tissue[:, win[0], win[1]]
        _blend(sub, dome * 0.6, (pal.cyst[0] * bulge, pal.cyst[1] * bulge, pal.cyst[2] * bulge))

    if p.lesions:
        lesion, gloss = _lesion(tissue, p, g, pal, stage, a, b, aa, lo, mid, grain, dots, vn)
    else:
        lesion, gloss = np.zeros((g.h, g.w), bool), None

    # External os: dark hole or slit, deeper in the middle.
    d_os = np.sqrt((ao * (1.0 / p.os_len)) ** 2 + (bend * (1.0 / p.os_width)) ** 2)
    d_os *= 1.0 + 0.25 * mid
    os_a = _smooth(1.35, 0.6, d_os)  # the canal walls roll in: a soft edge, no crisp hole
    depth = np.clip(d_os, 0.0, 1.0)
    depth = 0.25 + 0.75 * depth  # a dark red core; the walls are the tissue rolling into shadow
    for k in range(3):
        ch = tissue[k]
        ch += os_a * (depth * (0.5 * ch - pal.os[k]) + pal.os[k] - ch)
    # Cervical mucus plugs the canal: a translucent pale film over part of it.
    plug = os_a * _ramp(0.0, 1.4, mid + 0.5 * grain) * 0.45
    _blend(tissue, plug, pal.mucus)

    # Per shot: blood spots and streaks round the os, mucus strands.
    near_os = np.exp((ao * ao + bo * bo) * -3.0)
    if sf.blood is not None:
        bn = g.field("blood", sf.blood)
        thr = 3.9 - 2.4 * shot.blood * near_os
        spots = bn - thr
        spots *= 1.0 / 0.6
        np.clip(spots, 0.0, 1.0, out=spots)
        _blend(tissue, spots, pal.blood)
    if sf.mucus is not None:
        mn = g.field("mucus", sf.mucus)
        strand = np.exp(-(((ao - shot.mucus_u) * 2.5) ** 2) - (bo * 1.4) ** 2)
        muc = _smooth(0.2, 1.0, mn + 1.2 * strand - 0.6) * strand * shot.mucus
        _blend(tissue, muc * 0.5, pal.mucus)

    _scale(tissue, shade)
    _blend(img, alpha, tissue)
    lesion &= os_a < 0.5  # the os is a hole, not lesion
    facing = z * (1.0 - os_a) * (1.0 - groove)
    if gloss is not None:  # acetowhite epithelium is raised and glossy: it catches the light more
        facing += gloss
    facing += 0.8 * plug  # wet mucus in the os
    facing *= alpha
    return lesion, facing


def _lesion(
    tissue: np.ndarray,
    p: SceneParams,
    g: _Grid,
    pal: _Palette,
    stage: str,
    a: np.ndarray,
    b: np.ndarray,
    aa: float,
    lo: np.ndarray,
    mid: np.ndarray,
    grain: np.ndarray,
    dots: np.ndarray,
    vn: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw the lesion in its stage's look onto tissue; return its mask (anatomy: the same in every stage)
    and, after acetic acid, how much it adds to the wet gloss."""
    lfield = np.full((g.h, g.w), 9.0, _F32)
    for blob in p.lesions:
        win = _blob_window(p, g, blob, 1.0 + 2.0 * p.lesion_wobble + 0.1)
        if win is None:
            continue
        c, s = math.cos(blob.angle), math.sin(blob.angle)
        x = a[win] - blob.x
        y = b[win] - blob.y
        q = np.sqrt(((x * c + y * s) * (1.0 / blob.rx)) ** 2 + ((y * c - x * s) * (1.0 / blob.ry)) ** 2)
        np.minimum(lfield[win], q, out=lfield[win])
    # Geographic border: an additive, clipped perturbation, so no far-away pixel can flip into the lesion
    # (a multiplicative one goes negative where the noise is deep) and the blob windows stay exact.
    edge_n = g.noise(p.tissue_seed + 7, 8, 4, 0.6)
    np.clip(edge_n, -2.0, 2.0, out=edge_n)
    lfield += p.lesion_wobble * edge_n
    mask = lfield < 1.0
    e = max(p.lesion_edge, aa)
    inside = _smooth(1.0 + e, 1.0 - e, lfield)
    high = p.severity is Severity.HIGH_GRADE
    if stage == "iodine":
        lal = inside * pal.lesion_alpha
        if not high:  # low grade takes iodine partly: patchy, paler yellow
            lal *= _ramp(-1.4, 0.4, mid)
        tone = 0.72 + 0.28 * _ramp(-1.5, 1.5, grain)
        _blend(tissue, lal, (pal.lesion[0] * tone, pal.lesion[1] * tone, pal.lesion[2] * tone))
        return mask, None
    if pal.lesion_alpha > 0:
        # Acetowhite: dense oyster white (high grade) or thin translucent white (low grade) over the tissue.
        # Not paint: thinner (translucent) towards the border, the vessel network showing through faintly,
        # a little uneven, greyer where thin.
        op = inside * inside
        op *= p.lesion_opacity
        if not high:
            op *= 0.55 + 0.45 * _ramp(-1.2, 1.0, grain + 0.6 * mid)
        op *= 1.0 - 0.25 * _ramp(0.9, 0.99, 1.0 - np.abs(vn)) - 0.12 * _ramp(0.0, 2.0, grain)
        tone = 0.87 + 0.05 * lo + 0.05 * mid + 0.04 * grain + 0.06 * op
        grey = 1.0 - 0.06 * op
        _blend(tissue, op, (pal.lesion[0] * tone * grey, pal.lesion[1] * tone, pal.lesion[2] * tone))
        if p.mosaic > 0:
            tiles = _ramp(0.8, 0.95, 1.0 - np.abs(g.noise(p.tissue_seed + 8, 36, 1)))
            _blend(tissue, tiles * inside * (0.6 * p.mosaic), (0.72, 0.28, 0.32))
        if p.punctation > 0:
            _blend(tissue, _ramp(1.5, 2.2, dots) * inside * p.punctation, (0.6, 0.12, 0.16))
        return mask, op * 0.6
    if high and p.mosaic > 0:
        # Without acid only the abnormal vessels of a high-grade lesion show, faintly.
        tiles = _ramp(0.82, 0.95, 1.0 - np.abs(g.noise(p.tissue_seed + 8, 36, 1)))
        _blend(tissue, tiles * inside * (0.3 * p.mosaic), (0.6, 0.1, 0.14))
    return mask, None


def _speculum(img: np.ndarray, p: SceneParams, g: _Grid, pal: _Palette, shot: _Shot) -> np.ndarray:
    """Draw lateral walls and blades / tube over the scene; return the occluder alpha (1 = hidden)."""
    occ = np.zeros((g.h, g.w), _F32)
    aa = 1.5 / g.px
    soft = max(aa, 0.012)  # near the lens, so out of focus: soft edges (symmetric: the label cut stays)
    if p.side_walls > 0:
        # Lax lateral vaginal walls bulge in from the sides and hide the cervix edges.
        lo = g.noise(p.tissue_seed + 10, 4, 3)
        for side in (-1.0, 1.0):
            x = (g.u - 0.5) * side  # +0.5 at this side's frame edge
            d = x - (0.5 - p.side_walls + 0.05 * lo + 0.3 * (g.v - 0.5) ** 2)
            if float(d.max()) < -soft:
                continue
            a = _smooth(-soft, soft, d)
            roll = np.clip(d * (1.0 / 0.2), 0.0, 1.0)
            # Rugae: stacked transverse folds, a lit crest over a dark crease, fading in and out.
            ridges = np.sin(g.v * (p.fold_freq * 1.3) + 2.5 * lo + 0.8 * side)
            ridges = 0.22 * _ramp(0.2, 1.0, ridges) - 0.35 * _ramp(-0.5, -1.0, ridges)
            ridges *= _ramp(-1.0, 0.5, lo + 0.5 * side)
            shade = (0.3 + 0.7 * np.sin(np.clip(roll + 0.12, 0.0, 1.0) * 2.6)) * (1.0 + ridges + 0.1 * lo)
            _blend(img, a, (pal.wall[0] * shade, pal.wall[1] * shade, pal.wall[2] * shade))
            np.maximum(occ, a, out=occ)
    if p.speculum in ("metal", "plastic"):
        x, y = (g.u, g.v) if p.speculum_vertical else (g.v, g.u)
        for depth, top in ((p.blade_a + shot.blade_jitter, True), (p.blade_b - shot.blade_jitter, False)):
            if depth <= -0.1:
                continue
            yy = y if top else 1.0 - y
            d = depth - p.blade_curve * (x - 0.5) ** 2 - yy  # > 0 inside the blade, 0 at its arc-shaped tip
            if float(d.max()) < -soft:
                continue
            a = _smooth(-soft, soft, d)
            dd = np.clip(d, 0.0, None)
            if p.speculum == "metal":
                # Polished steel: bright rolled tip, dark band, broad soft reflections of the pink tissue.
                shade = (
                    0.5
                    + 0.7 * np.exp(dd * -60.0)
                    + 0.35 * np.exp(-(((dd - 0.09) * 20.0) ** 2))
                    + 0.12 * np.sin(x * 9.0 + dd * 25.0)
                )
                colour = (0.74 * shade + 0.06, 0.76 * shade + 0.02, 0.8 * shade + 0.02)
            else:
                # Translucent turquoise plastic: glossy tip, a little darker deeper in.
                shade = 0.8 + 0.35 * np.exp(dd * -40.0) - 0.3 * _ramp(0.0, 0.35, dd) + 0.08 * np.sin(x * 7.0)
                colour = (
                    0.55 * shade + 0.05,
                    0.76 * shade + 0.04,
                    0.88 * shade + 0.04,
                )  # the usual pale blue
            _blend(img, a, colour)
            np.maximum(occ, a, out=occ)
    elif p.speculum == "tube":
        # Looking down a tubular speculum: a round aperture in a metal cylinder, dark beyond it.
        du = g.u - (0.5 + shot.blade_jitter)
        dv = (g.v - 0.5) * 1.1
        d = np.sqrt(du * du + dv * dv) - (0.5 + 0.5 * p.blade_a)
        if float(d.max()) >= -aa:
            a = _ramp(-aa, aa, d)
            dd = np.clip(d, 0.0, None)
            shade = (0.45 + 0.75 * np.exp(dd * -50.0) + 0.35 * np.exp(-(((dd - 0.07) * 30.0) ** 2))) * (
                0.25 + 0.75 * _ramp(0.3, 0.0, dd)
            )
            _blend(img, a, (0.8 * shade + 0.05, 0.77 * shade, 0.75 * shade))
            np.maximum(occ, a, out=occ)
    return occ


def _aperture(img: np.ndarray, occ: np.ndarray, g: _Grid, shot: _Shot) -> None:
    """The colposcope's round field of view: black outside, which hides anatomy like a blade does."""
    cu = (g.u - shot.u0) / shot.span - 0.5  # picture coordinates: the aperture is fixed to the sensor
    cv = (g.v - shot.v0) / shot.span - 0.5
    d = np.sqrt(cu * cu + cv * cv)
    dark = _ramp(shot.aperture - 0.03, shot.aperture + 0.03, d)
    _scale(img, 1.0 - dark)
    np.maximum(occ, dark, out=occ)


def _glare(img: np.ndarray, g: _Grid, shot: _Shot, sf: _ShotFields, wet: np.ndarray) -> None:
    """Specular highlights of the wet surface under the coaxial light.

    Real ones are few and clustered: on convex ridges that face the light (lips, folds, raised acetowhite),
    elongated along the surface, crisp with a soft halo. Here they are the peaks of a field stretched
    sideways (the lips and rugae run across the picture) plus a finer isotropic one, grown only inside a
    few clusters where the wet surface faces the lens and the light is strongest.
    """
    du = g.u - shot.light_u
    dv = g.v - shot.light_v
    dens = _ramp(shot.glint_cut, shot.glint_cut + 0.8, g.field("clusters", sf.clusters))
    dens *= _ramp(0.35, 0.9, wet)
    dens *= np.exp((du * du + dv * dv) * -2.5)
    dens *= shot.wetness
    # Irregular flakes: the cut on a multi-scale field drops where the gloss is dense, none outside.
    peaks = g.field("wide", sf.wide)
    peaks += g.field("patches", sf.patches)
    peaks *= 0.55
    peaks += 0.55 * g.field("sparkle", sf.sparkle)
    peaks += 2.5 * dens
    spec = _ramp(3.0, 3.2, peaks)
    halo = _ramp(2.2, 3.1, peaks)
    halo *= halo
    on = _ramp(0.03, 0.15, dens)
    spec *= on
    halo *= on
    spec += (0.3 * halo + 0.06 * dens) * (1.0 - spec)
    if sf.bloom is not None:  # a large soft overexposed reflection, e.g. of the ring light
        bloom = _smooth(1.3, 2.3, g.field("bloom", sf.bloom))
        np.maximum(spec, bloom * (shot.bloom * 0.6) * wet, out=spec)
    for k in range(3):
        ch = img[k]
        ch += spec * (1.1 - ch)


def _green_filter(img: np.ndarray) -> None:
    """Red-free (green) filter: almost monochrome grey-cyan; red vessels and blood go dark."""
    lum = img[0] * 0.15 + img[1] * 0.65 + img[2] * 0.2
    lum *= 1.3
    tint = (0.8, 0.93, 0.9)
    for k in range(3):
        img[k] = lum * tint[k] + 0.1 * (img[k] - lum)


def _camera(img: np.ndarray, g: _Grid, shot: _Shot) -> np.ndarray:
    """Light falloff, vignette, white balance, saturation, sensor noise -> (h, W, 3) uint8 (before gamma)."""
    du = g.u - shot.light_u
    dv = g.v - shot.light_v
    cu = g.u - 0.5
    cv = g.v - 0.5
    vig = np.clip(cu * cu + cv * cv, 0.0, 0.5)
    vig *= 2.0
    gain = np.exp(du * du * (-2.0 * shot.falloff)) * np.exp(dv * dv * (-2.0 * shot.falloff))
    gain *= 1.0 - shot.vignette * vig * np.sqrt(vig)
    gain *= shot.exposure * 255.0
    lum = img[0] * 0.3 + img[1] * 0.55 + img[2] * 0.15
    tile = _noise_tile()
    rows = (np.arange(g.r0, g.r0 + g.h) + shot.noise_offset[1]) % tile.shape[0]
    cols = (np.arange(g.w) + shot.noise_offset[0]) % tile.shape[1]
    noise = tile[rows][:, cols] * (shot.noise * 255.0)
    out = np.empty((g.h, g.w, 3), np.uint8)
    for k in range(3):
        ch = img[k] - lum
        ch *= shot.saturation
        ch += lum
        ch *= gain * shot.gains[k]
        ch += noise
        np.clip(ch, 0.0, 255.0, out=ch)
        out[..., k] = ch
    return out


def _camera_blur_radius(shot: _Shot, px: float) -> float:
    return shot.blur * px * shot.span / 600.0 if shot.blur > 0 else 0.0


def camera_blur_extent(box_radius: float, width: int, height: int) -> float:
    """The rendered camera blur in the degradation model's unit (equivalent disc radius / short side).

    A box of radius r has per-axis variance r^2/3; a disc of radius R has R^2/4: R = 2r/sqrt(3).
    """
    return 2.0 * box_radius / math.sqrt(3.0) / min(width, height)


def _finish(out: np.ndarray, shot: _Shot, px: float) -> np.ndarray:
    """Tone curve, optional defocus and JPEG round trip, on the whole uint8 picture."""
    # Phone and colposcope cameras render punchy: gamma plus an S-curve that clips highlights.
    x = np.linspace(0.0, 1.0, 256) ** shot.gamma
    x = np.clip(0.5 + (x - 0.5) * shot.contrast, 0.0, 1.0)
    lut = (x * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(out).point(lut.tolist() * 3)
    if shot.blur > 0:
        # A box is cheaper than a Gaussian and a fair model of a defocus disc.
        im = im.filter(ImageFilter.BoxBlur(_camera_blur_radius(shot, px)))
    if shot.sharpen > 0:  # unsharp mask: extrapolate away from a box-blurred copy
        im = Image.blend(
            im.filter(ImageFilter.BoxBlur(max(px * shot.span / 300.0, 1.0))), im, 1.0 + shot.sharpen
        )
    if shot.jpeg:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=shot.jpeg)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.array(im)


# --------------------------------------------------------------------------- public API


def render(
    params: SceneParams, stage: str, size: tuple[int, int] = (512, 512), *, seed: int = 0
) -> LabelledImage:
    """Render one photo of `params` at `stage`. `size` is (width, height); `seed` varies per-shot effects."""
    if stage not in _STAGE_CODE:
        raise ValueError(f"stage {stage!r} is not one of {EXAM_STAGES}")
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16:
        raise ValueError(f"size {size} is too small")
    rng = np.random.default_rng((params.seed & _SEED_MASK, _STAGE_CODE[stage], int(seed) & _SEED_MASK, 0xC4))
    shot = _sample_shot(rng, params, stage)
    sf = _ShotFields.make(shot)
    look = shot.green_base if stage == "green" else stage
    pal = _palette(params, look)

    out = np.empty((height, width, 3), np.uint8)
    visible = np.zeros((height, width), bool)
    lesion = np.zeros((height, width), bool)
    frame = _Frame(width, height, shot.u0, shot.v0, shot.span)
    rows = max(4, _BAND_FLOATS // width)
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        g = _Grid(frame, r0, r1)
        img = np.zeros((3, g.h, g.w), _F32)  # zeros: columns the cervix covers skip the walls
        wet = np.full((g.h, g.w), 0.3, _F32)
        inside = covered = np.zeros(0, int)
        if params.cervix_in_view:
            ol = _outline(params, g)
            inside = np.flatnonzero(ol.alpha.max(axis=0) > 0.0)
            covered = np.flatnonzero(ol.alpha.min(axis=0) >= 1.0)
        # Walls only where the cervix does not cover every row of a column (it is convex enough for one run).
        if covered.size and covered[-1] - covered[0] + 1 == covered.size:
            wall_runs = [(0, int(covered[0])), (int(covered[-1]) + 1, g.w)]
        else:
            wall_runs = [(0, g.w)]
        for c0, c1 in wall_runs:
            if c1 > c0:
                sub = img[:, :, c0:c1]
                sub[...], crest = _background(params, g.cols(c0, c1), pal)
                wet[:, c0:c1] += 0.5 * crest
                if params.cervix_in_view:
                    _fornix_shadow(sub, ol.rho[:, c0:c1], ol.lo[:, c0:c1])
        cervix = np.zeros((g.h, g.w), _F32)
        les = np.zeros((g.h, g.w), bool)
        if inside.size:
            c0, c1 = int(inside[0]), int(inside[-1]) + 1
            les[:, c0:c1], facing = _cervix(
                img[:, :, c0:c1], params, g.cols(c0, c1), ol.cols(c0, c1), pal, look, shot, sf
            )
            wet[:, c0:c1] += 0.7 * facing
            cervix[:, c0:c1] = ol.alpha[:, c0:c1]
        occ = _speculum(img, params, g, pal, shot)
        if shot.aperture > 0:
            _aperture(img, occ, g, shot)
        wet += occ * (0.55 - wet)
        _glare(img, g, shot, sf, wet)
        if stage == "green":
            _green_filter(img)
        out[r0:r1] = _camera(img, g, shot)
        if params.cervix_in_view:
            vis = (cervix > 0.5) & (occ < 0.5)
            visible[r0:r1] = vis
            lesion[r0:r1] = les & vis
    image = _finish(out, shot, frame.px)

    box: Box | None = None
    present = bool(params.cervix_in_view and visible.any())
    if present:
        cols = np.flatnonzero(visible.any(axis=0))
        rws = np.flatnonzero(visible.any(axis=1))
        box = (float(cols[0]), float(rws[0]), float(cols[-1] + 1), float(rws[-1] + 1))
    labels = Labels(
        cervix_present=present,
        cervix_box=box,
        lesion_mask=lesion.astype(np.uint8),
        severity=params.severity,
        exam_stage=stage,
        blur_extent=camera_blur_extent(_camera_blur_radius(shot, frame.px), width, height),
    )
    return LabelledImage(image=image, labels=labels, subject=f"synthetic-{params.seed}", source="synthetic")


def generate_subject(
    seed: int, size: tuple[int, int] = (512, 512), stages: tuple[str, ...] = EXAM_STAGES
) -> list[LabelledImage]:
    """One subject, one photo per exam stage: same anatomy, different shots, subject id synthetic-{seed}."""
    params = sample_subject(seed)
    return [render(params, stage, size, seed=i) for i, stage in enumerate(stages)]


def generate_scene(seed: int, size: tuple[int, int] = (512, 512)) -> LabelledImage:
    """One photo with stage, shot and cervix presence (~15 % without) drawn from `seed`.

    The anatomy is sample_subject(seed), so the subject id matches generate_subject(seed).
    """
    rng = np.random.default_rng((int(seed) & _SEED_MASK, 0x5CE4E))
    params = sample_subject(seed)
    stage = str(_pick(rng, tuple(_STAGE_WEIGHTS), tuple(_STAGE_WEIGHTS.values())))
    if rng.random() < _NO_CERVIX_RATE:
        kind = str(_pick(rng, ("walls", "speculum", "closeup"), (0.45, 0.3, 0.25)))
        params = _without_cervix(params, kind, rng)
    return render(params, stage, size, seed=int(rng.integers(2**31)))


def _without_cervix(p: SceneParams, kind: str, rng: np.random.Generator) -> SceneParams:
    """The camera points away from the cervix: at a vaginal wall, into a blade, or a tissue close-up."""
    ang = rng.uniform(0, 2 * np.pi)
    changes: dict[str, Any] = {
        "cervix_in_view": False,
        "view_kind": kind,
        # The canal (fold centre, dark depth) moves towards or past a frame edge.
        "cx": float(0.5 + rng.uniform(0.35, 0.7) * np.cos(ang)),
        "cy": float(0.5 + rng.uniform(0.35, 0.7) * np.sin(ang)),
    }
    if kind == "speculum":
        changes.update(
            speculum=str(_pick(rng, ("metal", "plastic"), (0.6, 0.4))),
            blade_a=float(rng.uniform(0.3, 0.5)),
            blade_b=float(rng.uniform(-0.1, 0.3)),
        )
    elif kind == "closeup":
        changes.update(speculum="none", side_walls=0.0)
    return replace(p, **changes)


def generate_surround(seed: int, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """What lies around the cervix when it fills only part of the frame: vaginal walls and a speculum
    (the anatomy of subject `seed`, seen without its cervix). For framing other photos on
    (`training.data.device`)."""
    rng = np.random.default_rng((int(seed) & _SEED_MASK, 0x5044))
    params = sample_subject(seed)
    params = replace(params, cervix_in_view=False, view_kind="walls", cx=0.5, cy=0.5)
    return render(params, "acetic", size, seed=int(rng.integers(2**31))).image
