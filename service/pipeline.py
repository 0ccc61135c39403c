"""The assessment pipeline: decode -> detect -> crop -> quality checks -> segment -> classify.

Each stage is a method with a named, typed output; `Pipeline.assess` is the one place they are composed
and the one place that decides "recapture" or "diagnosis". Every stage reads its preprocessing and
thresholds from its model's manifest, so the service does exactly what was measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import numpy as np

from service import measures
from service.decoding import DecodedImage, DecodeLimits, decode_upload
from service.manifest import InputSpec
from service.preprocess import crop_box, fit, normalize, prepare
from service.reasons import Reason, ordered
from service.runtime import ModelConfigurationError, ModelSet
from service.settings import Settings
from service.spare import NO_SPARE_CORES, SpareCores
from service.voting import variant_batch, voting_variants, weighted_vote

T = TypeVar("T")
Box = tuple[float, float, float, float]
Region = tuple[int, int, int, int]
Variants = dict[str, tuple[np.ndarray, np.ndarray]]  # voting variant name -> (RGB, lesion channel)
STAGES = ("decode", "detect", "quality", "segment", "classify")
_EDGE_TOLERANCE = 0.02  # a box within 2 % of the frame's size from an edge touches it


@dataclass(frozen=True)
class Detection:
    found: bool
    score: float
    box: Box | None  # x0, y0, x1, y1 in pixels of the upright original image


@dataclass(frozen=True)
class Quality:
    sharpness: float  # P(sharp), 0..1
    not_sharp: bool
    blur_kind: str  # none | defocus | motion (argmax of the blur-kind head)
    exposure: str  # ok | dark | over
    luma: float
    glare_fraction: float
    exam_stage: str
    p_acetic: float


@dataclass(frozen=True)
class Lesion:
    area_fraction: float  # of the cervix region
    probability: np.ndarray  # HxW uint8 (P x 255) over the cervix region, at the segmenter's resolution
    fitted_rgb: np.ndarray  # the letterboxed crop both the segmenter and the severity model saw
    lesion_channel: np.ndarray  # HxW uint8 (P x 255), aligned with fitted_rgb (padding included)


@dataclass(frozen=True)
class Diagnosis:
    probability: float  # P(CIN2+), weighted vote over the manifest's variants
    referral: bool

    @property
    def label(self) -> Literal["cin2plus", "negative_or_cin1"]:
        return "cin2plus" if self.referral else "negative_or_cin1"


@dataclass
class Assessment:
    reasons: list[Reason]
    image_size: tuple[int, int]
    detection: Detection
    region: Region | None = None
    crop_rgb: np.ndarray | None = field(default=None, repr=False)
    quality: Quality | None = None
    lesion: Lesion | None = None
    diagnosis: Diagnosis | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def decision(self) -> Literal["recapture", "diagnosis", "accept"]:
        if self.reasons:
            return "recapture"
        return "diagnosis" if self.diagnosis is not None else "accept"


@dataclass(frozen=True)
class Rules:
    """Every threshold a decision uses, read once from the manifests (and the few product settings)."""

    cervix_present: float
    not_sharp: float
    not_acetic: float
    exposure: measures.ExposureRule
    glare_max: float
    lesion: float
    cin2plus: float
    crop_margin: float
    min_area_fraction: float
    min_crop_px: int
    cut_off_max_extent: float
    stage_labels: tuple[str, ...] = ("acetic", "saline", "iodine", "green")
    blur_labels: tuple[str, ...] = ("none", "defocus", "motion")

    @classmethod
    def from_models(cls, models: ModelSet, settings: Settings) -> Rules:
        quality = models.quality.manifest.thresholds
        measured_over = models.quality.manifest.extra.get("exposure_measure")
        if not isinstance(measured_over, dict):
            raise ModelConfigurationError(
                "the quality manifest has no extra.exposure_measure (tissue ellipse, saturation level): "
                "re-export it with `python -m training export quality`"
            )
        min_crop_px = settings.min_cervix_crop_px or models.quality.manifest.extra.get("min_cervix_px")
        if not isinstance(min_crop_px, int):
            raise ModelConfigurationError(
                "the quality manifest has no extra.min_cervix_px (the smallest cervix it can judge): "
                "re-export it with `python -m training export quality`, or set CERVIGATE_MIN_CERVIX_CROP_PX"
            )
        focus_key = "not_sharp_balanced" if settings.focus_operating_point == "balanced" else "not_sharp"
        return cls(
            cervix_present=models.detector.manifest.thresholds["cervix_present"],
            not_sharp=quality[focus_key],
            not_acetic=quality["not_acetic"],
            exposure=measures.ExposureRule(
                dark_max=quality["dark_max"],
                over_min=quality["over_min"],
                white_luma=quality["white_luma"],
                over_white_max=quality["over_white_max"],
                saturated_level=int(measured_over["saturated_level"]),
                tissue_semi_axes=tuple(measured_over["tissue_semi_axes"]),
            ),
            glare_max=quality["glare_max"],
            lesion=models.segmenter.manifest.thresholds["lesion"],
            cin2plus=models.severity.manifest.thresholds["cin2plus"],
            crop_margin=float(models.quality.manifest.extra["crop_margin"]),  # type: ignore[arg-type]
            min_area_fraction=settings.min_cervix_area_fraction,
            min_crop_px=min_crop_px,
            cut_off_max_extent=settings.cut_off_max_extent,
            stage_labels=tuple(models.quality.manifest.labels["stage_logits"]),
            blur_labels=tuple(models.quality.manifest.labels["blur_kind_logits"]),
        )


class Pipeline:
    def __init__(self, models: ModelSet, settings: Settings, spare: SpareCores = NO_SPARE_CORES) -> None:
        self.models = models
        self.spare = spare
        self.rules = Rules.from_models(models, settings)
        self.limits = DecodeLimits(settings.max_pixels, settings.min_image_side, settings.decode_min_side)
        voting = models.severity.manifest.extra.get("voting")
        if not isinstance(voting, dict):
            raise ModelConfigurationError("the severity manifest has no extra.voting mapping: re-export it")
        self.voting_order: list[str] = list(voting["order"])
        self.voting_weights: dict[str, float] = dict(voting["weights"])
        self.voting_brightness: dict[str, float] = dict(voting["brightness"])

    # --- the composition -------------------------------------------------------------------------

    def assess(self, data: bytes, *, diagnose: bool) -> Assessment:
        """The whole chain for one upload; stops at the first stage that asks for a recapture.

        `diagnose=False` is the preview gate: detect, crop and quality checks only.
        Raises `service.decoding.UploadRejected` for uploads that are not a usable image.
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with _timed(timings, "decode"):
            image = decode_upload(data, self.limits)
        with _timed(timings, "detect"):
            detection = self.detect(image)
        result = Assessment(
            reasons=[], image_size=image.original_size, detection=detection, timings_ms=timings
        )
        if detection.box is None:
            result.reasons = [self.unseen_cervix_reason(image.rgb)]
            return _finish(result, started)
        result.region = self.region(detection.box, image.original_size)
        result.reasons = framing_reasons(detection.box, image.original_size, self.rules)
        with _timed(timings, "decode"):  # a full-resolution re-decode, when the crop needs one, is decoding
            result.crop_rgb = image.region(result.region, self.models.quality.manifest.input.width)
        crop_rgb = result.crop_rgb
        # Segmentation does not depend on the quality verdict: on an idle core it runs alongside the quality
        # model, and a recapture simply drops its result. A framing problem already means recapture.
        early_segment = None
        if diagnose and not result.reasons:
            early_segment = self.spare.try_submit(lambda: _timed_call(self.segment, crop_rgb))
        with _timed(timings, "quality"):
            result.quality = self.check_quality(crop_rgb)
        result.reasons = ordered(set(result.reasons) | quality_reasons(result.quality, self.rules))
        if result.reasons or not diagnose:
            return _finish(result, started)
        if early_segment is not None:
            result.lesion, timings["segment"] = early_segment.result()
        else:
            with _timed(timings, "segment"):
                result.lesion = self.segment(crop_rgb)
        with _timed(timings, "classify"):
            result.diagnosis = self.classify(result.lesion)
        return _finish(result, started)

    # --- stages ------------------------------------------------------------------------------------

    def detect(self, image: DecodedImage) -> Detection:
        return detect_cervix(self.models.detector, image, self.rules.cervix_present)

    def unseen_cervix_reason(self, rgb: np.ndarray) -> Reason:
        """Why no cervix was found: a photo too dark or too bright to show one is a lighting problem,
        and the advice must say so rather than ask to aim the camera."""
        exposure, _ = measures.measure_exposure(rgb, self.rules.exposure)
        return {"dark": Reason.TOO_DARK, "over": Reason.OVEREXPOSED}.get(exposure, Reason.NO_CERVIX)

    def region(self, box: Box, size: tuple[int, int]) -> Region:
        """The cervix crop the crop-level models see, in original pixels (as in training)."""
        return crop_box(box, size[0], size[1], self.rules.crop_margin)

    def check_quality(self, crop_rgb: np.ndarray) -> Quality:
        return check_quality(self.models.quality, crop_rgb, self.rules)

    def segment(self, crop_rgb: np.ndarray) -> Lesion:
        model = self.models.segmenter
        spec = model.manifest.input
        fitted, placement = fit(crop_rgb, spec)
        logits = model.run(normalize(fitted, spec))["lesion_logits"][0, 0]
        channel = np.round(_sigmoid(logits) * 255.0).astype(np.uint8)  # exactly as the severity model trained
        # The crop's own pixels inside the letterbox: area and mask exclude the padding.
        left, top, right, bottom = placement.interior(crop_rgb.shape[1], crop_rgb.shape[0])
        inside = channel[top:bottom, left:right]
        threshold = self.rules.lesion * 255.0
        return Lesion(
            area_fraction=float(np.mean(inside >= threshold)),
            probability=inside,
            fitted_rgb=fitted,
            lesion_channel=channel,
        )

    def classify(self, lesion: Lesion) -> Diagnosis:
        variants = voting_variants(lesion.fitted_rgb, lesion.lesion_channel, self.voting_brightness)
        half = len(self.voting_order) // 2
        first, second = self.voting_order[:half], self.voting_order[half:]
        other_half = self.spare.try_submit(lambda: self._variant_logits(variants, second))
        if other_half is None:
            logits = self._variant_logits(variants, self.voting_order)
        else:  # two half batches on two cores
            logits = np.concatenate([self._variant_logits(variants, first), other_half.result()])
        by_variant = dict(zip(self.voting_order, _sigmoid(logits).tolist(), strict=True))
        probability = weighted_vote(by_variant, self.voting_weights)
        return Diagnosis(probability=probability, referral=probability >= self.rules.cin2plus)

    def _variant_logits(self, variants: Variants, order: list[str]) -> np.ndarray:
        model = self.models.severity
        return model.run(variant_batch(variants, order, model.manifest.input))["cin2plus_logit"][:, 0]


