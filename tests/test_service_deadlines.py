"""Work nobody waits for never starts, and admission is held until the work really ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.handling import AssessmentService, _work_kind
from service.app import create_app
from service.io.uploads import Photo
from service.settings import Settings
from tests import service_inputs as make

FRAME = make.encode(np.zeros((100, 100, 3), np.uint8))
JPEG = {"content-type": "image/jpeg"}


class GatedPipeline:
    """Stands in for `Pipeline.assess`: counts the runs, and the first one waits for the test's signal."""

    def __init__(self, real_assess: object) -> None:
        self.real_assess = real_assess
        self.runs = 0
        self.first_started, self.release_first = threading.Event(), threading.Event()

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.runs += 1
        if self.runs == 1:
            self.first_started.set()
            assert self.release_first.wait(30), "the test never released the first run"
        return self.real_assess(*args, **kwargs)  # type: ignore[operator]


@pytest.fixture()
def one_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, GatedPipeline]]:
    settings = Settings(request_deadline_s=0.3, inference_workers=1, overlap_stages=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        service: AssessmentService = client.app.state.service
        gate = GatedPipeline(service.pipeline.assess)
        monkeypatch.setattr(service.pipeline, "assess", gate)
        yield client, gate
        gate.release_first.set()


def _wait_until_idle(service: AssessmentService) -> None:
    """Wait (bounded) for the admitted count to come back to zero, as the running work finishes."""
    finished = threading.Event()
    for _ in range(300):
        if service.admission.inflight == 0:
            finished.set()
            break
        finished.wait(0.01)
    assert finished.is_set(), f"{service.admission.inflight} units still admitted with nothing to do"


def test_a_request_whose_deadline_passes_in_the_queue_never_runs(
    one_worker: tuple[TestClient, GatedPipeline],
) -> None:
    client, gate = one_worker
    service: AssessmentService = client.app.state.service
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/quality", content=FRAME, headers=JPEG)
        assert gate.first_started.wait(10)
        queued = client.post("/v1/quality", content=FRAME, headers=JPEG)  # waits behind the first
        assert queued.status_code == 504 and queued.json()["code"] == "deadline_exceeded"
        assert first.result(10).status_code == 504  # its client gave up too, but its work goes on
        # The first pipeline still runs, so its unit is still admitted; the queued one's came back.
        assert service.admission.inflight == 1
        gate.release_first.set()
    _wait_until_idle(service)
    assert gate.runs == 1, "the request dropped in the queue still ran its pipeline"
    fresh = client.post("/v1/quality", content=FRAME, headers=JPEG)
    assert fresh.status_code == 200, "a request after the burst must not inherit its queue"
    assert gate.runs == 2
    assert "cervigate_work_dropped_total 1.0" in client.get("/metrics").text


def test_work_still_running_holds_admission_so_max_inflight_bounds_the_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(request_deadline_s=0.3, inference_workers=1, max_inflight=1, overlap_stages=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        service: AssessmentService = client.app.state.service
        gate = GatedPipeline(service.pipeline.assess)
        monkeypatch.setattr(service.pipeline, "assess", gate)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/quality", content=FRAME, headers=JPEG)
            assert gate.first_started.wait(10)
            assert first.result(10).status_code == 504
            shed = client.post("/v1/quality", content=FRAME, headers=JPEG)
            assert shed.status_code == 503 and shed.json()["code"] == "overloaded"
            assert shed.headers["retry-after"] == str(settings.retry_after_s)
            gate.release_first.set()
        _wait_until_idle(service)
        assert client.post("/v1/quality", content=FRAME, headers=JPEG).status_code == 200


def test_queued_work_whose_turn_comes_too_late_for_its_kind_is_dropped_but_a_free_worker_always_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(request_deadline_s=1.0, inference_workers=1, overlap_stages=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        service: AssessmentService = client.app.state.service
        gate = GatedPipeline(service.pipeline.assess)
        monkeypatch.setattr(service.pipeline, "assess", gate)
        kind = _work_kind(False, Photo([FRAME]))
        service.durations.record(kind, 10.0)  # such work took 10 s lately: more than any deadline left
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/quality", content=FRAME, headers=JPEG)
            assert gate.first_started.wait(10)  # found the worker free: runs whatever the estimate says
            queued = pool.submit(client.post, "/v1/quality", content=FRAME, headers=JPEG)
            for _ in range(500):  # wait (bounded) until the second job is queued behind the first
                if service._outstanding == 2:
                    break
                time.sleep(0.01)
            assert service._outstanding == 2
            gate.release_first.set()
            assert first.result(10).status_code == 200
            assert queued.result(10).status_code == 504
        assert gate.runs == 1, "a queued job that could not finish in time still ran"
