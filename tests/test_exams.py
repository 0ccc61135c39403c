"""`POST /v1/exams` end to end on real atlas cases and the shipped models, plus its admission rule."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.handling import Admission
from service.app import create_app
from service.pipeline.case_risk import METHOD
from service.render.problems import ProblemError
from service.render.reasons import ADVICE, Reason
from service.render.review import VERDICT_COLOURS, outline
from service.settings import Settings
from service.telemetry import Metrics
from tests import service_inputs as make

pytestmark = pytest.mark.slow  # loads the four models once per module

SMALL = Settings(max_exam_photos=3, max_exam_bytes=1_500_000, max_upload_bytes=400_000)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(SMALL)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def case_aaan(atlas_root: Path) -> dict[str, bytes]:
    """Case AAAN's photos by stage word, re-encoded below the small test limits."""
    folder = atlas_root / "images_high_grade" / "case_AAAN"
    return {
        stage: make.encode(Image.open(next(folder.glob(f"*{pattern}*.jpg"))).convert("RGB"))
        for stage, pattern in (
            ("speculum", "Speculum_examination"),
            ("saline", "saline"),
            ("acetic", "acetic"),
        )
    }


def _exam(client: TestClient, photos: list[bytes], stages: str | None = None, **params: str):
    files = [("image", (f"photo{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    data = {"stages": stages} if stages is not None else None
    return client.post("/v1/exams", files=files, data=data, params=params)


def _ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _problem(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code


def test_a_full_case_is_assessed_photo_by_photo_and_as_one_exam(client: TestClient, case_aaan) -> None:
    photos = [case_aaan["speculum"], case_aaan["saline"], case_aaan["acetic"]]
    body = _ok(_exam(client, photos, "auto,saline,acetic"))
    assert [p["index"] for p in body["photos"]] == [0, 1, 2]
    assert all(p["problem"] is None and p["assessment"] is not None for p in body["photos"])
    assert [p["stage_source"] for p in body["photos"]] == ["model", "hint", "hint"]
    assert body["photos"][0]["assessment"]["id"] == f"{body['id']}/0"

    saline = body["photos"][1]
    assert saline["stage"] == "saline" and saline["assessment"]["diagnosis"] is None
    assert "not_acetic" not in [r["code"] for r in saline["assessment"]["reasons"]]

    acetic = body["photos"][2]["assessment"]
    assert acetic["decision"] == "diagnosis"  # the same photo /v1/assess diagnoses (test_service_api)
    assert body["decision"] == "diagnosis" and body["advice"] is None
    diagnosis = body["diagnosis"]
    assert diagnosis["method"] == METHOD
    # The saline photo counts now: the case model reads its whiteness (whitening = acetic - saline).
    assert {1, 2} <= set(diagnosis["photos_used"])
    alone = body["photos"][2]["assessment"]["diagnosis"]["probability"]
    assert 0.0 <= diagnosis["probability"] <= 1.0 and diagnosis["probability"] != pytest.approx(alone)
    assert body["review_index"] == 2  # the photo to review is an acetic-acid one the diagnosis used
    retaken = {r["index"] for r in body["retake"]}
    assert retaken == {p["index"] for p in body["photos"] if p["assessment"]["decision"] == "recapture"}


def test_a_blurred_photo_is_retaken_and_left_out_of_the_exam_probability(
    client: TestClient, case_aaan
) -> None:
    shaken = make.encode(make.shaken(Image.open(io.BytesIO(case_aaan["acetic"]))))
    body = _ok(_exam(client, [case_aaan["saline"], case_aaan["acetic"], shaken], "saline,acetic,acetic"))
    retake = {r["index"]: r for r in body["retake"]}
    assert 2 in retake and retake[2]["reasons"][0]["code"] in ("motion_blur", "out_of_focus")
    assert retake[2]["advice"] == ADVICE["en"][Reason(retake[2]["reasons"][0]["code"])]
    assert body["diagnosis"]["photos_used"] == [0, 1]
    # The retaken photo leaves no trace: the same exam without it gives the same probability.
    without = _ok(_exam(client, [case_aaan["saline"], case_aaan["acetic"]], "saline,acetic"))
    assert body["diagnosis"]["probability"] == pytest.approx(without["diagnosis"]["probability"], abs=1e-6)
    assert body["review_index"] == 1


def test_an_undecodable_part_gets_its_own_problem_and_the_others_are_assessed(
    client: TestClient, case_aaan
) -> None:
    broken = b"\xff\xd8\xff" + bytes(range(256)) * 8
    single = client.post("/v1/assess", content=broken, headers={"content-type": "image/jpeg"})
    body = _ok(_exam(client, [case_aaan["acetic"], broken, b""]))
    first, second, third = body["photos"]
    assert first["assessment"]["decision"] == "diagnosis" and first["problem"] is None
    assert second["assessment"] is None and second["stage"] is None
    assert (second["problem"]["status"], second["problem"]["code"]) == (
        single.status_code,
        single.json()["code"],
    )
    assert third["problem"]["code"] == "empty_upload"
    assert {r["index"]: r["problem"] for r in body["retake"]} == {1: "undecodable_image", 2: "empty_upload"}
    assert body["decision"] == "diagnosis" and body["diagnosis"]["photos_used"] == [0]


def test_an_exam_of_unreadable_photos_is_refused_as_a_whole(client: TestClient) -> None:
    response = _exam(client, [b"not a photo", b"\xff\xd8\xff" + bytes(range(256)) * 8])
    _problem(response, 422, "undecodable_image")
    assert response.json()["detail"].startswith("no photo could be assessed")


def test_an_oversize_photo_is_refused_alone(client: TestClient, case_aaan) -> None:
    big = make.encode(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8), "PNG")
    assert SMALL.max_upload_bytes < len(big) < SMALL.max_exam_bytes
    body = _ok(_exam(client, [big, case_aaan["acetic"]]))
    assert body["photos"][0]["problem"]["code"] == "upload_too_large"
    assert body["photos"][0]["problem"]["status"] == 413
    assert body["decision"] == "diagnosis"


def test_an_exam_without_an_acetic_acid_photo_asks_for_one(client: TestClient, case_aaan) -> None:
    body = _ok(_exam(client, [case_aaan["saline"]], "saline"))
    assert body["decision"] == "recapture" and body["diagnosis"] is None
    assert [r["code"] for r in body["reasons"]] == ["not_acetic"]
    assert body["advice"] == ADVICE["en"][Reason.NOT_ACETIC]


def test_advice_follows_the_language(client: TestClient, case_aaan) -> None:
    response = client.post(
        "/v1/exams",
        files=[("image", ("a.jpg", case_aaan["saline"], "image/jpeg"))],
        data={"stages": "saline"},
        headers={"Accept-Language": "sw"},
    )
    assert _ok(response)["advice"] == ADVICE["sw"][Reason.NOT_ACETIC]
    assert response.headers["content-language"] == "sw"


def test_the_contact_sheet_shows_every_photo(client: TestClient, case_aaan) -> None:
    photos = [case_aaan["saline"], case_aaan["acetic"], b"not a photo"]
    body = _ok(_exam(client, photos, "saline,acetic,acetic", include="contact_sheet,overlay"))
    sheet = Image.open(io.BytesIO(base64.b64decode(body["contact_sheet_jpeg"])))
    assert sheet.format == "JPEG" and sheet.size == (3 * 192, 192 + 22)
    assert body["photos"][1]["assessment"]["lesion"]["overlay_jpeg"]
    pixels = np.asarray(sheet).astype(int)
    tile = 192
    assert pixels[40:150, tile + 40 : tile + 150].std() > 10, "the acetic photo's crop is not drawn"
    assert pixels[40:150, 2 * tile + 40 : 2 * tile + 150].std() < 3, "an unreadable photo has no crop to show"
    frame = pixels[96, 2 * tile + 3]  # the unreadable photo's frame, in the retake colour
    assert np.abs(frame - np.array(VERDICT_COLOURS["retake"])).max() < 40
    caption = pixels[tile + 5 : tile + 22, 2 * tile : 3 * tile]
    assert caption.std() > 5, "no caption under the photo"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"files": [("other", ("a.txt", b"x", "text/plain"))]}, 422, "missing_image"),
        (
            {"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}},
            415,
            "unsupported_media_type",
        ),
        ({"files": [("image", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(4)]}, 422, "too_many_photos"),
        (
            {"files": [("image", ("a.jpg", b"x", "image/jpeg"))], "data": {"stages": "saline,acetic"}},
            422,
            "invalid_stages",
        ),
        (
            {"files": [("image", ("a.jpg", b"x", "image/jpeg"))], "data": {"stages": "lugol"}},
            422,
            "invalid_stages",
        ),
        (
            {
                "files": [
                    ("image", ("a.jpg", b"x", "image/jpeg")),
                    ("stages", (None, "acetic")),
                    ("stages", (None, "saline")),
                ]
            },
            422,
            "invalid_stages",
        ),
        (
            {
                "files": [
                    ("image", ("a.jpg", b"x", "image/jpeg")),
                    ("stages", ("s.txt", b"bogus", "text/plain")),  # sent as a file: still the stages
                ]
            },
            422,
            "invalid_stages",
        ),
        ({"files": [("image", ("a.jpg", b"x" * 1_600_000, "image/jpeg"))]}, 413, "upload_too_large"),
    ],
    ids=[
        "no-image",
        "not-multipart",
        "too-many",
        "stages-count",
        "stages-word",
        "stages-twice",
        "stages-as-a-file",
        "over-total",
    ],
)
def test_a_bad_exam_request_gets_one_problem(
    client: TestClient, request_kwargs, status: int, code: str
) -> None:
    _problem(client.post("/v1/exams", **request_kwargs), status, code)


def _sample(text: str, name: str) -> float:
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def test_exam_metrics_count_exams_and_photos(client: TestClient, case_aaan) -> None:
    before = client.get("/metrics").text
    _ok(_exam(client, [case_aaan["saline"], case_aaan["acetic"]], "saline,acetic"))
    text = client.get("/metrics").text
    assert 'cervigate_exams_total{decision="diagnosis"}' in text
    assert 'cervigate_exam_photos_total{outcome="used"}' in text
    for name, grew_by in (("cervigate_exam_size_photos_count", 1), ("cervigate_exam_size_photos_sum", 2),
                          ("cervigate_exam_duration_seconds_count", 1)):  # fmt: skip
        assert _sample(text, name) - _sample(before, name) == grew_by, name


def test_an_exam_counts_its_photos_against_admission() -> None:
    admission = Admission(Settings(max_inflight=3), Metrics())

    async def scenario() -> None:
        async with admission.slot() as alone:
            admission.grow(alone, 4)  # alone: let through even beyond the bound
            assert admission.inflight == 5
        assert admission.inflight == 0
        async with admission.slot(), admission.slot() as exam:
            with pytest.raises(ProblemError) as shed:
                admission.grow(exam, 2)  # 2 admitted + 2 more photos > 3
            assert shed.value.status == 503 and shed.value.code == "overloaded"
            admission.grow(exam, 1)
            assert admission.inflight == 3
        assert admission.inflight == 0

    anyio.run(scenario)


def test_the_review_outline_is_the_lesion_edge() -> None:
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    edge = outline(mask)
    assert edge[5, 5:15].all() and edge[5:15, 5].all()  # the top and left sides
    assert not edge[8:13, 8:13].any() and not edge[:4].any()  # neither the inside nor far outside
