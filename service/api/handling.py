"""Request handling once the app is ready: admission (load shedding), the deadline, the pipeline in a
worker thread, and the response body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import Request, Response
from PIL import Image
from pydantic import BaseModel

from service.api.idempotency import REPLAYED_HEADER, IdempotencyKey, IdempotencyStore, echoing, fingerprint
from service.inference.backend import InferenceUnavailable, ModelSet
from service.io.decoding import UploadRejected
from service.io.dicom import DICOM_MEDIA_TYPE, DicomContext, read_context, require_dicom
from service.io.uploads import ExamUpload, Photo, describe_size, read_exam, read_image
from service.pipeline.exams import ExamPhoto, PartProblem, summarise
from service.pipeline.rules import ACETIC
from service.pipeline.spare import SpareCores
from service.pipeline.stages import Assessment, Pipeline
from service.render import fhir, review
from service.render.exams import exam_response, photo_outcome
from service.render.problems import ProblemError
from service.render.reasons import ADVICE, MESSAGES
from service.render.schemas import AssessmentOut, CervixOut, DiagnosisOut, LesionOut, QualityOut, ReasonOut
from service.settings import Settings
from service.telemetry import Metrics

T = TypeVar("T")


class DeadlinePassed(Exception):
    """A photo's work was dropped unstarted: its deadline passed in the queue, or its turn came too late
    for it to finish in time."""


class Admission:
    """Bounds admitted work (reading, queued and running); beyond the bound, sheds load with 503.

    A request's units come back only when its work has really finished: a request abandoned at its deadline
    while its pipeline runs still counts until that pipeline ends, so `max_inflight` bounds the work, not
    only the waiting. Worker threads release units, hence the lock."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.max_inflight, self.retry_after = settings.max_inflight, settings.retry_after_s
        self.metrics = metrics
        self.inflight = 0
        self._lock = threading.Lock()
        self._readers: set[Upload] = set()  # admitted requests still receiving their body (event loop only)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Ticket]:
        """One admitted request; an exam then grows its ticket to count every photo.

        At capacity, a request still receiving a body that has sent nothing for `STALLED_UPLOAD_S` gives its
        place up (it gets 408) rather than the newcomer being shed: 32 connections that send headers and
        then nothing would otherwise keep every photo out for the whole upload timeout. The evicted
        request's units come back as it ends, a moment later."""
        with self._lock:
            if self.inflight >= self.max_inflight and not self._evict_a_stalled_upload():
                raise self._overloaded()
            self._add(1)
        ticket = Ticket(self, weight=1)
        try:
            yield ticket
        finally:
            ticket.close()

    @contextmanager
    def receiving(self) -> Iterator[Upload]:
        """While an admitted request reads its body: its progress is watched, and it may be evicted."""
        upload = Upload()
        self._readers.add(upload)
        try:
            with upload.scope:
                yield upload
        finally:
            self._readers.discard(upload)
        if upload.scope.cancelled_caught:
            raise ProblemError(
                408,
                "upload_timeout",
                f"the upload stalled for {STALLED_UPLOAD_S:g} s while the service was full; send it again",
            )

    def _evict_a_stalled_upload(self) -> bool:  # under the lock, on the event loop
        now = time.monotonic()
        stalled = [u for u in self._readers if not u.evicted and now - u.last_progress >= STALLED_UPLOAD_S]
        if not stalled:
            return False
        victim = min(stalled, key=lambda upload: upload.last_progress)
        victim.evicted = True
        victim.scope.cancel()
        return True

    def grow(self, ticket: Ticket, extra: int) -> None:
        """Count `extra` more units of work for an admitted request, or shed it. A request that is alone
        is always let through, so an exam larger than `max_inflight` still runs on an idle service."""
        with self._lock:
            alone = self.inflight == ticket.weight
            if extra > 0 and self.inflight + extra > self.max_inflight and not alone:
                raise self._overloaded()
            ticket.weight += extra
            self._add(extra)

    def _add(self, count: int) -> None:  # under the lock
        self.inflight += count
        self.metrics.inflight.inc(count)

    def _overloaded(self) -> ProblemError:
        return ProblemError(
            503,
            "overloaded",
            "the service is at capacity; retry after the delay in Retry-After",
            headers={"Retry-After": str(self.retry_after)},
        )


