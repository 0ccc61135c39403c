"""Other devices' look: the same cervix as another phone, colposcope or health worker would photograph it.

The atlas is one colposcope: 800x600 landscape, the cervix filling the frame, one colour rendering, one
framing. Phone colposcopy photos differ in each of these, and a gate trained on the atlas alone learned
its look instead of the cervix (issue #13: 10 of 10 portrait phone photos called "no cervix"). So training
redraws every photo as another device would have taken it, and evaluation asks the same of held-out
photos (`training/device_suite.py`).

A `DeviceLook` is one sampled recipe; `apply_look` renders a labelled photo through it. In light's order:

1. **Framing**: the photo (its cervix box, or the whole atlas frame, which frames the cervix) is placed in a
   new frame of another aspect (4:3, 3:4, 16:9, 9:16, 1:1) so that the cervix spans `cervix_fraction` of
   the frame's short side (15-135 %: far away to cut by the frame), on a surround: a synthetic scene of
   vaginal walls and speculum without a cervix, or the dark of an unlit vagina. The paste is feathered.
2. **Speculum** blades over it: polished metal (opaque) or transparent plastic (a tinted, glossy veil).
3. **Field of view**: a colposcope's or clip-on lens's round aperture, dark outside (or none).
4. **Camera** in linear light: white balance error and colour cast (gains), vignetting (corner falloff).
5. **ISP**: tone (gamma), edge-preserving denoise that flattens fine texture (phones do it by default),
   unsharp-mask sharpening, JPEG.
6. **Orientation**: any quarter turn, and mirroring (front cameras, some apps).

Training renders at a working resolution (the frame's short side at most `max_short_side`) because the
models see 192-256 px inputs: ISP effects are drawn at that scale, where they survive to the model input.
The evaluation suite renders real 8-12 MP phone JPEGs instead and decodes them as the service does.

Labels: the cervix box moves with the photo; exam stage, severity and blur (relative to the cervix
region, which scaling does not change) are kept; the lesion mask is dropped (no task here needs it).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from training.data.degrade import to_linear, to_srgb
from training.data.records import Box, LabelledImage

# (width / height, probability) of the frame before any quarter turn.
FRAME_ASPECTS: tuple[tuple[float, float], ...] = (
    (4 / 3, 0.4),
    (3 / 4, 0.25),
    (16 / 9, 0.1),
    (9 / 16, 0.1),
    (1.0, 0.15),
)
CERVIX_FRACTION_RANGE = (0.15, 1.35)
SURROUNDS = ("scene", "dark")
SPECULA = ("none", "metal", "plastic")


@dataclass(frozen=True)
class DeviceLook:
    """One device, framing and processing; every strength is relative to the frame, so any size fits."""

    frame_aspect: float = 4 / 3  # width / height before the quarter turns
    cervix_fraction: float = 1.0  # cervix box's long side / frame's short side
    offset: tuple[float, float] = (0.5, 0.5)  # where the cervix centre sits in the room left for it, 0..1
    surround: str = "dark"  # one of SURROUNDS
    surround_seed: int = 0  # which surround scene
    feather: float = 0.06  # paste edge softness, fraction of the pasted photo's short side
    round_paste: bool = True  # paste as an ellipse (else a rectangle)
    speculum: str = "none"  # one of SPECULA
    speculum_depth: float = 0.15  # how far each blade reaches into the cervix box, fraction of its height
    speculum_sides: tuple[bool, bool] = (True, True)  # upper and lower blade present
    speculum_tint: tuple[float, float, float] = (0.75, 0.77, 0.8)
    aperture: float = 0.0  # round field of view's radius / half the frame diagonal (0: none)
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # white balance error / colour cast, linear light
    vignette: float = 0.0  # light lost in the corners, 0..1
    gamma: float = 1.0  # tone curve exponent on 0..1 sRGB
    denoise: float = 0.0  # 0..1 blend towards an edge-preserving smoothed copy
    sharpen: float = 0.0  # unsharp-mask amount (1.0 = 100 %)
    sharpen_radius: float = 1.0  # px at the rendered size
    jpeg_quality: int = 0  # 0: none
    quarter_turns: int = 0  # counter-clockwise
    mirror: bool = False


def _pick(rng: np.random.Generator, options: Sequence[tuple[float, float]]) -> float:
    values, weights = zip(*options, strict=True)
    return float(values[int(rng.choice(len(values), p=np.asarray(weights) / sum(weights)))])


def sample_look(
    rng: np.random.Generator, *, cervix_fraction: tuple[float, float] = CERVIX_FRACTION_RANGE
) -> DeviceLook:
    """A random other device: each effect drawn independently, so every combination occurs."""
    low, high = cervix_fraction
    # Log-uniform: a far-away cervix is as common as a close-up one, and 15 % is still a cervix to find.
    fraction = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    temperature = float(rng.uniform(-0.25, 0.25))  # warm (+) to cold (-) white balance error
    tint = float(rng.uniform(-0.1, 0.1))  # magenta (+) to green (-)
    gains = (1.0 + temperature, 1.0 - tint, 1.0 - temperature)
    speculum = str(rng.choice(SPECULA, p=[0.5, 0.3, 0.2]))
    tint_rgb = (
        tuple(float(v) for v in rng.uniform(0.65, 0.85, 3))
        if speculum == "metal"
        else tuple(float(v) for v in (rng.uniform(0.7, 0.95), rng.uniform(0.85, 1.0), rng.uniform(0.9, 1.0)))
    )
    return DeviceLook(
        frame_aspect=_pick(rng, FRAME_ASPECTS),
        cervix_fraction=fraction,
        offset=(float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 1.0))),
        surround=str(rng.choice(SURROUNDS, p=[0.6, 0.4])),
        surround_seed=int(rng.integers(2**31)),
        feather=float(rng.uniform(0.03, 0.25)),
        round_paste=bool(rng.random() < 0.7),
        speculum=speculum,
        speculum_depth=float(rng.uniform(0.0, 0.3)),
        speculum_sides=(bool(rng.random() < 0.8), bool(rng.random() < 0.8)),
        speculum_tint=tint_rgb,  # type: ignore[arg-type]
        aperture=float(rng.uniform(0.55, 1.0)) if rng.random() < 0.35 else 0.0,
        gains=gains,
        vignette=float(rng.uniform(0.0, 0.6)) if rng.random() < 0.6 else 0.0,
        gamma=float(math.exp(rng.uniform(math.log(0.8), math.log(1.25)))),
        denoise=float(rng.uniform(0.3, 1.0)) if rng.random() < 0.3 else 0.0,
        sharpen=float(rng.uniform(0.3, 1.5)) if rng.random() < 0.6 else 0.0,
        sharpen_radius=float(rng.uniform(0.6, 2.0)),
        jpeg_quality=int(rng.integers(70, 96)) if rng.random() < 0.8 else 0,
        quarter_turns=int(rng.integers(4)),
        mirror=bool(rng.random() < 0.3),
    )


# --- geometry ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """Where the photo lands in the new frame: its scale and offset, and the frame's size."""

    frame_size: tuple[int, int]  # width, height
    scale: float  # source px -> frame px
    left: float  # source (0, 0) in frame px
    top: float

    def box_to_frame(self, box: Box) -> Box:
        x0, y0, x1, y1 = box
        s = self.scale
        return (x0 * s + self.left, y0 * s + self.top, x1 * s + self.left, y1 * s + self.top)


