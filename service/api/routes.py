"""The routes, thin: `/v1/*` (API keys when configured) hand the request to the service; health, readiness
and metrics stay open (metrics has its own key check). Also the OpenAPI request body and problem responses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import (
    ExamIncludeDep,
    FhirAlwaysDep,
    FhirDep,
    IdempotencyDep,
    IncludeDep,
    LanguageDep,
    ServiceDep,
    SettingsDep,
    StageDep,
    require_metrics_key,
)
from service.inference.manifest import MANIFEST_FILENAME, MODEL_FILENAME
from service.io.dicom import DICOM_MEDIA_TYPE
from service.io.uploads import IMAGE_FIELD, STAGE_HINTS, STAGES_FIELD
from service.pipeline.rules import focus_threshold
from service.render.fhir import EXAMPLE_BUNDLE, FHIR_MEDIA_TYPE
from service.render.gate import GATE_MODELS, GateOut, gate_bundle
from service.render.problems import PROBLEM_MEDIA_TYPE, problem_response
from service.render.schemas import (
    EXAMPLE_ASSESSMENT,
    EXAMPLE_EXAM,
    AssessmentOut,
    ExamOut,
    FhirBundleOut,
    HealthOut,
    ModelOut,
    ModelsOut,
)

GateModelName = Literal["detector", "quality"]  # service.render.gate.GATE_MODELS
ModelFileName = Literal["manifest.json", "model.onnx"]

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
        "focus_real_held_out.as_taken_not_sharp.sensitivity.pooled",
        "focus_real_held_out.as_taken_not_sharp.specificity.pooled",
        "focus_real_held_out.phone_12mp_not_sharp.sensitivity.pooled",
        "focus_real_held_out.phone_12mp_not_sharp.specificity.pooled",
        "focus_real_held_out.as_taken_not_sharp_balanced.sensitivity.pooled",
        "focus_real_held_out.as_taken_not_sharp_balanced.specificity.pooled",
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
        "description": f"the photo: multipart field `{IMAGE_FIELD}` (a JPEG, PNG, WebP, HEIC or DICOM file), "
        f"or the raw bytes with an image/* or {DICOM_MEDIA_TYPE} type. DICOM: a single-frame VL "
        "Photographic Image or Secondary Capture, 8-bit RGB or YBR, native, JPEG baseline, JPEG-LS, "
        "JPEG 2000 or RLE pixel data",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
                },
                "encoding": {IMAGE_FIELD: {"contentType": f"image/*, {DICOM_MEDIA_TYPE}"}},
            },
            "image/jpeg": _IMAGE_BODY,
            "image/png": _IMAGE_BODY,
            "image/webp": _IMAGE_BODY,
            "image/heic": _IMAGE_BODY,
            DICOM_MEDIA_TYPE: _IMAGE_BODY,
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
        404: "no such model or file",
        408: "the upload did not arrive in time",
        413: "upload or pixel count over the limit",
        415: "content type or image format not accepted",
        409: "a request with the same Idempotency-Key is still being processed (with Retry-After)",
        422: "not a usable image, missing field or invalid parameter (or Idempotency-Key invalid or reused)",
        503: "overloaded (with Retry-After) or not ready",
        504: "no answer within the request deadline",
    }
    schema = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {s: {"description": described[s], "content": {PROBLEM_MEDIA_TYPE: schema}} for s in statuses}


_FHIR_CONTENT = {
    FHIR_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/FhirBundleOut"}, "example": EXAMPLE_BUNDLE}
}
_NEGOTIATED = (
    f"the assessment as JSON, or with `Accept: {FHIR_MEDIA_TYPE}` a FHIR R4 Bundle (README: DICOM and FHIR)"
)
_IDEMPOTENT_HEADERS = {
    "Idempotency-Key": {"description": "the request's Idempotency-Key, echoed", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer to an earlier request with the same key",
        "schema": {"type": "string", "enum": ["true"]},
    },
}
_EXAMPLE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": _NEGOTIATED,
        "content": {"application/json": {"example": EXAMPLE_ASSESSMENT}} | _FHIR_CONTENT,
        "headers": _IDEMPOTENT_HEADERS,
    }
}
_QUALITY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": _NEGOTIATED, "content": _FHIR_CONTENT}
}
_FHIR_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "a FHIR R4 Bundle (type collection)", "content": _FHIR_CONTENT}
}


class FhirResponse(Response):
    """Documents a route's 200 as application/fhir+json (its body is rendered by service.render.fhir)."""

    media_type = FHIR_MEDIA_TYPE


