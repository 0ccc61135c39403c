"""The routes, thin: `/v1/*` (API keys when configured) hand the request to the service; health, readiness
and metrics stay open (metrics has its own key check). Also the OpenAPI request body and problem responses.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import (
    ExamIncludeDep,
    IncludeDep,
    LanguageDep,
    ServiceDep,
    StageDep,
    require_metrics_key,
)
from service.io.uploads import IMAGE_FIELD, STAGE_HINTS, STAGES_FIELD
from service.render.problems import PROBLEM_MEDIA_TYPE, problem_response
from service.render.schemas import (
    EXAMPLE_ASSESSMENT,
    EXAMPLE_EXAM,
    AssessmentOut,
    ExamOut,
    HealthOut,
    ModelOut,
    ModelsOut,
)

# Per model, the held-out figures /v1/models shows (dotted paths into the manifest's metrics).
HEADLINE_METRICS = {
    "detector": (
        "real_split",
        "real_held_out.as_taken_recall.pooled",
        "real_held_out.as_taken_rejection.pooled",
        "real_held_out.phone_12mp_recall.pooled",
        "real_held_out.rotate90_recall.pooled",
        "decision_consistency.all_transforms",
    ),
    "quality": (
        "real_split",
        "focus_real_held_out.as_taken_not_sharp_balanced.sensitivity.pooled",
        "focus_real_held_out.as_taken_not_sharp_balanced.specificity.pooled",
        "focus_real_held_out.phone_12mp_not_sharp_balanced.sensitivity.pooled",
        "focus_real_held_out.phone_12mp_not_sharp_balanced.specificity.pooled",
        "not_acetic_flagged_real_held_out.as_taken.saline.pooled",
        "not_acetic_flagged_real_held_out.as_taken.acetic.pooled",
        "decision_consistency.all_transforms",
    ),
    "segmenter": (
        "real_split",
        "synthetic_split",
        "synthetic_test.mean_dice_lesion",
        "synthetic_test_pixel_roc_auc",
    ),
    "severity": (
        "shipped.model",
        "measured.roc_auc_pooled",
        "measured.roc_auc_ci.low",
        "measured.roc_auc_ci.high",
        "measured.sensitivity",
        "measured.specificity",
        "deep.roc_auc_pooled",
    ),
}
_IMAGE_BODY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"the photo: multipart field `{IMAGE_FIELD}`, or the raw bytes with an image/* type",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "image/jpeg": _IMAGE_BODY,
            "image/png": _IMAGE_BODY,
            "image/webp": _IMAGE_BODY,
            "image/heic": _IMAGE_BODY,
            "application/octet-stream": _IMAGE_BODY,
        },
    }
}


EXAM_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"one patient's photos: `{IMAGE_FIELD}` repeated (at most CERVIGATE_MAX_EXAM_PHOTOS), "
        f"and optionally `{STAGES_FIELD}`: the stage each photo shows, in order, comma-separated "
        f"({', '.join(STAGE_HINTS)} or auto), e.g. `saline,acetic,acetic,iodine`",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
                        STAGES_FIELD: {"type": "string", "example": "saline,acetic,acetic,iodine"},
                    },
                }
            }
        },
    }
}
UPLOAD_PROBLEMS = (400, 401, 403, 408, 413, 415, 422, 503, 504)


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "empty upload or malformed multipart",
        401: "missing or unknown API key (when keys are configured)",
        403: "a valid key used where it has no right",
        408: "the upload did not arrive in time",
        413: "upload or pixel count over the limit",
        415: "content type or image format not accepted",
        422: "not a usable image, missing field or invalid parameter",
        503: "overloaded (with Retry-After) or not ready",
        504: "no answer within the request deadline",
    }
    schema = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {s: {"description": described[s], "content": {PROBLEM_MEDIA_TYPE: schema}} for s in statuses}


_EXAMPLE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"example": EXAMPLE_ASSESSMENT}}}
}


router = APIRouter()  # open: health, readiness, metrics (metrics has its own key check)
api = APIRouter()  # /v1/*: service.app adds the API-key check when keys are configured


@api.post(
    "/v1/assess",
    summary="Full assessment: recapture (with reasons and advice) or a diagnosis",
    response_model=AssessmentOut,
    responses=_problems(*UPLOAD_PROBLEMS) | _EXAMPLE_RESPONSE,
    openapi_extra=UPLOAD_BODY,
)
async def assess(
    request: Request, service: ServiceDep, language: LanguageDep, include: IncludeDep
) -> Response:
    return await service.handle(request, diagnose=True, language=language, include=include)


@api.post(
    "/v1/quality",
    summary="Fast capture gate for preview frames: detect, crop, quality checks; no diagnosis",
    response_model=AssessmentOut,
    responses=_problems(*UPLOAD_PROBLEMS),
    openapi_extra=UPLOAD_BODY,
)
async def quality(request: Request, service: ServiceDep, language: LanguageDep, stage: StageDep) -> Response:
    return await service.handle(request, diagnose=False, language=language, include=set(), stage=stage)


@api.post(
    "/v1/exams",
    summary="A patient's exam: every photo assessed, what to retake, the photo to review, one P(CIN2+)",
    response_model=ExamOut,
    responses=_problems(400, 401, 403, 408, 413, 415, 422, 503)
    | {200: {"content": {"application/json": {"example": EXAMPLE_EXAM}}}},
    openapi_extra=EXAM_BODY,
)
async def exams(
    request: Request, service: ServiceDep, language: LanguageDep, include: ExamIncludeDep
) -> Response:
    return await service.handle_exam(request, language=language, include=include)


@api.get(
    "/v1/models",
    summary="The loaded models, their thresholds and held-out metrics",
    response_model=ModelsOut,
    responses=_problems(401, 403, 503),
)
async def models(service: ServiceDep) -> ModelsOut:
    return ModelsOut(models=[_model_out(model.manifest) for model in service.pipeline.models])


@router.get("/healthz", summary="Liveness: the process answers", response_model=HealthOut)
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", summary="Readiness: models loaded and warmed up", response_model=HealthOut,
            responses=_problems(503))  # fmt: skip
async def readyz(request: Request) -> Any:
    if request.app.state.draining:
        return problem_response(
            request, 503, "not_ready", "the service is shutting down; send work elsewhere"
        )
    if not request.app.state.ready:
        return problem_response(request, 503, "not_ready", "the models are still loading")
    return HealthOut(status="ready")


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_key)])
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _model_out(manifest: Any) -> ModelOut:
    headline: dict[str, object] = {}
    for path in HEADLINE_METRICS.get(manifest.name, ()):
        value: Any = manifest.metrics
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            headline[path] = value
    return ModelOut(
        name=manifest.name,
        version=manifest.version,
        sha256=manifest.sha256,
        input=manifest.input.model_dump(),
        thresholds=manifest.thresholds,
        headline_metrics=headline,
        intended_use=manifest.intended_use,
        limitations=manifest.limitations,
        changelog=manifest.changelog,
    )