def plan_framing(
    image_size: tuple[int, int], cervix_box: Box, look: DeviceLook, max_short_side: int
) -> Framing:
    """Frame size and placement so the cervix spans `look.cervix_fraction` of the frame's short side.

    The photo keeps its own resolution unless the frame would exceed `max_short_side`: then everything
    shrinks together (a far-away cervix in a 12 MP phone photo has as many pixels as the atlas frame).
    """
    x0, y0, x1, y1 = cervix_box
    cervix_long = max(x1 - x0, y1 - y0, 1.0)
    frame_short = cervix_long / look.cervix_fraction
    shrink = min(1.0, max_short_side / frame_short)
    frame_short *= shrink
    if look.frame_aspect >= 1:
        width, height = frame_short * look.frame_aspect, frame_short
    else:
        width, height = frame_short, frame_short / look.frame_aspect
    frame_w, frame_h = max(16, round(width)), max(16, round(height))
    scale = shrink
    box_w, box_h = (x1 - x0) * scale, (y1 - y0) * scale
    # The cervix centre ranges over the room the frame leaves it (or over the overlap when it is bigger).
    cx = box_w / 2 + look.offset[0] * (frame_w - box_w)
    cy = box_h / 2 + look.offset[1] * (frame_h - box_h)
    left = cx - ((x0 + x1) / 2) * scale
    top = cy - ((y0 + y1) / 2) * scale
    return Framing((frame_w, frame_h), scale, left, top)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def paste_alpha(width: int, height: int, feather: float, round_: bool) -> np.ndarray:
    """Where a pasted photo shows: a feathered rectangle, or a feathered ellipse touching its sides (the
    cervix is round and the photo's corners are walls or speculum anyway). `feather`: fraction of the
    short side. Negatives are pasted the same way, so the paste itself tells the detector nothing."""
    f = max(feather * min(width, height), 1.0)
    if round_:
        ys, xs = np.ogrid[:height, :width]
        u = (xs + 0.5 - width / 2) / (width / 2)
        v = (ys + 0.5 - height / 2) / (height / 2)
        inside = (1.0 - np.sqrt(u * u + v * v)) * (min(width, height) / 2)  # ~px to the ellipse edge
        return np.clip(inside / f, 0.0, 1.0).astype(np.float32)
    ys1 = np.minimum(np.arange(height), np.arange(height)[::-1]).astype(np.float32)
    xs1 = np.minimum(np.arange(width), np.arange(width)[::-1]).astype(np.float32)
    return (np.clip((ys1 + 0.5) / f, 0.0, 1.0)[:, None] * np.clip((xs1 + 0.5) / f, 0.0, 1.0)[None, :]).astype(
        np.float32
    )


