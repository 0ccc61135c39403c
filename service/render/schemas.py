"""The public response contract (OpenAPI is generated from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.render.reasons import Reason


class ReasonOut(BaseModel):
    code: Reason = Field(description="stable machine-readable reason; see README for the vocabulary")
    message: str = Field(description="what is wrong, in the negotiated language")


class CervixOut(BaseModel):
    found: bool
    score: float = Field(ge=0, le=1, description="detector P(cervix in the photo)")
    box: list[int] | None = Field(
        default=None, description="x0, y0, x1, y1 in pixels of the upright original image"
    )


class QualityOut(BaseModel):
    sharpness: float = Field(ge=0, le=1, description="P(sharp enough to assess) of the cervix crop")
    blur_kind: Literal["none", "defocus", "motion"] = Field(
        description="most likely blur kind; weak on real photos (see the quality model card)"
    )
    exposure: Literal["ok", "dark", "over"]
    glare_fraction: float = Field(ge=0, le=1, description="clipped-white share of the central tissue")
    exam_stage: Literal["acetic", "saline", "iodine", "green"]


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
        ge=0, le=1, description="P(CIN2+), test-time voting over the manifest's variants"
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
    "cervix": {"found": True, "score": 0.98, "box": [212, 140, 598, 470]},
    "quality": {
        "sharpness": 0.12,
        "blur_kind": "defocus",
        "exposure": "ok",
        "glare_fraction": 0.03,
        "exam_stage": "acetic",
    },
    "lesion": None,
    "diagnosis": None,
    "models": {"detector": "1.0.0", "quality": "1.1.1", "segmenter": "1.0.0", "severity": "1.0.0"},
    "timings_ms": {"decode": 3.1, "detect": 2.6, "quality": 6.0, "total": 12.2},
}
