"""The decision rules: every threshold a decision uses, read once from the manifests (and a few product
settings), and the pure functions that turn stage outputs into recapture reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from service.inference.manifest import Manifest
from service.inference.runtime import ModelConfigurationError, ModelSet
from service.pipeline import measures
from service.render.reasons import Reason
from service.render.schemas import BlurKind, StageName
from service.settings import Settings

if TYPE_CHECKING:
    from service.pipeline.stages import Box, Quality

ACETIC = "acetic"  # the stage a diagnosis needs: acetowhitening shows only after acetic acid
EDGE_TOLERANCE = 0.02  # a box within 2 % of the frame's size from an edge touches it


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
    # A cervix photo is also typical: the detector's cervix_distance at most this (None: not checked).
    cervix_distance: float | None = None
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
        min_crop_px = _min_crop_px(models.quality.manifest, settings.min_cervix_crop_px)
        focus_key = focus_threshold(settings)
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
            cervix_distance=_max_cervix_distance(models.detector.manifest, settings),
            stage_labels=_labels(models.quality.manifest, "stage_logits", get_args(StageName), ACETIC),
            blur_labels=_labels(models.quality.manifest, "blur_kind_logits", get_args(BlurKind)),
        )


def focus_threshold(settings: Settings) -> str:
    """The quality manifest's threshold that means "not sharp" at the configured operating point."""
    return "not_sharp_balanced" if settings.focus_operating_point == "balanced" else "not_sharp"


def _labels(manifest: Manifest, output: str, allowed: tuple[str, ...], *required: str) -> tuple[str, ...]:
    """An output's class names, checked once at start-up: one per logit, all in the response schema's
    vocabulary, the ones the rules need present; otherwise every request would fail on them."""
    labels = tuple(manifest.labels.get(output, ()))
    shape = next((spec.shape for spec in manifest.outputs if spec.name == output), ())
    width = shape[-1] if shape else None
    unknown = sorted(set(labels) - set(allowed))
    missing = [label for label in required if label not in labels]
    if not labels or unknown or missing or (isinstance(width, int) and width != len(labels)):
        raise ModelConfigurationError(
            f"the {manifest.name} manifest's labels for {output} are {list(labels)} for an output of shape "
            f"{list(shape)}: the service needs one label per logit, each one of {list(allowed)}"
            + (f", including {missing}" if missing else "")
            + f"; re-export it with `python -m training export {manifest.name}`"
        )
    return labels


def _max_cervix_distance(detector: Manifest, settings: Settings) -> float | None:
    """The typicality threshold, when the detector has one (2.2.0 on) and the gate is on; a threshold
    without the output it applies to is a broken export, refused at start-up."""
    threshold = detector.thresholds.get("cervix_distance")
    if threshold is None or not settings.cervix_typicality_gate:
        return None
    if "cervix_distance" not in {output.name for output in detector.outputs}:
        raise ModelConfigurationError(
            "the detector manifest has a cervix_distance threshold but no cervix_distance output: "
            "re-export it with `python -m training export detector`"
        )
    return threshold


def _min_crop_px(quality: Manifest, configured: int | None) -> int:
    """The smallest cervix (original pixels) to judge: the quality model's own floor unless configured,
    and never below that floor, under which focus would be judged on crops upsampled past training's."""
    floor = quality.extra.get("min_cervix_px")
    if not isinstance(floor, int) or floor < 1:
        raise ModelConfigurationError(
            "the quality manifest has no extra.min_cervix_px (the smallest cervix it can judge): "
            "re-export it with `python -m training export quality`"
        )
    if configured is not None and configured < floor:
        raise ModelConfigurationError(
            f"CERVIGATE_MIN_CERVIX_CROP_PX={configured} is below {floor}, the smallest cervix quality "
            f"{quality.version} was trained to judge: unset it or set it to {floor} or more"
        )
    return configured or floor


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
    tolerance = EDGE_TOLERANCE * size
    touches_low, touches_high = low <= tolerance, high >= size - tolerance
    return touches_low != touches_high and (high - low) < rules.cut_off_max_extent * size


def quality_reasons(quality: Quality, rules: Rules, *, expect_acetic: bool = True) -> set[Reason]:
    """Recapture reasons from the crop's quality; `not_acetic` only where acetic acid is expected."""
    reasons = set()
    if quality.exposure == "dark":
        reasons.add(Reason.TOO_DARK)
    elif quality.exposure == "over":
        reasons.add(Reason.OVEREXPOSED)
    if quality.glare_fraction > rules.glare_max:
        reasons.add(Reason.GLARE)
    if quality.not_sharp:
        reasons.add(Reason.MOTION_BLUR if quality.blur_kind == "motion" else Reason.OUT_OF_FOCUS)
    if expect_acetic and quality.p_acetic < rules.not_acetic:
        reasons.add(Reason.NOT_ACETIC)
    return reasons


def shown_stage(p_acetic: float, likeliest_other_stage: str, rules: Rules) -> str:
    """The stage the quality model sees: acetic acid unless it would flag `not_acetic`, else the likeliest
    other stage. The same threshold as the single-photo rule, so the two never disagree: the plain argmax
    could call an accepted acetic-acid photo "green" (P(acetic) 0.4 above a 0.31 threshold, green 0.45)."""
    return ACETIC if p_acetic >= rules.not_acetic else likeliest_other_stage
