"""Prometheus metrics, structured JSON logs and request ids: what ops teams see.

Logs carry ids, decisions, reasons and timings; never image bytes, file names or client-supplied text
other than a validated request id.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.pipeline.stages import STAGES
from service.render.problems import PROBLEM_MEDIA_TYPE, TITLES
from service.render.schemas import Problem

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_EXAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_REMOTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)
access_log = logging.getLogger("cervigate.access")
log = logging.getLogger("cervigate")
disable_created_metrics()  # the *_created series double every counter and no dashboard uses them


class Metrics:
    """The service's metrics in their own registry, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cervigate_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "cervigate_request_duration_seconds", "Request latency", ["endpoint"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "cervigate_stage_duration_seconds", "Pipeline stage latency", ["stage"], buckets=_STAGE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.decisions = Counter("cervigate_decisions", "Assessment decisions", ["decision"], registry=r)
        self.reasons = Counter(
            "cervigate_recapture_reasons", "Recapture reasons given", ["reason"], registry=r
        )
        self.inflight = Gauge(
            "cervigate_inflight_requests",
            "Requests admitted and not finished (an exam counts its photos)",
            registry=r,
        )
        self.rejected = Counter(
            "cervigate_rejected", "Requests refused, by problem code (overloaded = load shedding)", ["cause"],
            registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "cervigate_work_dropped",
            "Photos whose deadline passed before a compute slot was free: their work never started",
            registry=r,
        )
        self.model_info = Gauge(
            "cervigate_model_info", "Loaded models (value 1)", ["model", "version"], registry=r
        )
        self.ready = Gauge("cervigate_ready", "1 when every model is loaded and warmed up", registry=r)
        self.exams = Counter("cervigate_exams", "Exams answered, by decision", ["decision"], registry=r)
        self.exam_photos = Counter(
            "cervigate_exam_photos", "Exam photos by outcome: used, accepted, retake, problem", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.exam_size = Histogram(
            "cervigate_exam_size_photos", "Photos per exam", buckets=(1, 2, 3, 4, 6, 8, 12), registry=r
        )
        self.exam_duration = Histogram(
            "cervigate_exam_duration_seconds", "Server-side time per exam", buckets=_EXAM_BUCKETS, registry=r
        )
        self.idempotent_replays = Counter(
            "cervigate_idempotent_replays", "Answers replayed for a repeated Idempotency-Key", ["endpoint"],
            registry=r,
        )  # fmt: skip
        self.idempotency_bytes = Gauge(
            "cervigate_idempotency_store_bytes", "Memory held by stored Idempotency-Key answers", registry=r
        )
        # The remote backend (service.inference.remote): each model call's round trip, and the failed tries.
        self.remote_duration = Histogram(
            "cervigate_remote_inference_duration_seconds", "Round trip of a remote model call that answered",
            ["model"], buckets=_REMOTE_BUCKETS, registry=r,
        )  # fmt: skip
        self.remote_errors = Counter(
            "cervigate_remote_inference_errors",
            "Remote model calls that failed, by cause: timeout, unreachable, unavailable (503), error",
            ["model", "cause"],
            registry=r,
        )
        for stage in STAGES:  # every stage series exists from the start, so dashboards never see gaps
            self.stage_duration.labels(stage)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage_duration.labels(stage).observe(ms / 1000.0)

    def observe_exam(self, decision: str, outcomes: Iterable[str], seconds: float) -> None:
        """One exam: its decision, what became of each of its photos, and how long it took."""
        self.exams.labels(decision).inc()
        size = 0
        for outcome in outcomes:
            self.exam_photos.labels(outcome).inc()
            size += 1
        self.exam_size.observe(size)
        self.exam_duration.observe(seconds)

    def observe_decision(self, decision: str, reasons: Iterable[str]) -> None:
        self.decisions.labels(decision).inc()
        for reason in reasons:
            self.reasons.labels(reason).inc()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: the fields a log pipeline indexes, plus whatever `extra` carried."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the access log below replaces it


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a safe token, else a new UUID."""
    for key, value in headers:
        if key.lower() == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
    return str(uuid.uuid4())


async def _send_internal_error(send: Send, request_id: str, path: str) -> None:
    body = (
        Problem(
            type="urn:cervigate:problem:internal_error",
            title=TITLES["internal_error"],
            status=500,
            detail="an unexpected error occurred; it has been logged with this request id",
            code="internal_error",
            instance=path,
            request_id=request_id,
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ObservabilityMiddleware:
    """Request id, request metrics and one access-log line per request (pure ASGI: no body buffering)."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, known_paths: set[str], known_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app, self.metrics, self.known_paths = app, metrics, known_paths
        self.known_prefixes = known_prefixes  # a static tree counts as one endpoint: its prefix

    def endpoint(self, path: str) -> str:
        if path in self.known_paths:
            return path
        return next((prefix for prefix in self.known_prefixes if path.startswith(prefix)), "other")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        endpoint = self.endpoint(scope["path"])
        status = 500
        response_started = False
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Caught here rather than by Starlette's outermost handler, so a 500 still gets its request id,
            # its metric and one log line. The traceback is logged; no request content is in it.
            log.exception("unhandled error", extra={"request_id": request_id})
            state["log_fields"] = {"problem": "internal_error"}
            if response_started:
                raise
            await _send_internal_error(send_with_id, request_id, scope["path"])
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(elapsed)
            fields = state.get("log_fields", {})
            if "problem" in fields:
                self.metrics.rejected.labels(fields["problem"]).inc()
            if endpoint not in ("/metrics", "/healthz", "/readyz"):
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "endpoint": endpoint,
                        "status": status,
                        "duration_ms": round(elapsed * 1000.0, 2),
                        **fields,
                    },
                )
