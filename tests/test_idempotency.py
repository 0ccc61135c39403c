"""`Idempotency-Key` on /v1/assess and /v1/exams end to end on the shipped models and real atlas photos.

Pipeline runs are counted by wrapping the running service's `pipeline.assess`, the one call every assessed
photo makes, so "not assessed again" is observed, not inferred from the answer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Response
from fastapi.testclient import TestClient

from service.api import access
from service.api.idempotency import IdempotencyKey, IdempotencyStore
from service.app import create_app
from service.render.problems import ProblemError
from service.settings import Settings
from service.telemetry import Metrics

pytestmark = pytest.mark.slow  # loads the four models once per module
CLINIC_A, CLINIC_B = "clinic-a-key", "clinic-b-key"
MAX_BYTES = 120_000  # two answers with an overlay (40-60 KB each here) fit, four do not


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(api_keys=[CLINIC_A, CLINIC_B], idempotency_max_bytes=MAX_BYTES)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photos(atlas_root: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(atlas_root.glob("images_*/case_*/*acetic*.jpg"))[:6]]


class Runs:
    """Counts the pipeline's assessments; `gate` (when set) holds each one until it is opened."""

    def __init__(self, assess: Callable[..., Any]) -> None:
        self.count = 0
        self.started = threading.Event()
        self.gate: threading.Event | None = None
        self._assess = assess

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        return self._assess(*args, **kwargs)


@pytest.fixture
def runs(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Runs:
    pipeline = client.app.state.service.pipeline  # type: ignore[attr-defined]
    counter = Runs(pipeline.assess)
    monkeypatch.setattr(pipeline, "assess", counter)
    return counter


def _headers(key: str | None, api_key: str = CLINIC_A) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key}"}
    return headers | ({"Idempotency-Key": key} if key is not None else {})


def _multipart(photo: bytes, boundary: str) -> tuple[bytes, str]:
    """The body a browser builds from a FormData: the same photo gets a new boundary on every send."""
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _assess(
    client: TestClient, photo: bytes, key: str | None, api_key: str = CLINIC_A, **params: str
) -> httpx.Response:
    files = {"image": ("p.jpg", photo, "image/jpeg")}
    return client.post("/v1/assess", files=files, params=params, headers=_headers(key, api_key))


def _replays(client: TestClient, endpoint: str) -> float:
    text = client.get("/metrics").text
    line = f'cervigate_idempotent_replays_total{{endpoint="{endpoint}"}} '
    found = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
    return found[0] if found else 0.0


def test_a_repeat_gets_the_stored_answer_without_a_second_assessment(
    client: TestClient, runs: Runs, photos: list[bytes]
) -> None:
    replays_before = _replays(client, "/v1/assess")
    answers = []
    for boundary in ("first-send-boundary", "second-send-boundary"):  # a retry's new boundary is no new body
        body, content_type = _multipart(photos[0], boundary)
        headers = _headers("visit-1-photo-1") | {"Content-Type": content_type}
        answers.append(client.post("/v1/assess", content=body, headers=headers))
    first, second = answers
    assert first.status_code == second.status_code == 200, first.text
    assert runs.count == 1
    assert second.content == first.content  # byte for byte, the first answer's id included
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "visit-1-photo-1"
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Content-Type"] == first.headers["Content-Type"] == "application/json"
    assert second.headers["X-Request-ID"] != first.headers["X-Request-ID"]  # a request of its own
    assert _replays(client, "/v1/assess") == replays_before + 1


def test_without_a_key_every_request_is_assessed(client: TestClient, runs: Runs, photos: list[bytes]) -> None:
    for _ in range(2):
        assert _assess(client, photos[0], None).status_code == 200
    assert runs.count == 2


def test_a_repeat_during_the_first_waits_for_its_answer(
    client: TestClient, runs: Runs, photos: list[bytes]
) -> None:
    """The second request arrives while the first one's pipeline is held; both get one assessment."""
    runs.gate = threading.Event()
    key = IdempotencyKey("concurrent-1", access.digest(CLINIC_A))
    store = client.app.state.service.idempotency  # type: ignore[attr-defined]
    answers: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        answers[name] = _assess(client, photos[1], key.value)

    first = threading.Thread(target=post, args=("first",))
    first.start()
    assert runs.started.wait(30), "the first request never reached the pipeline"
    second = threading.Thread(target=post, args=("second",))
    second.start()
    for _ in range(3000):  # until the second is parked on the first one's answer (not a timing bound)
        if store.waiting(key) == 1:
            break
        time.sleep(0.01)
    assert store.waiting(key) == 1
    runs.gate.set()
    first.join(60)
    second.join(60)
    assert answers["first"].status_code == answers["second"].status_code == 200
    assert runs.count == 1
    assert answers["second"].content == answers["first"].content
    assert answers["second"].headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    ("path", "params", "other_photo"),
    [("/v1/assess", {}, True), ("/v1/assess", {"include": "overlay"}, False), ("/v1/exams", {}, False)],
    ids=["another-photo", "another-query", "another-endpoint"],
)
def test_a_key_reused_for_another_request_is_refused(
    client: TestClient,
    runs: Runs,
    photos: list[bytes],
    path: str,
    params: dict[str, str],
    other_photo: bool,
) -> None:
    key = f"reused-{path.rsplit('/', 1)[-1]}-{len(params)}-{other_photo}"
    assert _assess(client, photos[2], key).status_code == 200
    files = {"image": ("p.jpg", photos[3] if other_photo else photos[2], "image/jpeg")}
    response = client.post(path, files=files, params=params, headers=_headers(key))
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_reused"
    assert response.headers["Idempotency-Key"] == key
    assert runs.count == 1


