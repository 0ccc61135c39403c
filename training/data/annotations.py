"""Drawn annotations on atlas images: find them, paint them out, and draw random ones.

The IARC atlas photos carry marks a clinician drew: saturated green/yellow/cyan/magenta arrows,
thin blue-purple lesion outlines and yellow or white on-screen timestamps ("X09 01:45") with a
black border. Arrows sit on lesions and appear more in some grades and exam stages, so a model
could read the label off the marks instead of the tissue. Two defences, used together:

* `annotation_mask` + `remove_annotations`: find the marks and inpaint them before training.
* `draw_random_marks`: draw look-alike marks at random places on random images, so whatever the
  remover misses carries no label information.

Strokes are found by colour: each mark colour gets a score (e.g. green = G - max(R, B)) that tissue
rarely reaches, and a morphological top-hat keeps only the parts of a score map thinner than a
drawn arrow head -- that separates a cyan arrow from the cyan speculum and a yellow arrow from a
large iodine-stained area. Each remaining component must then look drawn: mostly near-pure colour
(drawn yellow has R ~ G, iodine yellow-orange does not; drawn cyan has G ~ B, the speculum is
bluer), no thicker than an arrow head, and for cyan arrow-sized and off the frame edge. Timestamps
are found as rows of equal-height glyphs with a black border in the top or bottom quarter.
Inpainting is push-pull normalized convolution (smooth, no texture), per cluster of marks.

Measured on all 209 atlas images (800x600), judged by eye: 55 mark-free images have 0.007 % of
pixels flagged on average (one of 55 has any: a specular cluster read as two glyphs, 0.36 %);
153 marked images 1.0 % (median 0.49 %), only one with nothing flagged (white text without a black
border). Mask + removal take ~45 ms per image on one core (p95 ~65 ms).
Known misses: white arrows and borderless white text (colour cannot tell them from speculars),
cyan arrows cut by the frame edge, yellow arrows on yellow iodine-negative tissue.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# Top-hat width as a fraction of the short side: wider than any arrow head (~15 px at 600 px),
# narrower than speculum blades, iodine areas and green-filter casts.
_TOPHAT_FRACTION = 0.04
# Score thresholds (0..255 units). Seeds must be unmistakably drawn; the fringe grows from them
# down to the low threshold to catch JPEG-smeared edges.
_SEED = 90.0
_GROW = 40.0
# Components larger than this fraction of the image are scene objects, not marks.
_MAX_COMPONENT = 0.05  # lesion outlines can enclose a lot but cover little: ~1 % at most
# A stroke's seeds are mostly pure colour: HSV saturation >= _PURE_SATURATION on >= _PURE_FRACTION.
_PURE_SATURATION = 0.8
_PURE_FRACTION = 0.5
# Outlines: at most 3 px "radius" at 600 px and at least 60 px long; JPEG leaves them ~0.6-0.7 saturated.
_LINE_INRADIUS = 0.005
_LINE_EXTENT = 0.1
_LINE_SATURATION = 0.6
# Largest inscribed radius of a stroke, as a fraction of the short side: atlas arrow heads measure
# 8-11 px at 600 px, outlines ~3 px; saturated tissue patches that pass the colour tests are larger.
_MAX_INRADIUS = 0.022
_MAX_ARROW_EXTENT = 0.15  # atlas arrows span ~65-80 px at 600 px
_YELLOW, _CYAN = 1, 2  # indices in _colour_scores
_DILATE = 2  # px at 600 px short side: JPEG ringing and the 1 px dark edge around drawn lines


def _colour_scores(image: np.ndarray) -> np.ndarray:
    """(5, H, W) uint8 "how much like a drawn colour" maps, clipped to 0..255.

    Each is the margin by which one channel pair dominates the rest; pure drawn colours score ~255,
    tissue (pink/red/white, low saturation) scores near 0 or below. Integer maths: 3x faster."""
    rgb = image.astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    scores = np.stack(
        [
            g - np.maximum(r, b),  # green arrows and outlines
            # Yellow arrows have R ~ G; iodine-stained tissue is yellow-ORANGE (R - G ~ 50): 2.5x penalty.
            np.minimum(r, g) - b - ((5 * np.maximum(r - g, 0)) >> 1) - np.maximum(g - r, 0),
            np.minimum(g, b) - r - (np.abs(g - b) >> 1),  # cyan arrows
            b - np.maximum(r, g),  # blue/purple outlines
            np.minimum(r, b) - g - (np.abs(r - b) >> 1),  # magenta arrows, purple outlines
        ]
    )
    return np.clip(scores, 0, 255).astype(np.uint8)


def _thin_part(score: np.ndarray, width: int) -> np.ndarray:
    """White top-hat: what remains of `score` after removing everything at least `width` px wide."""
    opened = ndimage.maximum_filter(ndimage.minimum_filter(score, size=width, mode="nearest"), size=width)
    return score - opened  # opened <= score, so no uint8 wrap-around


def colour_mark_mask(image: np.ndarray) -> np.ndarray:
    """HxW bool: thin, strongly coloured strokes (arrows, outlines).

    Per colour: hysteresis on the top-hat of its score, then per-component tests (`_is_stroke`).
    Colours are kept apart so an arrow drawn over a tissue area of another saturated colour (a green
    arrow on yellow iodine) is judged on its own pixels."""
    h, w = image.shape[:2]
    short = min(h, w)
    width = max(3, round(_TOPHAT_FRACTION * short) | 1)
    mask = np.zeros((h, w), dtype=bool)
    rgb = image.astype(np.int16)
    for colour, score in enumerate(_colour_scores(image)):
        # Only where a seed is possible, plus one filter width (the opening's reach): often a tiny box.
        rows = np.nonzero((score > _SEED).any(axis=1))[0]
        if rows.size == 0:
            continue
        cols = np.nonzero((score[rows[0] : rows[-1] + 1] > _SEED).any(axis=0))[0]
        box = (
            slice(max(rows[0] - width, 0), min(rows[-1] + width + 1, h)),
            slice(max(cols[0] - width, 0), min(cols[-1] + width + 1, w)),
        )
        thin = _thin_part(score[box], width)
        seeds = thin > _SEED
        grow = thin > _GROW
        # Label with 1 px gaps bridged: a thin outline that JPEG broke into dashes is one stroke,
        # so dashes without a seed of their own (e.g. over white tissue) still join their line.
        labels, count = ndimage.label(ndimage.maximum_filter(grow, size=3), structure=np.ones((3, 3)))
        labels[~grow] = 0
        if count == 0:
            continue
        seed_counts = np.bincount(labels[seeds], minlength=count + 1)
        candidates = np.nonzero(seed_counts >= max(3, round(8 * (short / 600) ** 2)))[0]
        keep = np.zeros(count + 1, dtype=bool)
        parts = ndimage.find_objects(labels)
        for index in candidates[candidates > 0]:
            part = parts[index - 1]
            component = labels[part] == index
            at = (
                slice(box[0].start + part[0].start, box[0].start + part[0].stop),
                slice(box[1].start + part[1].start, box[1].start + part[1].stop),
            )
            keep[index] = _is_stroke(component, seeds[part], rgb[at], colour, at, (h, w))
        mask[box] |= keep[labels]
    return mask


def _is_stroke(
    component: np.ndarray,
    seeds: np.ndarray,
    rgb: np.ndarray,
    colour: int,
    at: tuple[slice, slice],
    shape: tuple[int, int],
) -> bool:
    """Does one thin, coloured component look drawn? Pure colour on most seed pixels, no thicker
    than an arrow head, not scene-sized; cyan only arrow-sized and off the frame edge, because the
    cyan speculum is pure cyan plastic whose thin edges enter from the border. Long 1-2 px outlines
    lose saturation to JPEG chroma subsampling, so they get a laxer purity test."""
    h, w = shape
    short = min(h, w)
    if component.sum() > _MAX_COMPONENT * h * w:
        return False
    extent = max(at[0].stop - at[0].start, at[1].stop - at[1].start)
    if colour == _CYAN:
        touches_edge = at[0].start == 0 or at[1].start == 0 or at[0].stop == h or at[1].stop == w
        if extent > _MAX_ARROW_EXTENT * short or touches_edge:
            return False
    # Drawn strokes are at most an arrow head thick; stained tissue patches are thicker.
    inradius = float(ndimage.distance_transform_edt(np.pad(component, 1)).max())
    if inradius > _MAX_INRADIUS * short:
        return False
    is_line = inradius <= _LINE_INRADIUS * short and extent >= _LINE_EXTENT * short
    saturation = _LINE_SATURATION if is_line else _PURE_SATURATION
    return _pure_fraction(rgb[component & seeds], colour, saturation) >= _PURE_FRACTION


def _pure_fraction(pixels: np.ndarray, colour: int, saturation: float = _PURE_SATURATION) -> float:
    """Fraction of (N, 3) int16 seed pixels that look like a drawn colour, not tissue.

    Drawn marks are near-pure colours (HSV saturation >= `saturation`). Yellow and cyan need more:
    overexposed iodine-negative tissue is saturated yellow too, but R - G ~ 20-50 where drawn yellow
    has R ~ G; the speculum's cyan is bluer than drawn cyan."""
    if len(pixels) == 0:
        return 0.0
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    top = pixels.max(axis=1)
    pure = (top - pixels.min(axis=1)) >= saturation * top
    if colour == _YELLOW:
        pure &= (np.abs(r - g) <= 15) & (b <= 0.35 * g)
    elif colour == _CYAN:  # drawn cyan has G ~ B; the speculum's plastic is bluer (B - G ~ 25)
        pure &= np.abs(g - b) <= 15
    return float(pure.mean())


