"""The public response contract (OpenAPI is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.render.reasons import Reason

StageName = Literal["acetic", "saline", "iodine", "green"]
BlurKind = Literal["none", "defocus", "motion"]


class ReasonOut(BaseModel):
    code: Reason = Field(description="stable machine-readable reason; see README for the vocabulary")
    message: str = Field(description="what is wrong, in the negotiated language")


class CervixOut(BaseModel):
    found: bool
    score: float = Field(ge=0, le=1, description="detector P(cervix in the photo)")
    box: list[int] | None = Field(
        default=None, description="x0, y0, x1, y1 in pixels of the upright original image"
    )
    distance: float | None = Field(
        default=None,
        ge=0,
        le=2,
        description="how unlike the photo is to every cervix photo the detector learned from (1 - cosine "
        "similarity of its features); above the detector's cervix_distance threshold the photo is no "
        "cervix photo whatever its score. Null with a detector that has no such output",
    )


class QualityOut(BaseModel):
    sharpness: float = Field(ge=0, le=1, description="P(sharp enough to assess) of the cervix crop")
    blur_kind: BlurKind = Field(
        description="most likely blur kind; weak on real photos (see the quality model card)"
    )
    exposure: Literal["ok", "dark", "over"]
    glare_fraction: float = Field(ge=0, le=1, description="clipped-white share of the central tissue")
    exam_stage: StageName = Field(
        description="the exam stage the quality model sees: acetic unless its not_acetic rule flags the "
        "photo, else the likeliest other stage (so an accepted photo is always acetic)"
    )


class LesionOut(BaseModel):
    area_fraction: float = Field(ge=0, le=1, description="share of the cervix region marked acetowhite")
    region: list[int] = Field(
        description="x0, y0, x1, y1 of the cervix region the lesion map covers (original pixels)"
    )
    mask_png: str | None = Field(
        default=None,
        description="base64 8-bit PNG over `region` at model resolution; 255 = lesion (include=mask)",
    )
    overlay_jpeg: str | None = Field(
        default=None, description="base64 JPEG of the cervix region with the lesion tinted (include=overlay)"
    )


class DiagnosisOut(BaseModel):
    label: Literal["cin2plus", "negative_or_cin1"]
    probability: float = Field(
        ge=0,
        le=1,
        description="P(CIN2+) of this photo as a one-photo exam (saline and iodine features "
        "imputed); not shown to beat chance on held-out atlas cases (README: Models)",
    )
    referral: bool = Field(description="probability at or above the severity model's referral threshold")


class AssessmentOut(BaseModel):
    id: str = Field(description="request id, also in the X-Request-ID header and the logs")
    decision: Literal["recapture", "diagnosis", "accept"] = Field(
        description="recapture: take the photo again; diagnosis: the /v1/assess result; "
        "accept: the /v1/quality gate passed"
    )
    reasons: list[ReasonOut] = Field(description="empty unless decision is recapture; most important first")
    advice: str | None = Field(description="one sentence for the health worker, for the first reason")
    cervix: CervixOut
    quality: QualityOut | None
    lesion: LesionOut | None
    diagnosis: DiagnosisOut | None
    models: dict[str, str] = Field(description="model name -> version used")
    timings_ms: dict[str, float] = Field(description="per stage and total, server side")


class PartProblemOut(BaseModel):
    """Why one photo of an exam was not assessed: the problem+json fields a single-photo request would get."""

    status: int
    code: str = Field(description="stable problem code, as in the single-photo endpoints")
    title: str
    detail: str


class ExamPhotoOut(BaseModel):
    index: int = Field(ge=0, description="position of the photo in the request, from 0")
    stage: StageName | None = Field(
        description="the stage the photo was judged as; null when it was not assessed"
    )
    stage_source: Literal["hint", "model"] = Field(
        description="hint: the stage sent in `stages`; model: the quality model's"
    )
    assessment: AssessmentOut | None = Field(description="the single-photo assessment; null on a problem")
    problem: PartProblemOut | None = Field(description="why this photo was not assessed")


class RetakeOut(BaseModel):
    index: int = Field(ge=0)
    reasons: list[ReasonOut] = Field(description="the photo's recapture reasons; empty when it had a problem")
    problem: str | None = Field(description="the photo's problem code, when it could not be assessed")
    advice: str = Field(description="one sentence for the health worker")


class ExamDiagnosisOut(BaseModel):
    label: Literal["cin2plus", "negative_or_cin1"]
    probability: float = Field(ge=0, le=1, description="the exam's P(CIN2+), made as `method` says")
    referral: bool = Field(description="probability at or above the severity model's referral threshold")
    method: str = Field(description="how the photos were combined (README: Exams)")
    photos_used: list[int] = Field(
        description="indices of the photos the probability comes from: usable acetic-acid, saline and iodine"
    )


class ExamOut(BaseModel):
    id: str = Field(description="request id; photo i's assessment has id `<id>/<i>`")
    decision: Literal["recapture", "diagnosis"] = Field(
        description="diagnosis: at least one usable acetic-acid photo; recapture: retake what `retake` lists"
    )
    reasons: list[ReasonOut] = Field(
        description="the exam's own reasons: not_acetic when no photo shows the acetic-acid stage"
    )
    advice: str | None = Field(description="one sentence for the health worker: what to do next")
    photos: list[ExamPhotoOut] = Field(description="one per photo, in request order")
    retake: list[RetakeOut] = Field(description="photos to take again, and why")
    review_index: int | None = Field(
        description="the photo to show a clinician: the sharpest acetic-acid photo the diagnosis used (else "
        "the sharpest usable one)"
    )
    diagnosis: ExamDiagnosisOut | None
    contact_sheet_jpeg: str | None = Field(
        default=None,
        description="base64 JPEG: every photo's cervix crop framed by its verdict (include=contact_sheet)",
    )
    models: dict[str, str] = Field(description="model name -> version used")
    timings_ms: dict[str, float] = Field(description="server side, whole exam")


class ModelOut(BaseModel):
    name: str
    version: str
    sha256: str
    input: dict[str, object]
    thresholds: dict[str, float]
    headline_metrics: dict[str, object] = Field(description="held-out figures, with the split they come from")
    intended_use: str
    limitations: str
    changelog: list[str]


class ModelsOut(BaseModel):
    models: list[ModelOut]


class FhirBundleOut(BaseModel):
    """A FHIR R4 Bundle (type collection): a DiagnosticReport, its Observations and the photo's Media.
    Only the envelope is described here; each resource follows the FHIR R4 specification."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["Bundle"]  # FHIR's own field name
    type: Literal["collection"]
    timestamp: str
    entry: list[dict[str, Any]] = Field(description="fullUrl (urn:uuid) and resource, the report first")