# An admitted upload that has received nothing for this long is stalled: at capacity it yields its place.
STALLED_UPLOAD_S = 2.0


class Upload:
    """One admitted request's body as it arrives: when bytes last came, and the scope that evicts it."""

    def __init__(self) -> None:
        self.last_progress = time.monotonic()
        self.scope = anyio.CancelScope()
        self.evicted = False

    def progress(self) -> None:
        self.last_progress = time.monotonic()


class Ticket:
    """What one admitted request counts against `max_inflight` (1, or an exam's photos), held until the
    request is answered and every piece of work it submitted has finished or was dropped unstarted."""

    def __init__(self, admission: Admission, weight: int) -> None:
        self.weight = weight
        self._admission = admission
        self._jobs = 0
        self._closed = False

    def hold_until_done(self, job: Future[Any]) -> None:
        with self._admission._lock:
            self._jobs += 1
        job.add_done_callback(self._job_done)  # runs in the worker thread, or here if already done

    def close(self) -> None:
        """The request is answered; its units come back now, or when its last job ends."""
        with self._admission._lock:
            self._closed = True
            self._release_if_idle()

    def _job_done(self, _: Future[Any]) -> None:
        with self._admission._lock:
            self._jobs -= 1
            self._release_if_idle()

    def _release_if_idle(self) -> None:  # under the lock
        if self._closed and self._jobs == 0 and self.weight:
            self._admission._add(-self.weight)
            self.weight = 0


class WorkDurations:
    """How long each kind of work took lately (the median of the last few), so that a job whose turn
    comes with less time left than that is dropped instead of run for nobody."""

    def __init__(self, window: int = 32) -> None:
        self._window = window
        self._recent: dict[Hashable, deque[float]] = {}
        self._lock = threading.Lock()

    def expected(self, kind: Hashable) -> float:
        with self._lock:
            recent = self._recent.get(kind)
            return statistics.median(recent) if recent else 0.0  # never seen: let it try

    def record(self, kind: Hashable, seconds: float) -> None:
        with self._lock:
            self._recent.setdefault(kind, deque(maxlen=self._window)).append(seconds)


def _work_kind(diagnose: bool, photo: Photo) -> tuple[bool, int]:
    """Work that takes about as long: the same endpoint's, on a photo of about the same byte size."""
    return diagnose, photo.size.bit_length()