# --- stages as functions of a model: the pipeline composes them, and training measures its fold models
# with the very same code (any object with the model's input spec and a `run` will do) ---------------------


class _HasInput(Protocol):
    @property
    def input(self) -> InputSpec: ...


class RunsModel(Protocol):
    """What a stage needs of a model: its manifest's input spec and outputs by name for a prepared tensor."""

    @property
    def manifest(self) -> _HasInput: ...

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]: ...


def detect_cervix(model: RunsModel, image: DecodedImage, threshold: float) -> Detection:
    """The detector on the whole decoded photo; the box in pixels of the upright original."""
    tensor, placement = prepare(image.rgb, model.manifest.input)
    outputs = model.run(tensor)
    score = float(_sigmoid(outputs["cervix_logit"][0, 0]))
    if score < threshold:
        return Detection(found=False, score=score, box=None)
    spec = model.manifest.input
    cx, cy, w, h = (float(v) for v in outputs["box"][0])
    in_input = ((cx - w / 2) * spec.width, (cy - h / 2) * spec.height,
                (cx + w / 2) * spec.width, (cy + h / 2) * spec.height)  # fmt: skip
    x0, y0, x1, y1 = (v / image.scale for v in placement.to_source(in_input))
    width, height = image.original_size
    box = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:  # a degenerate box is no cervix to crop
        return Detection(found=False, score=score, box=None)
    return Detection(found=True, score=score, box=box)