class HealthOut(BaseModel):
    status: Literal["ok", "ready", "not_ready"]


class Problem(BaseModel):
    """RFC 9457 problem details; `code` is the stable field to switch on."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None


EXAMPLE_ASSESSMENT = {
    "id": "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b",
    "decision": "recapture",
    "reasons": [{"code": "out_of_focus", "message": "The cervix is out of focus."}],
    "advice": "Tap the screen on the cervix to focus, hold the phone still, and take the photo again.",
    "cervix": {"found": True, "score": 0.98, "box": [212, 140, 598, 470], "distance": 0.64},
    "quality": {
        "sharpness": 0.12,
        "blur_kind": "defocus",
        "exposure": "ok",
        "glare_fraction": 0.03,
        "exam_stage": "acetic",
    },
    "lesion": None,
    "diagnosis": None,
    "models": {"detector": "2.2.0", "quality": "3.3.0", "segmenter": "2.0.0", "severity": "2.1.0"},
    "timings_ms": {"decode": 3.1, "detect": 2.6, "quality": 6.0, "total": 12.2},
}

EXAMPLE_EXAM = {
    "id": "5f0c6a4e-1c1e-4d0b-9a55-2f3f1e0b7c11",
    "decision": "diagnosis",
    "reasons": [],
    "advice": None,
    "photos": [
        {"index": 0, "stage": "saline", "stage_source": "hint", "assessment": {"...": "as /v1/assess"},
         "problem": None},
        {"index": 1, "stage": "acetic", "stage_source": "hint", "assessment": {"...": "as /v1/assess"},
         "problem": None},
        {"index": 2, "stage": "acetic", "stage_source": "hint", "assessment": {"...": "as /v1/assess"},
         "problem": None},
    ],
    "retake": [
        {"index": 2, "reasons": [{"code": "motion_blur", "message": "The photo is blurred by movement."}],
         "problem": None,
         "advice": "Hold the phone still with both hands or rest it on a support, and take the photo again."},
    ],
    "review_index": 1,
    "diagnosis": {"label": "negative_or_cin1", "probability": 0.12, "referral": False,
                  "method": "logistic_on_stage_means_of_photo_measures", "photos_used": [0, 1]},
    "contact_sheet_jpeg": None,
    "models": {"detector": "2.2.0", "quality": "3.3.0", "segmenter": "2.0.0", "severity": "2.1.0"},
    "timings_ms": {"total": 240.5},
}  # fmt: skip
