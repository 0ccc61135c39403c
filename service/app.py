"""The FastAPI app: an app factory, models loaded once in the lifespan, thin routes.

Run it with `make serve` or `python -m service`; configure it with `CERVIGATE_*` variables (service.settings).
"""

from __future__ import annotations

import io
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import access, review
from service.decoding import register_heif
from service.pipeline import Assessment, Pipeline
from service.problems import PROBLEM_MEDIA_TYPE, ProblemError, install_problem_handlers, problem_response
from service.reasons import ADVICE, MESSAGES, negotiate_language
from service.runtime import ModelSet, load_models
from service.schemas import (
    EXAMPLE_ASSESSMENT,
    AssessmentOut,
    CervixOut,
    DiagnosisOut,
    HealthOut,
    LesionOut,
    ModelOut,
    ModelsOut,
    Problem,
    QualityOut,
    ReasonOut,
)
from service.settings import Settings
from service.spare import SpareCores
from service.telemetry import Metrics, ObservabilityMiddleware
from service.uploads import IMAGE_FIELD, read_image

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
        "real_split",
        "voting_real_pooled.roc_auc",
        "voting_real_pooled_roc_auc_ci.low",
        "voting_real_pooled_roc_auc_ci.high",
        "voting_real_pooled.sensitivity",
        "voting_real_pooled.specificity",
    ),
}
INCLUDE_PATTERN = r"^(mask|overlay)(,(mask|overlay))*$"
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


