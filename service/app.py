"""The FastAPI app: the factory and the lifespan, which loads the models once and warms them up.

Run it with `make serve` or `python -m service`; configure it with `CERVIGATE_*` variables (service.settings).
Routes and dependencies are in service/api/, the pipeline in service/pipeline/.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from service import sizing
from service.api import access
from service.api.deps import Keys, refuse_repeated_query, require_api_key
from service.api.draining import DrainRefusedBodies
from service.api.handling import AssessmentService
from service.api.http_protocol import RequestHeadGuard
from service.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.api.idempotency import REPLAYED_HEADER
from service.api.routes import api, router
from service.inference.backend import Backend
from service.inference.remote import RemoteBackend
from service.inference.runtime import OnnxRuntimeBackend
from service.io.decoding import register_heif
from service.render.problems import install_problem_handlers
from service.render.schemas import Problem
from service.settings import Settings
from service.telemetry import Metrics, ObservabilityMiddleware
from service.web.capture import CAPTURE_PATH, mount_capture_app

log = logging.getLogger("cervigate")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    register_heif(settings.heif_decode_threads)
    warning = sizing.check_memory(
        settings.max_inflight,
        settings.max_upload_bytes,
        settings.inference_workers,
        settings.max_pixels,
        sizing.memory_limit_bytes(),
    )
    if warning:
        log.warning(warning)
    backend = await anyio.to_thread.run_sync(open_backend, settings, app.state.metrics)
    models = backend.models
    try:
        service = AssessmentService(settings, models, app.state.metrics)
        await anyio.to_thread.run_sync(service.warm_up)
    except BaseException:
        backend.close()  # a remote backend's connections, when the rest of start-up fails
        raise
    for model in models:
        app.state.metrics.model_info.labels(model.manifest.name, model.manifest.version).set(1)
    app.state.service = service
    app.state.backend = backend
    app.state.ready = True
    app.state.metrics.ready.set(1)
    try:
        yield
    finally:
        app.state.ready = False
        app.state.metrics.ready.set(0)
        await anyio.to_thread.run_sync(service.close)
        backend.close()


def open_backend(settings: Settings, metrics: Metrics) -> Backend:
    """The models, verified (sha256 in process; metadata against the manifests when remote) and warm."""
    if settings.inference_backend == "remote":
        return RemoteBackend(settings, metrics)
    return OnnxRuntimeBackend(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="CerviGate",
        version="0.1.0",
        summary="Capture-time quality gate and reference CIN2+ assessment for smartphone colposcopy.",
        description="Research software, not a medical device. "
        "Errors are RFC 9457 problem+json with a stable `code`.",
        lifespan=lifespan,
        # A trailing slash is a 404 problem, not a 307 whose Location is built from the client's Host header
        # and which makes the client send its photo again.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.draining = False  # set by the SIGTERM handler in service/__main__.py
    app.state.service = None
    app.state.backend = None
    app.state.keys = Keys(
        api=access.parse_keys(settings.api_keys), metrics=access.parse_keys(settings.metrics_api_keys)
    )
    checks = [Depends(require_api_key)] if app.state.keys.api else []
    app.include_router(api, dependencies=[*checks, Depends(refuse_repeated_query)])
    app.include_router(router)
    if settings.capture_app:
        mount_capture_app(app, settings.capture_app_dir)
    install_problem_handlers(app)
    # Metric labels only ever take these values (or "other"), so a scanner cannot explode cardinality.
    known_paths = {getattr(route, "path", "") for route in (*api.routes, *router.routes)} | {
        "/docs",
        "/openapi.json",
        CAPTURE_PATH,
    }
    if settings.cors_origins:  # closed unless configured: the API serves apps, not arbitrary web pages
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type", "Accept-Language",
                           IDEMPOTENCY_HEADER],
            expose_headers=["X-Request-ID", "Retry-After", "Content-Language", IDEMPOTENCY_HEADER,
                            REPLAYED_HEADER],
        )  # fmt: skip
    app.add_middleware(RequestHeadGuard, max_header_bytes=settings.max_header_bytes)
    app.add_middleware(
        DrainRefusedBodies,
        max_bytes=settings.refused_body_drain_bytes,
        max_seconds=settings.refused_body_drain_s,
    )
    app.add_middleware(
        ObservabilityMiddleware,
        metrics=app.state.metrics,
        known_paths=known_paths,
        known_prefixes=(CAPTURE_PATH + "/",),
    )

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
