"""The assessment pipeline: decode -> detect -> crop -> quality checks -> segment -> classify.

`classify` measures the acetic-acid photo (the severity ONNX model: Swede-style measures) and scores it as a
one-photo exam with the case model (`service.pipeline.case_risk`); an exam's saline and iodine photos are
measured too (`measure_unstained`), so `service.pipeline.exams` can score the patient from all of them.

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

from service.inference.manifest import InputSpec
from service.inference.preprocess import crop_box, fit, normalize, prepare
from service.inference.runtime import ModelConfigurationError, ModelSet
from service.io.decoding import DecodedImage, DecodeLimits, decode_upload
from service.io.dicom import decode_dicom, is_dicom
from service.pipeline import measures
from service.pipeline.case_risk import IODINE, SALINE, CaseModel
from service.pipeline.rules import ACETIC, Rules, framing_reasons, quality_reasons, shown_stage
from service.pipeline.spare import NO_SPARE_CORES, SpareCores
from service.render.reasons import Reason, ordered
from service.settings import Settings

T = TypeVar("T")
Box = tuple[float, float, float, float]
Region = tuple[int, int, int, int]
STAGES = ("decode", "detect", "quality", "segment", "classify")


@dataclass(frozen=True)
class Detection:
    found: bool
    score: float
    box: Box | None  # x0, y0, x1, y1 in pixels of the upright original image
    distance: float | None = None  # to the cervix training photos; None: the model has no such output


@dataclass(frozen=True)
class Quality:
    sharpness: float  # P(sharp), 0..1
    not_sharp: bool
    blur_kind: str  # none | defocus | motion (argmax of the blur-kind head)
    exposure: str  # ok | dark | over
    luma: float
    glare_fraction: float
    exam_stage: str  # rules.shown_stage: acetic unless not_acetic flags it, else the likeliest other stage
    p_acetic: float
    likeliest_other_stage: str  # the likeliest stage other than acetic acid


@dataclass(frozen=True)
class Lesion:
    area_fraction: float  # of the cervix region
    probability: np.ndarray  # HxW uint8 (P x 255) over the cervix region, at the segmenter's resolution
    fitted_rgb: np.ndarray  # the letterboxed crop both the segmenter and the severity model saw
    lesion_channel: np.ndarray  # HxW uint8 (P x 255), aligned with fitted_rgb (padding included)


@dataclass(frozen=True)
class Diagnosis:
    probability: float  # P(CIN2+) of this photo as a one-photo exam (the case model, other stages imputed)
    referral: bool

    @property
    def label(self) -> Literal["cin2plus", "negative_or_cin1"]:
        return "cin2plus" if self.referral else "negative_or_cin1"


@dataclass
class Assessment:
    reasons: list[Reason]
    image_size: tuple[int, int]
    detection: Detection
    media_type: str = ""  # what the upload turned out to be (image/jpeg, application/dicom...)
    region: Region | None = None
    crop_rgb: np.ndarray | None = field(default=None, repr=False)
    quality: Quality | None = None
    stage: str | None = None  # the stage the photo was judged as (asked for, or the quality model's)
    lesion: Lesion | None = None
    # The severity model's per-photo measures (case_risk.PHOTO_MEASURES): acetic-acid photos that reached a
    # diagnosis, and an exam's usable saline and iodine photos; what the exam pools per stage.
    measures: np.ndarray | None = field(default=None, repr=False)
    diagnosis: Diagnosis | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def decision(self) -> Literal["recapture", "diagnosis", "accept"]:
        if self.reasons:
            return "recapture"
        return "diagnosis" if self.diagnosis is not None else "accept"


class Pipeline:
    def __init__(self, models: ModelSet, settings: Settings, spare: SpareCores = NO_SPARE_CORES) -> None:
        self.models = models
        self.spare = spare
        self.rules = Rules.from_models(models, settings)
        self.limits = DecodeLimits(settings.max_pixels, settings.min_image_side, settings.decode_min_side)
        try:
            self.case_model = CaseModel.from_extra(models.severity.manifest.extra)
        except ValueError as error:
            raise ModelConfigurationError(str(error)) from error

    # --- the composition -------------------------------------------------------------------------

    def assess(self, data: bytes, *, diagnose: bool, stage: str | None = ACETIC) -> Assessment:
        """The whole chain for one upload; stops at the first stage that asks for a recapture.

        `diagnose=False` is the preview gate: detect, crop and quality checks only.
        `stage` is the exam stage the photo should show. Acetic acid (the single-photo endpoints): a photo
        that does not look it is retaken (`not_acetic`). Another stage (an exam's saline, iodine or
        green-filter view): framing and quality are checked, and it is never diagnosed. None (an exam photo
        sent without a hint): the quality model's stage decides which of the two it is.
        Raises `service.io.decoding.UploadRejected` for uploads that are not a usable image.
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with _timed(timings, "decode"):
            image = decode_dicom(data, self.limits) if is_dicom(data) else decode_upload(data, self.limits)
        with _timed(timings, "detect"):
            detection = self.detect(image)
        result = Assessment(
            reasons=[],
            image_size=image.original_size,
            detection=detection,
            media_type=image.media_type,
            timings_ms=timings,
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
        if diagnose and not result.reasons and stage in (ACETIC, None):
            early_segment = self.spare.try_submit(lambda: _timed_call(self.segment, crop_rgb))
        with _timed(timings, "quality"):
            result.quality = self.check_quality(crop_rgb)
        result.stage = stage or result.quality.exam_stage
        found = quality_reasons(result.quality, self.rules, expect_acetic=stage == ACETIC)
        result.reasons = ordered(set(result.reasons) | found)
        if not result.reasons and diagnose and result.stage in (SALINE, IODINE):
            # The exam's case features read these stages' colours (whitening, iodine non-uptake).
            with _timed(timings, "classify"):
                result.measures = self.measure_unstained(crop_rgb)
        if result.reasons or not diagnose or result.stage != ACETIC:
            return _finish(result, started)
        if early_segment is not None:
            result.lesion, timings["segment"] = early_segment.result()
        else:
            with _timed(timings, "segment"):
                result.lesion = self.segment(crop_rgb)
        with _timed(timings, "classify"):
            result.measures = self.measure(result.lesion.fitted_rgb, result.lesion.lesion_channel)
            result.diagnosis = self.classify(result.measures)
        return _finish(result, started)

    # --- stages ------------------------------------------------------------------------------------

    def detect(self, image: DecodedImage) -> Detection:
        return detect_cervix(
            self.models.detector, image, self.rules.cervix_present, self.rules.cervix_distance
        )

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

    def measure(self, fitted_rgb: np.ndarray, lesion_channel: np.ndarray) -> np.ndarray:
        """The severity model's measures of one letterboxed crop and its lesion channel (nan: undefined)."""
        model = self.models.severity
        tensor = normalize(np.dstack([fitted_rgb, lesion_channel]), model.manifest.input)
        return np.asarray(model.run(tensor)["measures"][0], dtype=np.float64)

    def measure_unstained(self, crop_rgb: np.ndarray) -> np.ndarray:
        """Measures of a saline or iodine photo. Its features (whiteness, iodine non-uptake) do not read the
        lesion channel, so the segmenter is not run and the channel is left empty."""
        fitted, _ = fit(crop_rgb, self.models.severity.manifest.input)
        return self.measure(fitted, np.zeros(fitted.shape[:2], np.uint8))

    def classify(self, photo_measures: np.ndarray) -> Diagnosis:
        """An acetic-acid photo on its own: a one-photo exam (saline and iodine features imputed)."""
        probability = self.case_model.probability({ACETIC: [photo_measures]})
        return Diagnosis(probability=probability, referral=probability >= self.rules.cin2plus)


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


def detect_cervix(
    model: RunsModel, image: DecodedImage, threshold: float, max_distance: float | None = None
) -> Detection:
    """The detector on the whole decoded photo; the box in pixels of the upright original. With
    `max_distance`, a photo further than that from every cervix photo the model learned from is no cervix
    photo whatever its score (the presence head only knows the negatives it was shown)."""
    tensor, placement = prepare(image.rgb, model.manifest.input)
    outputs = model.run(tensor)
    score = float(_sigmoid(outputs["cervix_logit"][0, 0]))
    distance = float(outputs["cervix_distance"][0, 0]) if "cervix_distance" in outputs else None
    atypical = max_distance is not None and (distance is None or distance > max_distance)
    if score < threshold or atypical:
        return Detection(found=False, score=score, box=None, distance=distance)
    spec = model.manifest.input
    cx, cy, w, h = (float(v) for v in outputs["box"][0])
    in_input = ((cx - w / 2) * spec.width, (cy - h / 2) * spec.height,
                (cx + w / 2) * spec.width, (cy + h / 2) * spec.height)  # fmt: skip
    x0, y0, x1, y1 = (v / image.scale for v in placement.to_source(in_input))
    width, height = image.original_size
    box = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:  # a degenerate box is no cervix to crop
        return Detection(found=False, score=score, box=None, distance=distance)
    return Detection(found=True, score=score, box=box, distance=distance)


def check_quality(model: RunsModel, crop_rgb: np.ndarray, rules: Rules) -> Quality:
    """The quality model and the exposure and glare measures on the cervix crop."""
    tensor, _ = prepare(crop_rgb, model.manifest.input)
    outputs = model.run(tensor)
    sharpness = float(_sigmoid(outputs["sharp_logit"][0, 0]))
    stage_p = _softmax(outputs["stage_logits"][0])
    acetic = rules.stage_labels.index(ACETIC)
    other = rules.stage_labels[int(np.argmax(_without(stage_p, acetic)))]
    tissue = measures.measure_tissue(crop_rgb, rules.exposure)
    return Quality(
        sharpness=sharpness,
        not_sharp=(1.0 - sharpness) >= rules.not_sharp,
        blur_kind=rules.blur_labels[int(np.argmax(outputs["blur_kind_logits"][0]))],
        exposure=tissue.exposure,
        luma=tissue.luma,
        glare_fraction=tissue.glare_fraction,
        exam_stage=shown_stage(float(stage_p[acetic]), other, rules),
        p_acetic=float(stage_p[acetic]),
        likeliest_other_stage=other,
    )


def _without(probabilities: np.ndarray, index: int) -> np.ndarray:
    """The probabilities with one class ruled out, for an argmax over the others."""
    others = probabilities.copy()
    others[index] = -1.0
    return others


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