class Admission:
    """Bounds admitted requests (reading, queued and running); beyond the bound, sheds load with 503."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.max_inflight, self.retry_after = settings.max_inflight, settings.retry_after_s
        self.metrics = metrics
        self.inflight = 0  # one event loop: no lock needed

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.inflight >= self.max_inflight:
            raise ProblemError(
                503,
                "overloaded",
                "the service is at capacity; retry after the delay in Retry-After",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()


class AssessmentService:
    """What a request needs once the app is ready: the pipeline, the bounds, the metrics."""

    def __init__(self, settings: Settings, models: ModelSet, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.admission = Admission(settings, metrics)
        self.limiter = anyio.CapacityLimiter(settings.inference_workers)
        self.compute_slots = threading.BoundedSemaphore(settings.inference_workers)
        self.spare = SpareCores(
            self.compute_slots if settings.overlap_stages and settings.inference_workers > 1 else None,
            settings.inference_workers,
            demand=lambda: self.admission.inflight,
        )
        self.pipeline = Pipeline(models, settings, self.spare)
        self.versions = {model.manifest.name: model.manifest.version for model in models}

    def warm_up(self) -> None:
        """One pass through every stage, so the first real request pays no first-run costs."""
        side = max(512, self.settings.min_image_side)
        photo = np.full((side, side, 3), 128, dtype=np.uint8)
        photo[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = (210, 120, 120)
        if side * side <= self.settings.max_pixels:
            buffer = io.BytesIO()
            Image.fromarray(photo).save(buffer, "JPEG")
            self.pipeline.assess(buffer.getvalue(), diagnose=True)
        self.pipeline.classify(self.pipeline.segment(photo))

    async def handle(self, request: Request, *, diagnose: bool, language: str, include: set[str]) -> Response:
        async with self.admission.slot():
            data = await read_image(request, self.settings.max_upload_bytes, self.settings.upload_timeout_s)
            run = partial(self.assess_and_render, data, diagnose=diagnose, include=include)
            try:
                with anyio.fail_after(self.settings.request_deadline_s):
                    # Abandoned on timeout: the thread cannot be interrupted and finishes on its own; anyio
                    # then frees its limiter token, so the thread holds a compute slot of its own (below).
                    assessment, review_images = await anyio.to_thread.run_sync(
                        run, limiter=self.limiter, abandon_on_cancel=True
                    )
            except TimeoutError as error:
                raise ProblemError(
                    504,
                    "deadline_exceeded",
                    f"no answer within {self.settings.request_deadline_s:g} s (queue or a very large photo); "
                    "take the photo again",
                ) from error
        self.metrics.observe_stages(assessment.timings_ms)
        self.metrics.observe_decision(assessment.decision, (r.value for r in assessment.reasons))
        request.state.log_fields = {
            "decision": assessment.decision,
            "reasons": [r.value for r in assessment.reasons],
            "timings_ms": {k: round(v, 2) for k, v in assessment.timings_ms.items()},
        }
        body = self.to_response(assessment, request.state.request_id, language, review_images)
        # Serialised here, once: the model was validated on construction, so FastAPI need not do it again.
        return Response(
            body.model_dump_json(),
            media_type="application/json",
            headers={"Content-Language": language, "Vary": "Accept-Language"},
        )

    def assess_and_render(self, data: bytes, *, diagnose: bool, include: set[str]) -> tuple[Assessment, dict]:
        """The pipeline, then the review images asked for: all CPU work, run in a worker thread.

        The compute slot is held by the thread itself, so requests abandoned at their deadline still count
        against `inference_workers` until their work is really done."""
        with self.compute_slots:
            return self._assess_and_render(data, diagnose=diagnose, include=include)

    def _assess_and_render(
        self, data: bytes, *, diagnose: bool, include: set[str]
    ) -> tuple[Assessment, dict]:
        assessment = self.pipeline.assess(data, diagnose=diagnose)
        images: dict[str, str] = {}
        lesion, crop_rgb, threshold = assessment.lesion, assessment.crop_rgb, self.pipeline.rules.lesion
        if lesion is not None and crop_rgb is not None:
            if "mask" in include:
                images["mask_png"] = review.mask_png(lesion.probability, threshold)
            if "overlay" in include:
                images["overlay_jpeg"] = review.overlay_jpeg(crop_rgb, lesion.probability, threshold)
        return assessment, images

    def to_response(
        self, a: Assessment, request_id: str, language: str, review_images: dict
    ) -> AssessmentOut:
        q, lesion, d = a.quality, a.lesion, a.diagnosis
        return AssessmentOut(
            id=request_id,
            decision=a.decision,
            reasons=[ReasonOut(code=r, message=MESSAGES[language][r]) for r in a.reasons],
            advice=ADVICE[language][a.reasons[0]] if a.reasons else None,
            cervix=CervixOut(
                found=a.detection.found,
                score=round(a.detection.score, 4),
                box=[round(v) for v in a.detection.box] if a.detection.box else None,
            ),
            quality=None
            if q is None
            else QualityOut(
                sharpness=round(q.sharpness, 4),
                blur_kind=q.blur_kind,  # type: ignore[arg-type]
                exposure=q.exposure,  # type: ignore[arg-type]
                glare_fraction=round(q.glare_fraction, 4),
                exam_stage=q.exam_stage,  # type: ignore[arg-type]
            ),
            lesion=None
            if lesion is None or a.region is None
            else LesionOut(
                area_fraction=round(lesion.area_fraction, 4), region=list(a.region), **review_images
            ),
            diagnosis=None
            if d is None
            else DiagnosisOut(label=d.label, probability=round(d.probability, 4), referral=d.referral),
            models=self.versions,
            timings_ms={k: round(v, 2) for k, v in a.timings_ms.items()},
        )


# --- dependencies ------------------------------------------------------------------------------------


def get_service(request: Request) -> AssessmentService:
    service: AssessmentService | None = getattr(request.app.state, "service", None)
    if service is None or not request.app.state.ready:
        raise ProblemError(
            503, "not_ready", "the models are still loading; retry shortly", {"Retry-After": "1"}
        )
    return service


def get_language(accept_language: Annotated[str | None, Header()] = None) -> str:
    return negotiate_language(accept_language)


def get_include(
    include: Annotated[
        str | None,
        Query(
            pattern=INCLUDE_PATTERN, description="comma-separated extras: mask (lesion PNG), overlay (JPEG)"
        ),
    ] = None,
) -> set[str]:
    return set(include.split(",")) if include else set()


def require_api_key(request: Request) -> None:
    keys: Keys = request.app.state.keys
    if keys.api:
        access.check(request, keys.api)


def require_metrics_key(request: Request) -> None:
    keys: Keys = request.app.state.keys
    if keys.metrics:
        access.check(request, keys.metrics, also_known=keys.api)


@dataclass(frozen=True)
class Keys:
    api: tuple[bytes, ...]
    metrics: tuple[bytes, ...]


ServiceDep = Annotated[AssessmentService, Depends(get_service)]
LanguageDep = Annotated[str, Depends(get_language)]
IncludeDep = Annotated[set[str], Depends(get_include)]

# --- routes --------------------------------------------------------------------------------------------

router = APIRouter()  # open: health, readiness, metrics (metrics has its own key check)
api = APIRouter(dependencies=[Depends(require_api_key)])  # /v1/*: API keys when configured


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
async def quality(request: Request, service: ServiceDep, language: LanguageDep) -> Response:
    return await service.handle(request, diagnose=False, language=language, include=set())


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


# --- the app -----------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    register_heif()
    models = await anyio.to_thread.run_sync(load_models, settings)  # verifies every sha256
    service = AssessmentService(settings, models, app.state.metrics)
    await anyio.to_thread.run_sync(service.warm_up)
    for model in models:
        app.state.metrics.model_info.labels(model.manifest.name, model.manifest.version).set(1)
    app.state.service = service
    app.state.ready = True
    app.state.metrics.ready.set(1)
    try:
        yield
    finally:
        app.state.ready = False
        app.state.metrics.ready.set(0)
        await anyio.to_thread.run_sync(service.spare.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="CerviGate",
        version="0.1.0",
        summary="Capture-time quality gate and reference CIN2+ assessment for smartphone colposcopy.",
        description="Research software, not a medical device. "
        "Errors are RFC 9457 problem+json with a stable `code`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.draining = False  # set by the SIGTERM handler in service/__main__.py
    app.state.service = None
    app.state.keys = Keys(
        api=access.parse_keys(settings.api_keys), metrics=access.parse_keys(settings.metrics_api_keys)
    )
    app.include_router(api)
    app.include_router(router)
    install_problem_handlers(app)
    # Metric labels only ever take these values (or "other"), so a scanner cannot explode cardinality.
    known_paths = {getattr(route, "path", "") for route in (*api.routes, *router.routes)} | {
        "/docs",
        "/openapi.json",
    }
    if settings.cors_origins:  # closed unless configured: the API serves apps, not arbitrary web pages
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type", "Accept-Language"],
            expose_headers=["X-Request-ID", "Retry-After", "Content-Language"],
        )
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics, known_paths=known_paths)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)  # fmt: skip
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