router = APIRouter()  # open: health, readiness, metrics (metrics has its own key check)
api = APIRouter()  # /v1/*: service.app adds the API-key check when keys are configured


@api.post(
    "/v1/assess",
    summary="Full assessment: recapture (with reasons and advice) or a diagnosis",
    operation_id="assess",
    tags=["assessment"],
    response_model=AssessmentOut,
    responses=_problems(*UPLOAD_PROBLEMS, 409) | _EXAMPLE_RESPONSE,
    openapi_extra=UPLOAD_BODY,
)
async def assess(
    request: Request,
    service: ServiceDep,
    language: LanguageDep,
    include: IncludeDep,
    fhir: FhirDep,
    idempotency: IdempotencyDep,
) -> Response:
    return await service.handle(
        request, diagnose=True, language=language, include=include, fhir_context=fhir, idempotency=idempotency
    )


@api.post(
    "/v1/quality",
    summary="Fast capture gate for preview frames: detect, crop, quality checks; no diagnosis",
    operation_id="checkQuality",
    tags=["assessment"],
    response_model=AssessmentOut,
    responses=_problems(*UPLOAD_PROBLEMS) | _QUALITY_RESPONSE,
    openapi_extra=UPLOAD_BODY,
)
async def quality(
    request: Request, service: ServiceDep, language: LanguageDep, stage: StageDep, fhir: FhirDep
) -> Response:
    return await service.handle(
        request, diagnose=False, language=language, include=set(), stage=stage, fhir_context=fhir
    )


# The FHIR output under its own operations too: a generated client keeps one response type per operation,
# so `Accept` negotiation alone would leave it unable to read the bundle.
@api.post(
    "/v1/assess/fhir",
    summary="Full assessment as a FHIR R4 Bundle (what /v1/assess answers to Accept: application/fhir+json)",
    operation_id="assessFhir",
    tags=["fhir"],
    response_model=FhirBundleOut,
    response_class=FhirResponse,
    responses=_problems(*UPLOAD_PROBLEMS) | _FHIR_RESPONSE,
    openapi_extra=UPLOAD_BODY,
)
async def assess_fhir(
    request: Request, service: ServiceDep, language: LanguageDep, fhir: FhirAlwaysDep
) -> Response:
    return await service.handle(request, diagnose=True, language=language, include=set(), fhir_context=fhir)


@api.post(
    "/v1/quality/fhir",
    summary="Capture gate as a FHIR R4 Bundle (what /v1/quality answers to Accept: application/fhir+json)",
    operation_id="checkQualityFhir",
    tags=["fhir"],
    response_model=FhirBundleOut,
    response_class=FhirResponse,
    responses=_problems(*UPLOAD_PROBLEMS) | _FHIR_RESPONSE,
    openapi_extra=UPLOAD_BODY,
)
async def quality_fhir(
    request: Request, service: ServiceDep, language: LanguageDep, stage: StageDep, fhir: FhirAlwaysDep
) -> Response:
    return await service.handle(
        request, diagnose=False, language=language, include=set(), stage=stage, fhir_context=fhir
    )