def check_quality(model: RunsModel, crop_rgb: np.ndarray, rules: Rules) -> Quality:
    """The quality model and the exposure and glare measures on the cervix crop."""
    tensor, _ = prepare(crop_rgb, model.manifest.input)
    outputs = model.run(tensor)
    sharpness = float(_sigmoid(outputs["sharp_logit"][0, 0]))
    stage_p = _softmax(outputs["stage_logits"][0])
    tissue = measures.measure_tissue(crop_rgb, rules.exposure)
    return Quality(
        sharpness=sharpness,
        not_sharp=(1.0 - sharpness) >= rules.not_sharp,
        blur_kind=rules.blur_labels[int(np.argmax(outputs["blur_kind_logits"][0]))],
        exposure=tissue.exposure,
        luma=tissue.luma,
        glare_fraction=tissue.glare_fraction,
        exam_stage=rules.stage_labels[int(np.argmax(stage_p))],
        p_acetic=float(stage_p[rules.stage_labels.index("acetic")]),
    )


# --- decision rules: pure functions of model outputs and thresholds -------------------------------------


def framing_reasons(box: Box, size: tuple[int, int], rules: Rules) -> list[Reason]:
    width, height = size
    x0, y0, x1, y1 = box
    reasons = []
    if _cut_off(x0, x1, width, rules) or _cut_off(y0, y1, height, rules):
        reasons.append(Reason.CERVIX_CUT_OFF)
    too_small_area = (x1 - x0) * (y1 - y0) < rules.min_area_fraction * width * height
    if too_small_area or min(x1 - x0, y1 - y0) < rules.min_crop_px:
        reasons.append(Reason.CERVIX_TOO_SMALL)
    return reasons