@pytest.mark.parametrize("key", ["", "a" * 65, "has space", "dot.ted", "slash/ed"])
def test_an_invalid_key_is_refused(client: TestClient, runs: Runs, photos: list[bytes], key: str) -> None:
    response = _assess(client, photos[0], key)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_idempotency_key"
    assert runs.count == 0


def test_a_refused_request_is_not_stored_so_it_can_be_retried(
    client: TestClient, runs: Runs, photos: list[bytes]
) -> None:
    refused = _assess(client, b"not a photo at all", "retry-after-refusal")
    assert refused.status_code == 422
    assert refused.json()["code"] == "undecodable_image"
    assert refused.headers["Idempotency-Key"] == "retry-after-refusal"
    retried = _assess(client, photos[0], "retry-after-refusal")
    assert retried.status_code == 200
    assert "Idempotent-Replayed" not in retried.headers


def test_stored_answers_are_bounded_in_bytes_least_recently_used_out(
    client: TestClient, runs: Runs, photos: list[bytes]
) -> None:
    store = client.app.state.service.idempotency  # type: ignore[attr-defined]
    keys = [f"evict-{index}" for index in range(4)]
    sizes = []
    for key, photo in zip(keys, photos[:4], strict=True):
        response = _assess(client, photo, key, include="overlay")
        assert response.status_code == 200
        assert response.json()["lesion"]["overlay_jpeg"]  # 40-60 KB answers
        sizes.append(len(response.content))
        assert store.bytes <= MAX_BYTES
    assert sum(sizes) > MAX_BYTES  # so something had to go
    assessed = runs.count
    newest = _assess(client, photos[3], keys[3], include="overlay")
    assert newest.headers.get("Idempotent-Replayed") == "true"
    oldest = _assess(client, photos[0], keys[0], include="overlay")
    assert oldest.status_code == 200
    assert "Idempotent-Replayed" not in oldest.headers  # evicted: assessed again
    assert runs.count == assessed + 1


def test_keys_are_scoped_per_api_key(client: TestClient, runs: Runs, photos: list[bytes]) -> None:
    """Two clinics that happen to pick the same key neither see nor block each other's answers."""
    a = _assess(client, photos[0], "same-key-two-clinics", CLINIC_A)
    b = _assess(client, photos[4], "same-key-two-clinics", CLINIC_B)  # another photo: no 422 across clinics
    assert a.status_code == b.status_code == 200
    assert "Idempotent-Replayed" not in b.headers
    assert (
        _assess(client, photos[0], "same-key-two-clinics", CLINIC_A).headers["Idempotent-Replayed"] == "true"
    )
    assert (
        _assess(client, photos[4], "same-key-two-clinics", CLINIC_B).headers["Idempotent-Replayed"] == "true"
    )
    assert runs.count == 2


def test_an_exam_is_replayed_too(client: TestClient, runs: Runs, photos: list[bytes]) -> None:
    files = [("image", (f"{i}.jpg", photo, "image/jpeg")) for i, photo in enumerate(photos[:2])]
    replays_before = _replays(client, "/v1/exams")
    answers = [
        client.post("/v1/exams", files=files, data={"stages": "acetic,acetic"}, headers=_headers("exam-1"))
        for _ in range(2)
    ]
    assert answers[0].status_code == answers[1].status_code == 200, answers[0].text
    assert runs.count == 2  # the exam's two photos, once
    assert answers[1].content == answers[0].content
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    assert _replays(client, "/v1/exams") == replays_before + 1
    other_stages = client.post(
        "/v1/exams", files=files, data={"stages": "saline,acetic"}, headers=_headers("exam-1")
    )
    assert other_stages.json()["code"] == "idempotency_key_reused"


def test_the_openapi_schema_documents_the_header(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/v1/assess", "/v1/exams"):
        operation = schema["paths"][path]["post"]
        header = next(p for p in operation["parameters"] if p["name"] == "idempotency-key")
        assert header["in"] == "header"
        assert header["schema"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
        assert "Idempotent-Replayed" in operation["responses"]["200"]["headers"]
        assert "409" in operation["responses"]


def test_a_repeat_that_outwaits_the_first_is_told_to_retry_and_a_failed_first_lets_it_compute() -> None:
    """The store alone, on its own event loop: no models, no clock race."""
    store = IdempotencyStore(Settings(), Metrics())
    key = IdempotencyKey("slow-first")

    async def scenario() -> tuple[ProblemError, Response, int]:
        release, calls = asyncio.Event(), []

        async def slow() -> Response:
            calls.append("slow")
            await release.wait()
            raise ProblemError(504, "deadline_exceeded", "gave up")  # a failure: nothing is stored

        async def fast() -> Response:
            calls.append("fast")
            return Response(b"{}", media_type="application/json")

        first = asyncio.create_task(store.answer(key, b"same", slow, endpoint="/v1/assess", wait_s=10))
        await asyncio.sleep(0)  # the first registers as pending
        with pytest.raises(ProblemError) as impatient:
            await store.answer(key, b"same", fast, endpoint="/v1/assess", wait_s=0)
        waiter = asyncio.create_task(store.answer(key, b"same", fast, endpoint="/v1/assess", wait_s=10))
        await asyncio.sleep(0)
        assert store.waiting(key) == 1
        release.set()
        with pytest.raises(ProblemError):
            await first
        answer = await waiter  # the first failed: the waiter computed it itself
        return impatient.value, answer, len(calls)

    impatient, answer, calls = asyncio.run(scenario())
    assert (impatient.status, impatient.code) == (409, "idempotency_key_in_use")
    assert impatient.headers["Retry-After"] == "1"
    assert answer.status_code == 200 and answer.headers["Idempotency-Key"] == "slow-first"
    assert calls == 2  # slow once, fast once (the impatient repeat never computed)
    assert len(store) == 1