@api.post(
    "/v1/exams",
    summary="A patient's exam: every photo assessed, what to retake, the photo to review, one P(CIN2+)",
    operation_id="assessExam",
    tags=["exams"],
    response_model=ExamOut,
    responses=_problems(400, 401, 403, 408, 409, 413, 415, 422, 503)
    | {200: {"content": {"application/json": {"example": EXAMPLE_EXAM}}, "headers": _IDEMPOTENT_HEADERS}},
    openapi_extra=EXAM_BODY,
)
async def exams(
    request: Request,
    service: ServiceDep,
    language: LanguageDep,
    include: ExamIncludeDep,
    idempotency: IdempotencyDep,
) -> Response:
    return await service.handle_exam(request, language=language, include=include, idempotency=idempotency)


@api.get(
    "/v1/models",
    summary="The loaded models, their thresholds and held-out metrics",
    operation_id="listModels",
    tags=["models"],
    response_model=ModelsOut,
    responses=_problems(401, 403, 503),
)
async def models(service: ServiceDep) -> ModelsOut:
    return ModelsOut(models=[_model_out(model.manifest) for model in service.pipeline.models])


@api.get(
    "/v1/gate",
    summary="What the capture app needs to run the capture gate on the device, offline",
    operation_id="getDeviceGate",
    tags=["models"],
    response_model=GateOut,
    responses=_problems(401, 403, 503),
)
async def device_gate(service: ServiceDep, settings: SettingsDep) -> GateOut:
    models = service.pipeline.models
    manifests = {model.manifest.name: model.manifest for model in models}
    sizes = {name: (settings.models_dir / name / MODEL_FILENAME).stat().st_size for name in GATE_MODELS}
    return gate_bundle(manifests, sizes, service.pipeline.rules, focus_threshold(settings))


@api.get(
    "/v1/models/{name}/{file}",
    summary="A capture-gate model's ONNX file or manifest, for the capture app's offline gate",
    operation_id="getModelFile",
    tags=["models"],
    response_class=FileResponse,
    responses=_problems(401, 403, 404, 422, 503)
    | {200: {"content": {"application/octet-stream": {}, "application/json": {}}}},
)
async def model_file(
    service: ServiceDep,
    settings: SettingsDep,
    name: Annotated[GateModelName, Path(description="a model the capture gate runs")],
    file: Annotated[ModelFileName, Path(description="the ONNX file or its manifest")],
) -> FileResponse:
    media_type = "application/json" if file == MANIFEST_FILENAME else "application/octet-stream"
    # The files the service loaded at start-up (their sha256 checked then); the browser checks it again.
    return FileResponse(settings.models_dir / name / file, media_type=media_type)


@router.get("/healthz", summary="Liveness: the process answers", operation_id="checkLiveness",
            tags=["health"], response_model=HealthOut)  # fmt: skip
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", summary="Readiness: models loaded and warmed up", operation_id="checkReadiness",
            tags=["health"], response_model=HealthOut, responses=_problems(503))  # fmt: skip
async def readyz(request: Request) -> Any:
    if request.app.state.draining:
        return problem_response(
            request, 503, "not_ready", "the service is shutting down; send work elsewhere"
        )
    if not request.app.state.ready:
        return problem_response(request, 503, "not_ready", "the models are still loading")
    # The remote backend's engine can go away while this process lives: route no work here meanwhile.
    reason = await anyio.to_thread.run_sync(request.app.state.backend.unready_reason)
    request.app.state.metrics.ready.set(0 if reason else 1)
    if reason:
        return problem_response(request, 503, "not_ready", reason)
    return HealthOut(status="ready")


# Health checkers (and RFC 9110) expect HEAD wherever GET works: the same status, no body.
@router.head("/healthz", include_in_schema=False)
async def healthz_head() -> Response:
    return Response(status_code=200)


@router.head("/readyz", include_in_schema=False)
async def readyz_head(request: Request) -> Response:
    answer = await readyz(request)
    return Response(status_code=answer.status_code if isinstance(answer, Response) else 200)


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