def dark_surround(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The unlit vagina beyond the light's reach: near black, warm, with a little sensor noise."""
    width, height = size
    base = np.array([18.0, 8.0, 8.0]) * rng.uniform(0.3, 1.5)
    noise = rng.normal(0.0, 2.0, (height, width, 1))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def compose(
    image: np.ndarray,
    cervix_box: Box | None,
    look: DeviceLook,
    surround: np.ndarray,
    max_short_side: int,
) -> tuple[np.ndarray, Box | None]:
    """Step 1 and 2 of the recipe: the photo framed on `surround` (resized to the frame), blades over it."""
    height, width = image.shape[:2]
    box = cervix_box or (0.0, 0.0, float(width), float(height))
    framing = plan_framing((width, height), box, look, max_short_side)
    frame_w, frame_h = framing.frame_size
    canvas = _resize(surround, (frame_w, frame_h)).astype(np.float32)
    paste_w = max(1, round(width * framing.scale))
    paste_h = max(1, round(height * framing.scale))
    pasted = _resize(image, (paste_w, paste_h)).astype(np.float32)
    alpha = paste_alpha(paste_w, paste_h, look.feather, look.round_paste)
    left, top = round(framing.left), round(framing.top)
    # The part of the paste inside the frame.
    fx0, fy0 = max(0, left), max(0, top)
    fx1, fy1 = min(frame_w, left + paste_w), min(frame_h, top + paste_h)
    if fx1 > fx0 and fy1 > fy0:
        src = (slice(fy0 - top, fy1 - top), slice(fx0 - left, fx1 - left))
        a = alpha[src][..., None]
        region = canvas[fy0:fy1, fx0:fx1]
        canvas[fy0:fy1, fx0:fx1] = region + (pasted[src] - region) * a
    new_box = None
    if cervix_box is not None:
        bx0, by0, bx1, by1 = framing.box_to_frame(cervix_box)
        bx0, by0 = max(0.0, bx0), max(0.0, by0)
        bx1, by1 = min(float(frame_w), bx1), min(float(frame_h), by1)
        new_box = (bx0, by0, bx1, by1) if bx1 - bx0 >= 2 and by1 - by0 >= 2 else None
    frame_box = framing.box_to_frame(box)
    canvas = _speculum(canvas, frame_box, look)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), new_box


