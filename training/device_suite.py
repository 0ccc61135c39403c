"""The "other device" evaluation suite: held-out photos as other phones would deliver them, as upload bytes.

Training draws random device looks (`training.data.device`); evaluation needs fixed, named ones, so every
figure can be reported "as taken" and under each transform, and so a photo's decision can be compared
across them (the same photo must get the same decision). Each transform returns the JPEG bytes a phone
would upload; the models are then measured on what the service decodes from them
(`service.io.decoding.decode_upload`: EXIF orientation, DCT-reduced decode), not on arrays.

| transform | what it stands for |
|---|---|
| `as_taken` | the photo itself (re-encoded at quality 95) |
| `rotate90`, `rotate180`, `rotate270` | the phone held another way, pixels stored rotated |
| `portrait_3x4` | a portrait phone frame: the centre 3:4 of the landscape photo |
| `circular_fov` | a clip-on lens or colposcope aperture: dark outside the circle on the short side |
| `phone_12mp` | upscaled to 12 MP (4032x3024) or 8 MP (3264x2448, by photo), phone sharpening, JPEG 88 |
| `colour_cast` | a warm white balance error (linear-light gains 1.15 / 1.0 / 0.82) |
| `phone_framed` | 8 MP portrait, the photo at 55 % of the frame's width on a dark surround, JPEG 90 |
| `preview_640x480` | a live preview frame (`/v1/quality`): the photo downscaled to 640x480, JPEG 80 |

`preview_640x480` was added with quality 3.0.0 (its 448 px input upsamples a preview frame's cervix); the
detector 2.0.0 figures were measured on the first nine transforms.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from service.inference.preprocess import crop_box
from service.io.decoding import DecodeLimits, decode_upload
from service.pipeline.stages import RunsModel, detect_cervix
from service.settings import Settings
from training.data.degrade import to_linear, to_srgb

Transform = Callable[[np.ndarray, int], bytes]  # (RGB photo, photo index) -> upload bytes


def _served_limits() -> DecodeLimits:
    """The decode limits the service runs with by default (its Settings' field defaults, not this shell's
    environment, so an evaluation does not depend on where it ran)."""
    fields = Settings.model_fields
    return DecodeLimits(
        max_pixels=fields["max_pixels"].default,
        min_side=fields["min_image_side"].default,
        decode_min_side=fields["decode_min_side"].default,
    )


# Suite uploads are scored on what `service.io.decoding.decode_upload` makes of them with these limits.
SERVED_DECODE = _served_limits()


@dataclass(frozen=True)
class ServedCrop:
    rgb: np.ndarray  # the cervix crop the crop-level models see
    region: tuple[int, int, int, int]  # in pixels of the upright original
    original_size: tuple[int, int]


def served_crop(
    data: bytes, detector: RunsModel, threshold: float, margin: float, min_side: int
) -> ServedCrop | None:
    """Upload bytes through the service's own chain: decoded as served, boxed by `detector`, the box grown by
    `margin` and cropped (re-decoded finer where the crop needs `min_side` pixels, as the pipeline does for
    the quality input). None when the detector finds no cervix (the service asks for a recapture)."""
    decoded = decode_upload(data, SERVED_DECODE)
    detection = detect_cervix(detector, decoded, threshold)
    if detection.box is None:
        return None
    region = crop_box(detection.box, *decoded.original_size, margin)
    return ServedCrop(decoded.region(region, min_side), region, decoded.original_size)


PHONE_SIZES = ((4032, 3024), (3264, 2448))


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def as_taken(rgb: np.ndarray, index: int) -> bytes:
    return encode_jpeg(rgb)


def _rotate(quarter_turns: int) -> Transform:
    def transform(rgb: np.ndarray, index: int) -> bytes:
        return encode_jpeg(np.rot90(rgb, quarter_turns))

    return transform


def portrait_3x4(rgb: np.ndarray, index: int) -> bytes:
    height, width = rgb.shape[:2]
    keep = min(width, round(height * 3 / 4))
    left = (width - keep) // 2
    return encode_jpeg(rgb[:, left : left + keep])


def circular_fov(rgb: np.ndarray, index: int) -> bytes:
    height, width = rgb.shape[:2]
    ys, xs = np.ogrid[:height, :width]
    inside = (xs - width / 2 + 0.5) ** 2 + (ys - height / 2 + 0.5) ** 2 <= (height / 2) ** 2
    return encode_jpeg(np.where(inside[..., None], rgb, np.uint8(4)))


def phone_12mp(rgb: np.ndarray, index: int) -> bytes:
    size = PHONE_SIZES[index % len(PHONE_SIZES)]
    if rgb.shape[0] > rgb.shape[1]:
        size = size[::-1]
    big = Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC)
    big = big.filter(ImageFilter.UnsharpMask(radius=2.0, percent=80, threshold=2))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def colour_cast(rgb: np.ndarray, index: int) -> bytes:
    return encode_jpeg(to_srgb(to_linear(rgb) * np.array([1.15, 1.0, 0.82], np.float32)))


def phone_framed(rgb: np.ndarray, index: int) -> bytes:
    width, height = PHONE_SIZES[1][1], PHONE_SIZES[1][0]  # 8 MP portrait
    frame = np.full((height, width, 3), (14, 7, 7), np.uint8)
    paste_w = round(0.55 * width)
    paste_h = round(paste_w * rgb.shape[0] / rgb.shape[1])
    pasted = np.asarray(Image.fromarray(rgb).resize((paste_w, paste_h), Image.Resampling.BICUBIC))
    ys, xs = np.ogrid[:paste_h, :paste_w]
    # A soft elliptical edge: the cervix fades into the dark vagina, not a pasted rectangle.
    r = np.sqrt(((xs - paste_w / 2) / (paste_w / 2)) ** 2 + ((ys - paste_h / 2) / (paste_h / 2)) ** 2)
    alpha = np.clip((1.0 - r) / 0.15, 0.0, 1.0)[..., None]
    top, left = (height - paste_h) // 2, (width - paste_w) // 2
    region = frame[top : top + paste_h, left : left + paste_w].astype(np.float32)
    frame[top : top + paste_h, left : left + paste_w] = (region + (pasted - region) * alpha + 0.5).astype(
        np.uint8
    )
    return encode_jpeg(frame, quality=90)


def preview_640x480(rgb: np.ndarray, index: int) -> bytes:
    height, width = rgb.shape[:2]
    size = (640, 480) if width >= height else (480, 640)
    small = Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return encode_jpeg(np.asarray(small), quality=80)


SUITE: dict[str, Transform] = {
    "as_taken": as_taken,
    "rotate90": _rotate(1),
    "rotate180": _rotate(2),
    "rotate270": _rotate(3),
    "portrait_3x4": portrait_3x4,
    "circular_fov": circular_fov,
    "phone_12mp": phone_12mp,
    "colour_cast": colour_cast,
    "phone_framed": phone_framed,
    "preview_640x480": preview_640x480,
}
OTHER_DEVICE = tuple(name for name in SUITE if name != "as_taken")


def consistency(decisions: Mapping[str, Sequence[object]]) -> dict[str, float]:
    """Share of photos whose decision under each transform equals their decision as taken."""
    reference = decisions["as_taken"]
    out: dict[str, float] = {
        name: float(np.mean([a == b for a, b in zip(reference, values, strict=True)]))
        for name, values in decisions.items()
        if name != "as_taken"
    }
    every = [all(decisions[name][i] == reference[i] for name in out) for i in range(len(reference))]
    out["all_transforms"] = float(np.mean(every)) if every else math.nan
    return out