def text_mask(image: np.ndarray) -> np.ndarray:
    """HxW bool: on-screen text (timestamps such as "X09  01:45"), found as lines of glyphs.

    The overlay draws pale-yellow or white characters with a near-black border. Stroke pixels are
    bright pixels next to near-black ones; smearing them horizontally by about one glyph gap joins a
    word into one blob. A text line is a blob as tall as a character (3.5-8 % of the short side),
    at least as wide as tall, in the top or bottom quarter of the frame, made of both bright fill and
    black border, with >= 2 glyphs sharing cap line and baseline (`_glyph_row`). Speculars can be
    bright with a dark rim too, but do not line up like that. Returns fill and border pixels."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    band = max(1, h // 4)
    for rows in (slice(0, band), slice(max(h - band, band), h)):
        mask[rows] = _text_in_band(image[rows], min(h, w))
    return mask


def _text_in_band(image: np.ndarray, short: int) -> np.ndarray:
    h, w = image.shape[:2]
    luma = image[..., 0] * np.uint16(77) + image[..., 1] * np.uint16(150) + image[..., 2] * np.uint16(29)
    # Fill is pale yellow or white: red at least on par with green and blue, so the bright cyan
    # speculum next to a glyph's border does not join the fill.
    rgb = image.astype(np.int16)
    warm = (rgb[..., 0] + 25 >= rgb[..., 1]) & (rgb[..., 0] + 25 >= rgb[..., 2])
    bright = (luma >= 150 * 256) & warm
    # Neutral near-black only: a dark-blue drawn outline must not pass for a text border.
    black = (luma <= 50 * 256) & (image.max(axis=2) <= 90)
    rim = max(1, round(3 * short / 600))
    near_black = ndimage.maximum_filter(black, size=2 * rim + 1)
    stroke = bright & near_black
    if not stroke.any():
        return stroke
    gap = max(3, round(0.035 * short))
    smeared = ndimage.minimum_filter(ndimage.maximum_filter(stroke, size=(3, gap)), size=(3, gap))
    labels, _ = ndimage.label(smeared, structure=np.ones((3, 3)))
    mask = np.zeros((h, w), dtype=bool)
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        lh = sl[0].stop - sl[0].start
        lw = sl[1].stop - sl[1].start
        if not (0.035 * short <= lh <= 0.08 * short and lh <= lw <= 12 * lh):
            continue
        box = (
            slice(max(sl[0].start - rim, 0), min(sl[0].stop + rim, h)),
            slice(max(sl[1].start - rim, 0), min(sl[1].stop + rim, w)),
        )
        if bright[box].mean() < 0.12 or black[box].mean() < 0.08 or not _glyph_row(stroke[box], short):
            continue
        # Fill plus the dark border around it (border pixels are darker than the fill).
        mask[box] |= bright[box] | (near_black[box] & (luma[box] < 110 * 256))
    return mask


def _glyph_row(bright: np.ndarray, short: int) -> bool:
    """True if the bright fills (next to black) in a candidate line include >= 2 glyphs of one
    height, top-aligned: characters of one font share cap line and baseline, specular clusters do
    not. Tried as is and with 1-2 px gaps closed, because thin fills break up under JPEG while in
    tightly set fonts closing merges neighbouring glyphs."""
    closed = ndimage.binary_closing(np.pad(bright, 2), structure=np.ones((3, 3), dtype=bool))[2:-2, 2:-2]
    return _aligned_glyphs(bright, short) or _aligned_glyphs(closed, short)


def _aligned_glyphs(fill: np.ndarray, short: int) -> bool:
    labels, count = ndimage.label(fill)  # 4-connected: a 1 px border must separate fill and background
    if count < 2:
        return False
    spans = [(sl[0].start, sl[0].stop) for sl in ndimage.find_objects(labels) if sl is not None]
    tall = np.array([(y0, y1) for y0, y1 in spans if y1 - y0 >= 0.025 * short])
    if len(tall) < 2:
        return False
    tol = max(2, round(0.005 * short))
    # Largest group sharing cap line and baseline (top and bottom within a few pixels of one glyph's).
    same_top = np.abs(tall[:, None, 0] - tall[None, :, 0]) <= tol
    same_bottom = np.abs(tall[:, None, 1] - tall[None, :, 1]) <= tol
    return int((same_top & same_bottom).sum(axis=1).max()) >= 2


def annotation_mask(image: np.ndarray) -> np.ndarray:
    """HxW bool: pixels that are drawn marks (coloured strokes and on-screen text), dilated to cover
    their JPEG fringes."""
    mask = colour_mark_mask(image) | text_mask(image)
    radius = max(1, round(_DILATE * min(image.shape[:2]) / 600))
    if mask.any():
        mask = ndimage.binary_dilation(mask, iterations=radius)
    return mask


def remove_annotations(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Inpaint masked pixels with push-pull normalized convolution (no OpenCV).

    Known pixels are averaged down an image pyramid (push); the holes are then filled from the
    coarsest level back up, each level blending its own estimate with the upsampled coarser one by
    how much known data it holds (pull). Thin strokes fill from their immediate surroundings, wide
    glyphs from further out; the fill is smooth and texture-free, fine for marks a few pixels wide.
    Works on the box around the marks, so cost follows the marks."""
    if mask is None:
        mask = annotation_mask(image)
    out = image.copy()
    if not mask.any():
        return out
    h, w = mask.shape
    margin = max(8, round(0.03 * min(h, w)))
    # One crop per cluster of marks (an arrow, a text line, an outline), plus a ring of known pixels.
    near = max(3, margin // 2)
    groups, _ = ndimage.label(ndimage.maximum_filter(mask, size=2 * near + 1), structure=np.ones((3, 3)))
    for box in ndimage.find_objects(groups):
        if box is None:
            continue
        crop = (
            slice(max(box[0].start - margin, 0), min(box[0].stop + margin, h)),
            slice(max(box[1].start - margin, 0), min(box[1].stop + margin, w)),
        )
        hole = mask[crop]
        filled = _push_pull(image[crop].astype(np.float32), (~hole).astype(np.float32))
        out[crop][hole] = np.clip(filled[hole] + 0.5, 0, 255).astype(np.uint8)
    return out


def _push_pull(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fill where `weight` is 0 from a pyramid of weight-normalised 2x2 averages (Gortler et al. 1996).

    Each level holds the mean of the known values under it and a confidence min(1, known weight);
    coming back up, a pixel keeps confidence x its own mean + (1 - confidence) x the coarser fill."""
    h, w = weight.shape
    if weight.all() or not weight.any():
        return values if weight.all() else np.zeros_like(values)
    if h <= 1 and w <= 1:
        return values
    # Push: sum values x weight and weight over 2x2 blocks (odd sizes padded with zero weight).
    ph, pw = h + h % 2, w + w % 2
    vw = np.zeros((ph, pw, values.shape[2]), dtype=np.float32)
    vw[:h, :w] = values * weight[..., None]
    ww = np.zeros((ph, pw), dtype=np.float32)
    ww[:h, :w] = weight
    v_sum = vw[0::2, 0::2] + vw[1::2, 0::2] + vw[0::2, 1::2] + vw[1::2, 1::2]
    w_sum = ww[0::2, 0::2] + ww[1::2, 0::2] + ww[0::2, 1::2] + ww[1::2, 1::2]
    coarse_mean = v_sum / np.maximum(w_sum, 1e-6)[..., None]
    coarse = _push_pull(coarse_mean, np.minimum(w_sum, 1.0))
    # Pull: bilinear upsample of the coarser fill, blended by this level's confidence.
    up = _upsample2(coarse)[:h, :w]
    return weight[..., None] * values + (1.0 - weight[..., None]) * up


def _upsample2(image: np.ndarray) -> np.ndarray:
    """Exact 2x bilinear upsampling (pixel centres at half-pixel offsets): 3/4 nearest + 1/4 next."""
    p = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
    rows = np.stack([0.75 * p[1:-1] + 0.25 * p[:-2], 0.75 * p[1:-1] + 0.25 * p[2:]], axis=1)
    rows = rows.reshape(2 * image.shape[0], image.shape[1], -1)
    p = np.pad(rows, ((0, 0), (1, 1), (0, 0)), mode="edge")
    cols = np.stack([0.75 * p[:, 1:-1] + 0.25 * p[:, :-2], 0.75 * p[:, 1:-1] + 0.25 * p[:, 2:]], axis=2)
    return cols.reshape(rows.shape[0], 2 * image.shape[1], -1)


# --- augmentation --------------------------------------------------------------------------------

# Colours measured on atlas marks (RGB): arrows are pure primaries/secondaries, outlines mostly
# saturated blue-violet (sometimes green or pale yellow), timestamps pale yellow or white.
ARROW_COLOURS = ((10, 250, 5), (255, 252, 10), (12, 250, 250), (240, 20, 240), (250, 250, 250))
OUTLINE_COLOURS = ((30, 5, 200), (60, 10, 210), (110, 40, 200), (80, 225, 70), (230, 230, 120))
TEXT_COLOURS = ((230, 225, 110), (215, 220, 80), (240, 240, 240))
# Marks per image when drawn, and the mix of kinds (arrows dominate in the atlas).
_MAX_MARKS = 6
_KINDS = ("arrow", "arrow", "arrow", "outline", "text")


def draw_random_marks(image: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
    """With probability `p`, draw 1-6 atlas-style marks (notched arrows, wobbly outlines, timestamp
    text) at random places, so marks carry no label information wherever they survive removal.

    Marks are drawn on a separate layer that is softened by ~0.6 px before compositing: atlas marks
    went through JPEG, and crisp synthetic ones would be told apart from real ones."""
    if rng.random() >= p:
        return image.copy()
    h, w = image.shape[:2]
    scale = min(h, w) / 600.0
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, _MAX_MARKS + 1))):
        kind = _KINDS[int(rng.integers(len(_KINDS)))]
        if kind == "arrow":
            _draw_arrow(draw, rng, w, h, scale)
        elif kind == "outline":
            _draw_outline(draw, rng, w, h, scale)
        else:
            _draw_text(draw, rng, w, h, scale)
    drawn = np.asarray(layer)
    out = image.copy()
    ys, xs = np.nonzero(drawn[..., 3].any(axis=1))[0], np.nonzero(drawn[..., 3].any(axis=0))[0]
    if ys.size == 0:
        return out
    pad = 3
    box = (slice(max(ys[0] - pad, 0), ys[-1] + pad + 1), slice(max(xs[0] - pad, 0), xs[-1] + pad + 1))
    marks = drawn[box].astype(np.float32) / 255.0
    soften = (0.6 * scale, 0.6 * scale, 0)
    # Premultiplied blur, then composite: colour / alpha stays the mark's own colour near its edges.
    alpha = ndimage.gaussian_filter(marks[..., 3:], soften)
    colour = ndimage.gaussian_filter(marks[..., :3] * marks[..., 3:], soften) * 255.0
    mixed = colour + (1.0 - alpha) * image[box].astype(np.float32)
    out[box] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    return out


def _colour(rng: np.random.Generator, palette: tuple[tuple[int, int, int], ...]) -> tuple[int, int, int, int]:
    base = np.array(palette[int(rng.integers(len(palette)))], dtype=np.int32)
    r, g, b = (int(v) for v in np.clip(base + rng.integers(-8, 9, 3), 0, 255))  # atlas marks vary little
    return (r, g, b, 255)


def _draw_arrow(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, scale: float) -> None:
    """An arrow like the atlas stamp: thick shaft and a notched head (~70 px long at 600 px)."""
    length = rng.uniform(55, 85) * scale
    head = rng.uniform(0.38, 0.5) * length
    half = head * rng.uniform(0.35, 0.45)
    angle = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    tip = np.array([rng.uniform(0.03, 0.97) * w, rng.uniform(0.03, 0.97) * h])
    base = tip - direction * head
    notch = tip - direction * head * rng.uniform(0.65, 0.8)
    tail = tip - direction * length
    colour = _colour(rng, ARROW_COLOURS)
    draw.line([tuple(tail), tuple(notch)], fill=colour, width=max(2, round(rng.uniform(4, 6) * scale)))
    draw.polygon(
        [tuple(tip), tuple(base + normal * half), tuple(notch), tuple(base - normal * half)], fill=colour
    )


def _draw_outline(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, scale: float) -> None:
    """A wobbly closed (sometimes open) curve around a random region, like a drawn lesion outline."""
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    rx, ry = rng.uniform(30, 180) * scale, rng.uniform(20, 110) * scale
    t = np.linspace(0, 2 * math.pi, 96, endpoint=rng.random() < 0.7)
    wobble = np.ones_like(t)
    for k in range(2, 9):
        wobble += rng.normal(0, 0.15 / k) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    points = [
        (float(x), float(y))
        for x, y in zip(cx + rx * wobble * np.cos(t), cy + ry * wobble * np.sin(t), strict=True)
    ]
    draw.line(
        points,
        fill=_colour(rng, OUTLINE_COLOURS),
        width=max(1, round(rng.uniform(1.5, 3.5) * scale)),
        joint="curve",
    )


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType sizing: the small bitmap font still draws glyphs
        return ImageFont.load_default()


def _draw_text(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, scale: float) -> None:
    """A timestamp-like string ("X09", "01:45", "T2:08") in pale yellow or white with a black border,
    anywhere (the atlas has them near the top, but position must not be informative either)."""
    choice = int(rng.integers(3))
    if choice == 0:
        text = f"X{int(rng.integers(1, 20)):02d}"
    elif choice == 1:
        text = f"{int(rng.integers(0, 15)):02d}:{int(rng.integers(0, 60)):02d}"
    else:
        text = f"{'TG'[int(rng.integers(2))]}{int(rng.integers(1, 9))}:{int(rng.integers(0, 60)):02d}"
    size = max(8, round(rng.uniform(26, 36) * scale))
    xy = (float(rng.uniform(0.02, 0.85) * w), float(rng.uniform(0.02, 0.9) * h))
    draw.text(
        xy,
        text,
        fill=_colour(rng, TEXT_COLOURS),
        font=_font(size),
        stroke_width=max(1, round(2 * scale)),
        stroke_fill=(0, 0, 0, 255),
    )