def _speculum(canvas: np.ndarray, cervix_box: Box, look: DeviceLook) -> np.ndarray:
    """Upper and lower blades, wider than the frame, whose arc-shaped tips reach `speculum_depth` into
    the cervix box."""
    if look.speculum == "none":
        return canvas
    height, width = canvas.shape[:2]
    x0, y0, x1, y1 = cervix_box
    box_h = max(y1 - y0, 1.0)
    xs = (np.arange(width, dtype=np.float32) - (x0 + x1) / 2) / width
    ys = np.arange(height, dtype=np.float32)
    tint = np.asarray(look.speculum_tint, np.float32) * 255.0
    soft = max(2.0, 0.01 * height)
    bend = 0.4 * height * xs**2  # the tip curves away from the cervix towards the frame's sides
    for upper, present in zip((True, False), look.speculum_sides, strict=True):
        if not present:
            continue
        if upper:
            inside = (y0 + look.speculum_depth * box_h - bend)[None, :] - ys[:, None]  # > 0 in the blade
        else:
            inside = ys[:, None] - (y1 - look.speculum_depth * box_h + bend)[None, :]
        a = np.clip(inside / soft + 0.5, 0.0, 1.0)
        if not a.any():
            continue
        depth = np.clip(inside, 0.0, None) / height
        # A bright rolled tip, then the blade's body fading into the dark.
        shade = 0.35 + 0.9 * np.exp(-depth * 25.0) + 0.08 * np.sin(xs * 9.0)[None, :]
        colour = tint[None, None, :] * shade[..., None]
        opacity = 1.0 if look.speculum == "metal" else 0.45  # transparent plastic shows the tissue behind
        canvas = canvas + (colour - canvas) * (a * opacity)[..., None]
    return canvas


def _aperture(image: np.ndarray, radius: float) -> np.ndarray:
    height, width = image.shape[:2]
    half_diagonal = math.hypot(width, height) / 2
    ys, xs = np.ogrid[:height, :width]
    d = np.sqrt((xs - width / 2 + 0.5) ** 2 + (ys - height / 2 + 0.5) ** 2) / half_diagonal
    edge = 0.02
    inside = np.clip((radius - d) / edge + 0.5, 0.0, 1.0).astype(np.float32)
    return (image * inside[..., None] + 4.0 * (1.0 - inside[..., None])).astype(np.uint8)