def _cut_off(low: float, high: float, size: int, rules: Rules) -> bool:
    """The cervix runs into one edge of the frame but not the opposite one, and is short along that
    axis: the frame cut it. A cervix touching both edges (filling the frame) is close-up, not cut."""
    tolerance = _EDGE_TOLERANCE * size
    touches_low, touches_high = low <= tolerance, high >= size - tolerance
    return touches_low != touches_high and (high - low) < rules.cut_off_max_extent * size


def quality_reasons(quality: Quality, rules: Rules) -> set[Reason]:
    reasons = set()
    if quality.exposure == "dark":
        reasons.add(Reason.TOO_DARK)
    elif quality.exposure == "over":
        reasons.add(Reason.OVEREXPOSED)
    if quality.glare_fraction > rules.glare_max:
        reasons.add(Reason.GLARE)
    if quality.not_sharp:
        reasons.add(Reason.MOTION_BLUR if quality.blur_kind == "motion" else Reason.OUT_OF_FOCUS)
    if quality.p_acetic < rules.not_acetic:
        reasons.add(Reason.NOT_ACETIC)
    return reasons


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - started) * 1000.0


def _timed_call(stage: Callable[[np.ndarray], T], argument: np.ndarray) -> tuple[T, float]:
    """A stage's result and its duration in ms, for stages that run on another thread."""
    started = time.perf_counter()
    return stage(argument), (time.perf_counter() - started) * 1000.0


def _finish(result: Assessment, started: float) -> Assessment:
    result.timings_ms["total"] = (time.perf_counter() - started) * 1000.0
    return result


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