class AssessmentService:
    """What a request needs once the app is ready: the pipeline, the bounds, the metrics."""

    def __init__(self, settings: Settings, models: ModelSet, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.admission = Admission(settings, metrics)
        self.idempotency = IdempotencyStore(settings, metrics)
        # The queue for compute: a job still queued at its deadline is cancelled there and never runs.
        self.workers = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="cervigate-worker")
        self.compute_slots = threading.BoundedSemaphore(settings.inference_workers)
        self.durations = WorkDurations()
        self._outstanding = 0  # jobs submitted and not finished
        self._jobs_lock = threading.Lock()
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
        lesion = self.pipeline.segment(photo)
        self.pipeline.classify(self.pipeline.measure(lesion.fitted_rgb, lesion.lesion_channel))
        self.pipeline.measure_unstained(photo)

    def close(self) -> None:
        """Shutdown: let the work already started finish."""
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.spare.close()

    async def compute(self, ticket: Ticket, work: Callable[[], T], kind: Hashable) -> T:
        """`work` on a worker thread within the request deadline, else TimeoutError or DeadlinePassed.

        Work that could not finish by its deadline never starts (nobody would wait for its answer): work
        that had to queue is dropped when its turn comes too late for the time such work (`kind`) took
        lately. Work that found a worker free always runs, so a stale estimate can never lock a kind of
        work out. Work that has started cannot be interrupted: it finishes on its own, and its ticket stays
        held until then."""
        deadline = time.monotonic() + self.settings.request_deadline_s
        with self._jobs_lock:
            queued = self._outstanding >= self.settings.inference_workers
            self._outstanding += 1
        job = self.workers.submit(self._on_compute_slot, work, deadline, kind, queued)
        job.add_done_callback(self._job_done)
        ticket.hold_until_done(job)
        with anyio.fail_after(self.settings.request_deadline_s):
            return await asyncio.wrap_future(job)  # cancelling it cancels a job still queued

    def _on_compute_slot(self, work: Callable[[], T], deadline: float, kind: Hashable, queued: bool) -> T:
        # A spare-core task may hold a slot for a few ms; the job then waits for it, up to its deadline.
        if not self.compute_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlinePassed
        try:
            started = time.monotonic()
            if queued and deadline - started <= self.durations.expected(kind):
                raise DeadlinePassed
            result = work()
            self.durations.record(kind, time.monotonic() - started)
            return result
        finally:
            self.compute_slots.release()

    def _job_done(self, job: Future[Any]) -> None:
        with self._jobs_lock:
            self._outstanding -= 1
        if job.cancelled() or isinstance(job.exception(), DeadlinePassed):
            self.metrics.dropped.inc()

    async def handle(
        self,
        request: Request,
        *,
        diagnose: bool,
        language: str,
        include: set[str],
        stage: str = ACETIC,
        fhir_context: fhir.FhirContext | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> Response:
        """One photo; the JSON answer, or with `fhir_context` the FHIR R4 bundle."""
        async with echoing(idempotency), self.admission.slot() as ticket:
            with self.admission.receiving() as upload:
                photo = await read_image(
                    request, self.settings.max_upload_bytes, self.settings.upload_timeout_s, upload.progress
                )
            answer = partial(self._answer_photo, request, ticket, photo, diagnose=diagnose, language=language,
                             include=include, stage=stage, fhir_context=fhir_context)  # fmt: skip
            negotiated = (language, "fhir" if fhir_context is not None else "json")  # what shapes the answer
            wait_s = self.settings.request_deadline_s
            return await self._once(request, idempotency, answer, [photo], negotiated, wait_s)

    async def _answer_photo(
        self,
        request: Request,
        ticket: Ticket,
        photo: Photo,
        *,
        diagnose: bool,
        language: str,
        include: set[str],
        stage: str,
        fhir_context: fhir.FhirContext | None,
    ) -> Response:
        run = partial(self._assess_and_render, photo, diagnose=diagnose, include=include, stage=stage)
        described = partial(self._assess_and_describe, run, photo, describe=fhir_context is not None)
        try:
            result = await self.compute(ticket, described, _work_kind(diagnose, photo))
        except (TimeoutError, DeadlinePassed) as error:
            raise ProblemError(
                504,
                "deadline_exceeded",
                f"no answer within {self.settings.request_deadline_s:g} s (queue or a very large photo); "
                "take the photo again",
            ) from error
        except InferenceUnavailable as error:
            raise self._unavailable() from error
        assessment, review_images, facts, dicom = result
        self.metrics.observe_decision(assessment.decision, (r.value for r in assessment.reasons))
        request.state.log_fields = {
            "decision": assessment.decision,
            "reasons": [r.value for r in assessment.reasons],
            "timings_ms": {k: round(v, 2) for k, v in assessment.timings_ms.items()},
        }
        out = self.to_response(assessment, request.state.request_id, language, review_images)
        if fhir_context is None or facts is None:
            return _json(out, language)
        context = fhir.FhirContext(fhir_context.subject, fhir_context.encounter, dicom)
        return _fhir_json(fhir.bundle(out, facts, context, language), language)

    async def handle_exam(
        self, request: Request, *, language: str, include: set[str], idempotency: IdempotencyKey | None = None
    ) -> Response:
        started = time.perf_counter()
        settings = self.settings
        async with echoing(idempotency), self.admission.slot() as ticket:
            with self.admission.receiving() as receiving:
                upload = await read_exam(
                    request,
                    settings.max_exam_bytes,
                    settings.max_exam_photos,
                    settings.upload_timeout_s,
                    receiving.progress,
                )
            self.admission.grow(ticket, len(upload.photos) - 1)  # an exam counts its photos
            answer = partial(self._answer_exam, request, ticket, upload, language, include, started)
            fields = [language, *(hint or "" for hint in upload.stage_hints)]
            wait_s = settings.request_deadline_s * len(upload.photos)  # each photo has its own deadline
            return await self._once(request, idempotency, answer, upload.photos, fields, wait_s)

    async def _answer_exam(
        self,
        request: Request,
        ticket: Ticket,
        upload: ExamUpload,
        language: str,
        include: set[str],
        started: float,
    ) -> Response:
        # One photo after another: each gets the single-photo deadline from its turn, and an exam never
        # holds more than one compute slot (a spare core still overlaps a photo's own stages).
        photos = [
            await self._exam_photo(ticket, index, photo, hint, include)
            for index, (photo, hint) in enumerate(zip(upload.photos, upload.stage_hints, strict=True))
        ]
        refused = [p.problem for p in photos if p.problem is not None]
        if len(refused) == len(photos):  # nothing in it could be read: the request is bad as a whole
            first = refused[0]
            # A busy or unreachable engine is worth a retry: say when, as every other 503 does.
            retry = {"Retry-After": str(self.settings.retry_after_s)} if first.status == 503 else None
            raise ProblemError(
                first.status, first.code, f"no photo could be assessed; photo 0: {first.detail}", retry
            )
        exam = summarise(photos, self.pipeline.case_model, self.pipeline.rules.cin2plus)
        for photo in photos:
            if photo.assessment is not None:
                reasons = (r.value for r in photo.assessment.reasons)
                self.metrics.observe_decision(photo.assessment.decision, reasons)
        seconds = time.perf_counter() - started
        self.metrics.observe_exam(exam.decision, (photo_outcome(exam, p) for p in photos), seconds)
        request.state.log_fields = {
            "decision": exam.decision,
            "photos": [photo_outcome(exam, p) for p in photos],
            "reasons": [r.value for r in exam.reasons],
        }
        request_id = request.state.request_id
        assessments = {
            p.index: self.to_response(p.assessment, f"{request_id}/{p.index}", language, p.review_images)
            for p in photos
            if p.assessment is not None
        }
        body = exam_response(
            exam,
            assessments,
            request_id=request_id,
            language=language,
            versions=self.versions,
            contact_sheet="contact_sheet" in include,
            seconds=seconds,
        )
        return _json(body, language)

    async def _once(
        self,
        request: Request,
        key: IdempotencyKey | None,
        answer: Callable[[], Awaitable[Response]],
        photos: list[Photo],
        fields: Sequence[str],
        wait_s: float,
    ) -> Response:
        """`answer()`, or with an Idempotency-Key the answer already given (or being computed) for it.
        `fields`: what else the answer depends on (the negotiated language and format, the stage hints)."""
        if key is None:
            return await answer()
        path, query = request.url.path, request.url.query
        digest = await anyio.to_thread.run_sync(fingerprint, path, query, photos, fields)
        response = await self.idempotency.answer(
            key, digest, answer, endpoint=request.url.path, wait_s=wait_s
        )
        if REPLAYED_HEADER in response.headers:
            # The access log says so; the first answer logged its decision.
            request.state.log_fields = {"idempotent_replay": True}
        return response

    async def _exam_photo(
        self, ticket: Ticket, index: int, photo: Photo, hint: str | None, include: set[str]
    ) -> ExamPhoto:
        """One photo of an exam; what would be a problem response for a single photo becomes its problem."""
        if not photo.size:
            return ExamPhoto(index, hint, problem=PartProblem(400, "empty_upload", "the photo is empty"))
        if photo.size > self.settings.max_upload_bytes:
            limit = describe_size(self.settings.max_upload_bytes)
            detail = f"the photo is over {limit}; send a smaller photo"
            return ExamPhoto(index, hint, problem=PartProblem(413, "upload_too_large", detail))
        run = partial(self._assess_and_render, photo, diagnose=True, include=include, stage=hint)
        try:
            assessment, images = await self.compute(ticket, run, _work_kind(True, photo))
        except UploadRejected as error:
            return ExamPhoto(index, hint, problem=PartProblem(error.status, error.code, str(error)))
        except (TimeoutError, DeadlinePassed):
            detail = f"no answer within {self.settings.request_deadline_s:g} s; take the photo again"
            return ExamPhoto(index, hint, problem=PartProblem(504, "deadline_exceeded", detail))
        except InferenceUnavailable:
            unavailable = self._unavailable()  # the detail names no internal host
            return ExamPhoto(index, hint, problem=PartProblem(503, unavailable.code, unavailable.detail))
        return ExamPhoto(index, hint, assessment=assessment, review_images=images)

    def _unavailable(self) -> ProblemError:
        """The remote inference server is down or shedding load (after the retries): try again shortly."""
        return ProblemError(
            503,
            "inference_unavailable",
            "the inference server does not answer; retry after the delay in Retry-After",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    def _assess_and_render(
        self, photo: Photo, *, diagnose: bool, include: set[str], stage: str | None
    ) -> tuple[Assessment, dict]:
        """The pipeline, then the review images asked for: all CPU work, run on a compute slot."""
        data = photo.data()
        if photo.declared_dicom:
            require_dicom(data)
        assessment = self.pipeline.assess(data, diagnose=diagnose, stage=stage)
        # Recorded here, where the work ran: a pipeline whose request gave up at its deadline counts too.
        self.metrics.observe_stages(assessment.timings_ms)
        images: dict[str, str] = {}
        lesion, crop_rgb, threshold = assessment.lesion, assessment.crop_rgb, self.pipeline.rules.lesion
        if lesion is not None and crop_rgb is not None:
            if "mask" in include:
                images["mask_png"] = review.mask_png(lesion.probability, threshold)
            if "overlay" in include:
                images["overlay_jpeg"] = review.overlay_jpeg(crop_rgb, lesion.probability, threshold)
        return assessment, images

    @staticmethod
    def _assess_and_describe(
        run: Callable[[], tuple[Assessment, dict]], photo: Photo, *, describe: bool
    ) -> tuple[Assessment, dict, fhir.PhotoFacts | None, DicomContext | None]:
        """`run`, then (`describe`: for the FHIR output) what the Media says of the photo and, for DICOM,
        the header's identifiers: read only here, as the JSON answer never needs them."""
        assessment, images = run()
        if not describe:
            return assessment, images, None, None
        digest = hashlib.sha1(usedforsecurity=False)
        for chunk in photo.chunks:
            digest.update(chunk)
        dicom = read_context(photo.data()) if assessment.media_type == DICOM_MEDIA_TYPE else None
        facts = fhir.PhotoFacts(
            media_type=assessment.media_type,
            size=photo.size,
            sha1_base64=base64.b64encode(digest.digest()).decode("ascii"),
            width=assessment.image_size[0],
            height=assessment.image_size[1],
        )
        return assessment, images, facts, dicom

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
                distance=None if a.detection.distance is None else round(a.detection.distance, 4),
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


def _json(body: BaseModel, language: str) -> Response:
    """Serialised here, once: the model was validated on construction, so FastAPI need not do it again."""
    return Response(
        body.model_dump_json(),
        media_type="application/json",
        headers={"Content-Language": language, "Vary": "Accept, Accept-Language"},
    )


def _fhir_json(body: dict, language: str) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False),
        media_type=fhir.FHIR_CONTENT_TYPE,
        headers={"Content-Language": language, "Vary": "Accept, Accept-Language"},
    )
