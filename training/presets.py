"""Input specs and transforms for the four models: the one place that owns them.

Evaluation transforms are the service's own preprocessing (`service.inference.preprocess.prepare`) on the
spec written into each manifest, so what a model was measured with is what it is served with.
Training transforms are that same deterministic path with augmentation in front of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.inference.manifest import InputSpec
from service.inference.preprocess import crop, crop_box, fit, normalize
from training.backbones import LITE_MEAN, LITE_STD
from training.data.annotations import draw_random_marks
from training.data.records import LabelledImage

_RGB = ("R", "G", "B")
# Generic statistics for the models trained from scratch: any fixed standardisation works; these put
# 8-bit values in about [-2, 2]. They travel in the manifest, which is what matters. Models on a
# pretrained backbone use the statistics it was trained with (LITE_MEAN, LITE_STD).
_MEAN, _STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

INPUT_SPECS: dict[str, InputSpec] = {
    "detector": InputSpec(name="image", width=192, height=192, channels=_RGB, resize="letterbox",
                          mean=LITE_MEAN, std=LITE_STD),
    "quality": InputSpec(name="crop", width=448, height=448, channels=_RGB, resize="letterbox",
                         mean=LITE_MEAN, std=LITE_STD),
    "segmenter": InputSpec(name="crop", width=224, height=224, channels=_RGB, resize="letterbox",
                           mean=LITE_MEAN, std=LITE_STD),
    # Same size and letterbox as the segmenter: its probability map is the 4th channel as is. The severity
    # model measures colours and areas (training.case_severity.SwedeMeasures), so every channel is kept 0..1.
    "severity": InputSpec(name="crop", width=224, height=224, channels=(*_RGB, "lesion_probability"),
                          resize="letterbox", mean=(0.0,) * 4, std=(1.0,) * 4),
}  # fmt: skip
# Crop-level models see the detector box grown by this fraction per side
# (service.inference.preprocess.crop_box).
CROP_MARGIN = 0.1


def cervix_region(
    labelled: LabelledImage, rng: np.random.Generator | None = None
) -> tuple[int, int, int, int]:
    """The crop a crop-level model sees: around the labelled box, or, for real photos without a box
    (the atlas frames the cervix), around the whole frame. Training jitters the box the way the
    detector's boxes scatter; evaluation (rng=None) uses it as is."""
    height, width = labelled.image.shape[:2]
    box = labelled.labels.cervix_box or (0.0, 0.0, float(width), float(height))
    if rng is not None:
        x0, y0, x1, y1 = box
        bw, bh = x1 - x0, y1 - y0
        jitter = rng.uniform(-0.08, 0.08, 4) * np.array([bw, bh, bw, bh])
        box = (x0 + jitter[0], y0 + jitter[1], x1 + jitter[2], y1 + jitter[3])
    return crop_box(box, width, height, CROP_MARGIN)


@dataclass(frozen=True)
class SegmentationSample:
    tensor: np.ndarray
    mask: np.ndarray  # HxW float32 {0,1} at model input size


def segmentation_view(
    labelled: LabelledImage,
    rng: np.random.Generator | None,
    spec: InputSpec = INPUT_SPECS["segmenter"],
    region: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(letterboxed uint8 RGB, HxW float32 {0,1} mask) at the model input: crop, then letterbox image and
    mask together (as one 4-band image) so they stay aligned. Training (`rng`) draws random atlas-like
    marks, flips, jitters the crop box as the detector's boxes scatter and jitters colour; evaluation
    (rng=None) takes `region` (default: `cervix_region`) as is."""
    if labelled.labels.lesion_mask is None:
        raise ValueError("segmentation needs a lesion mask")
    image = labelled.image
    mask = labelled.labels.lesion_mask
    region = region or cervix_region(labelled, rng)
    if rng is not None:
        image = draw_random_marks(image, rng)
        if rng.random() < 0.5:  # the crop box flips with the photo (a cervix off centre stays in it)
            image, mask = image[:, ::-1], mask[:, ::-1]
            width = image.shape[1]
            region = (width - region[2], region[1], width - region[0], region[3])
    both = np.dstack([crop(image, region), crop(mask, region) * np.uint8(255)])
    fitted, _ = fit(both, _with_channels(spec, 4))
    rgb = fitted[..., :3] if rng is None else colour_jitter(fitted[..., :3], rng)
    return np.ascontiguousarray(rgb), (fitted[..., 3] >= 128).astype(np.float32)


def segmentation_sample(
    labelled: LabelledImage, rng: np.random.Generator | None, spec: InputSpec = INPUT_SPECS["segmenter"]
) -> SegmentationSample:
    """`segmentation_view`, normalised as the model takes it."""
    rgb, mask = segmentation_view(labelled, rng, spec)
    return SegmentationSample(normalize(rgb, spec)[0], mask)


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, tone and white-balance jitter on a small fitted crop: cameras differ in all three,
    and a model trained on synthetic colours must not depend on them."""
    gains = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.2)
    toned = (rgb.astype(np.float32) / 255.0) ** rng.uniform(0.8, 1.25)
    return np.clip(toned * gains * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _with_channels(spec: InputSpec, n: int) -> InputSpec:
    """The same geometry for n bands (used to carry a mask through the very same resize)."""
    return spec.model_copy(update={"channels": tuple(f"c{i}" for i in range(n)), "mean": (0.0,) * n,
                                   "std": (1.0,) * n})  # fmt: skip