def camera(image: np.ndarray, look: DeviceLook) -> np.ndarray:
    """Step 3 and 4: aperture, then white balance / cast and vignetting in linear light."""
    out = _aperture(image, look.aperture) if look.aperture > 0 else image
    if look.gains == (1.0, 1.0, 1.0) and look.vignette == 0:
        return out
    linear = to_linear(out) * np.asarray(look.gains, np.float32)
    if look.vignette > 0:
        height, width = out.shape[:2]
        ys, xs = np.ogrid[:height, :width]
        r2 = ((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2
        linear *= (1.0 - look.vignette * np.clip(r2 / 2.0, 0.0, 1.0)).astype(np.float32)[..., None]
    return to_srgb(linear)


def edge_preserving_smooth(image: np.ndarray) -> np.ndarray:
    """A phone's noise reduction: fine low-contrast texture flattened, edges kept (3x3 median, then a
    mild smoothing only where the local contrast is low)."""
    pil = Image.fromarray(image)
    median = np.asarray(pil.filter(ImageFilter.MedianFilter(3)), np.float32)
    smooth = np.asarray(pil.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    contrast = np.abs(median - smooth).max(axis=2, keepdims=True)
    keep_edges = np.clip(contrast / 12.0, 0.0, 1.0)
    return np.clip(smooth + (median - smooth) * keep_edges + 0.5, 0, 255).astype(np.uint8)


def isp(image: np.ndarray, look: DeviceLook) -> np.ndarray:
    """Step 5: tone, denoise, sharpen, JPEG, as a phone's camera app renders."""
    out = image
    if look.gamma != 1.0:
        lut = np.clip(np.linspace(0.0, 1.0, 256) ** look.gamma * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out = lut[out]
    if look.denoise > 0:
        smoothed = edge_preserving_smooth(out).astype(np.float32)
        out = np.clip(out + (smoothed - out) * look.denoise + 0.5, 0, 255).astype(np.uint8)
    if look.sharpen > 0:
        filt = ImageFilter.UnsharpMask(
            radius=look.sharpen_radius, percent=round(look.sharpen * 100), threshold=2
        )
        out = np.asarray(Image.fromarray(out).filter(filt))
    if look.jpeg_quality:
        buffer = io.BytesIO()
        Image.fromarray(out).save(buffer, "JPEG", quality=look.jpeg_quality)
        out = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return out


def orient(
    image: np.ndarray, box: Box | None, quarter_turns: int, mirror: bool
) -> tuple[np.ndarray, Box | None]:
    """Step 6: mirror, then rotate counter-clockwise by quarter turns; the box follows."""
    width = image.shape[1]
    if mirror:
        image = image[:, ::-1]
        if box is not None:
            box = (width - box[2], box[1], width - box[0], box[3])
    for _ in range(quarter_turns % 4):
        width = image.shape[1]
        image = np.rot90(image)  # counter-clockwise: (x, y) -> (y, width - x)
        if box is not None:
            x0, y0, x1, y1 = box
            box = (y0, width - x1, y1, width - x0)
    return np.ascontiguousarray(image), box


def apply_look(
    labelled: LabelledImage,
    look: DeviceLook,
    surround: np.ndarray | None = None,
    *,
    max_short_side: int = 640,
    rng: np.random.Generator | None = None,
) -> LabelledImage:
    """The photo as `look`'s device would have taken it (see the module docstring), labels carried along.

    `surround` is the scene around the cervix (e.g. `training.data.synthetic.generate_surround`); dark
    when None or when the look asks for dark. For atlas photos, whose cervix box is unknown, the whole
    frame stands for the cervix (the atlas frames it) and becomes the new cervix box."""
    rng = rng or np.random.default_rng(look.surround_seed)
    height, width = labelled.image.shape[:2]
    present = bool(labelled.labels.cervix_present)
    box = labelled.labels.cervix_box or ((0.0, 0.0, float(width), float(height)) if present else None)
    background = surround if (surround is not None and look.surround == "scene") else None
    probe = plan_framing(
        (width, height), box or (0.0, 0.0, float(width), float(height)), look, max_short_side
    )
    if background is None:
        background = dark_surround(probe.frame_size, rng)
    framed, new_box = compose(labelled.image, box, look, background, max_short_side)
    rendered = isp(camera(framed, look), look)
    oriented, new_box = orient(rendered, new_box, look.quarter_turns, look.mirror)
    # The cervix centre always lands inside the frame (plan_framing), so a present cervix keeps a box.
    return labelled.with_image(oriented, cervix_box=new_box if present else None, lesion_mask=None)
