"""Request handling once the app is ready: admission (load shedding), the deadline, the pipeline in a
worker thread, and the response body.
"""

from __future__ import annotations

import io
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import numpy as np
from fastapi import Request, Response
from PIL import Image

from service.inference.runtime import ModelSet
from service.io.uploads import read_image
from service.pipeline.spare import SpareCores
from service.pipeline.stages import Assessment, Pipeline
from service.render import review
from service.render.problems import ProblemError
from service.render.reasons import ADVICE, MESSAGES
from service.render.schemas import AssessmentOut, CervixOut, DiagnosisOut, LesionOut, QualityOut, ReasonOut
from service.settings import Settings
from service.telemetry import Metrics


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
