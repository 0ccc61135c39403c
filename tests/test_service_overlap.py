"""Overlapping independent stages on an idle slot: same answers, no busy slot borrowed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.api.handling import AssessmentService
from service.inference.runtime import ModelSet, load_models
from service.pipeline.spare import NO_SPARE_CORES, SpareCores
from service.pipeline.stages import Assessment, Lesion, Pipeline
from service.settings import Settings
from service.telemetry import Metrics


def _all_free(slots: threading.BoundedSemaphore, count: int) -> bool:
    taken = [slots.acquire(blocking=False) for _ in range(count)]
    for ok in taken:
        if ok:
            slots.release()
    return all(taken)


def test_a_side_task_runs_only_on_an_idle_slot_and_gives_it_back() -> None:
    slots = threading.BoundedSemaphore(2)
    spare = SpareCores(slots, 2)
    started, release = threading.Event(), threading.Event()

    def side() -> str:
        started.set()
        release.wait(5)
        return threading.current_thread().name

    with slots:  # the request's own slot
        future = spare.try_submit(side)
        assert future is not None and started.wait(5)
        assert spare.try_submit(lambda: "never") is None  # both slots busy: nothing is borrowed
        release.set()
        assert future.result(5).startswith("cervigate-spare")
    assert _all_free(slots, 2)
    spare.close()
    assert spare.try_submit(lambda: "after close") is None and _all_free(slots, 2)
    assert NO_SPARE_CORES.try_submit(lambda: "inline") is None


def test_nothing_is_borrowed_while_every_slot_is_spoken_for() -> None:
    slots, admitted = threading.BoundedSemaphore(2), [2]
    spare = SpareCores(slots, 2, demand=lambda: admitted[0])
    assert spare.try_submit(lambda: "busy") is None  # two requests admitted: each needs its own slot
    admitted[0] = 1
    future = spare.try_submit(lambda: "idle")
    assert future is not None and future.result(5) == "idle"
    spare.close()


@pytest.fixture(scope="module")
def models() -> ModelSet:
    return load_models(Settings())


@pytest.fixture()
def overlapping(models: ModelSet) -> Iterator[tuple[Pipeline, threading.BoundedSemaphore]]:
    slots = threading.BoundedSemaphore(2)
    spare = SpareCores(slots, 2)
    yield Pipeline(models, Settings(), spare), slots
    spare.close()


def _assess_holding_a_slot(pipeline: Pipeline, slots: threading.BoundedSemaphore, data: bytes) -> Assessment:
    with slots:  # as AssessmentService does for the request's own thread
        return pipeline.assess(data, diagnose=True)


def test_overlapped_stages_give_the_sequential_answer(
    models: ModelSet,
    overlapping: tuple[Pipeline, threading.BoundedSemaphore],
    atlas_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline, slots = overlapping
    segment_threads: list[str] = []
    segment = pipeline.segment

    def recording_segment(crop_rgb: np.ndarray) -> Lesion:
        segment_threads.append(threading.current_thread().name)
        return segment(crop_rgb)

    monkeypatch.setattr(pipeline, "segment", recording_segment)
    sequential = Pipeline(models, Settings())
    photos = sorted(atlas_root.glob("images_*/case_*/*acetic*.jpg"))[:3]
    diagnosed = 0
    for path in photos:
        data = path.read_bytes()
        expected, got = sequential.assess(data, diagnose=True), _assess_holding_a_slot(pipeline, slots, data)
        assert got.reasons == expected.reasons and got.decision == expected.decision, path.name
        if expected.diagnosis is not None:
            diagnosed += 1
            assert got.diagnosis is not None and got.lesion is not None and expected.lesion is not None
            # Two half batches instead of one batch of six: the same sums in another blocking order.
            assert got.diagnosis.probability == pytest.approx(expected.diagnosis.probability, abs=1e-5)
            assert got.lesion.area_fraction == expected.lesion.area_fraction
            assert {"segment", "classify"} <= got.timings_ms.keys()
    assert diagnosed >= 1, "none of the photos reached a diagnosis, so voting was never overlapped"
    assert segment_threads and all(name.startswith("cervigate-spare") for name in segment_threads)
    assert _all_free(slots, 2)


def test_a_recapture_drops_the_early_segmentation_and_frees_its_slot(
    overlapping: tuple[Pipeline, threading.BoundedSemaphore],
    atlas_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline, slots = overlapping
    submitted: list[object] = []
    try_submit = pipeline.spare.try_submit

    def recording_submit(task: object) -> object:
        future = try_submit(task)  # type: ignore[arg-type]
        submitted.append(future)
        return future

    monkeypatch.setattr(pipeline.spare, "try_submit", recording_submit)
    iodine = sorted(atlas_root.glob("images_*/case_*/*iodine*.jpg"))[0].read_bytes()
    result = _assess_holding_a_slot(pipeline, slots, iodine)
    assert result.decision == "recapture" and result.lesion is None and "segment" not in result.timings_ms
    assert any(future is not None for future in submitted), "no early segmentation ran on the spare slot"
    deadline = time.monotonic() + 5
    while not _all_free(slots, 2) and time.monotonic() < deadline:  # the dropped segmentation finishing
        time.sleep(0.01)
    assert _all_free(slots, 2)


def test_the_service_lends_an_idle_slot_only_while_fewer_requests_are_admitted_than_workers(
    models: ModelSet,
) -> None:
    service = AssessmentService(Settings(inference_workers=2), models, Metrics())
    try:
        borrowed = service.spare.try_submit(lambda: "idle slot")
        assert borrowed is not None and borrowed.result(5) == "idle slot"
        service.admission.inflight = 2  # as many requests admitted as workers: each will want its slot
        assert service.spare.try_submit(lambda: "busy") is None
    finally:
        service.admission.inflight = 0
        service.close()


def test_no_overlap_with_one_worker_or_when_switched_off(models: ModelSet) -> None:
    for settings in (Settings(inference_workers=1), Settings(inference_workers=2, overlap_stages=False)):
        service = AssessmentService(settings, models, Metrics())
        assert service.spare.try_submit(lambda: None) is None
