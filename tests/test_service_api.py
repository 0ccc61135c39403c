"""The REST service end to end on the shipped models: `with TestClient(app)` so the lifespan runs."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.inference.manifest import ModelIntegrityError, read_manifest
from service.inference.runtime import MODEL_NAMES, ModelConfigurationError
from service.pipeline.stages import Detection
from service.render.reasons import ADVICE, MESSAGES
from service.settings import REPO_MODELS_DIR, Settings
from service.telemetry import JsonFormatter
from tests import service_inputs as make

pytestmark = pytest.mark.slow  # loads the four models once per module


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings())) as test_client:
        yield test_client


def _atlas_photos(root: Path, stage: str) -> list[Path]:
    return sorted(root.glob(f"images_*/case_*/*{stage}*.jpg"))


@pytest.fixture(scope="module")
def acetic_photo(atlas_root: Path) -> Image.Image:
    """A real acetic-acid photo that the service accepts as a good capture (the first in path order)."""
    return Image.open(_atlas_photos(atlas_root, "acetic")[0]).convert("RGB")


def _post(client: TestClient, data: bytes, path: str = "/v1/assess", **headers: str) -> dict:
    response = client.post(path, files={"image": ("photo.jpg", data, "image/jpeg")}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _codes(body: dict) -> list[str]:
    return [reason["code"] for reason in body["reasons"]]


# --- good photos ----------------------------------------------------------------------------------------


def test_real_acetic_photos_mostly_get_a_diagnosis(client: TestClient, atlas_root: Path) -> None:
    photos = _atlas_photos(atlas_root, "acetic")[:8]
    bodies = [_post(client, path.read_bytes()) for path in photos]
    diagnosed = [b for b in bodies if b["decision"] == "diagnosis"]
    assert len(diagnosed) >= 5, [_codes(b) for b in bodies]
    for body in diagnosed:
        assert body["reasons"] == [] and body["advice"] is None
        assert body["cervix"]["found"] and len(body["cervix"]["box"]) == 4
        assert 0.0 <= body["diagnosis"]["probability"] <= 1.0
        assert body["diagnosis"]["referral"] == (body["diagnosis"]["label"] == "cin2plus")
        assert 0.0 <= body["lesion"]["area_fraction"] <= 1.0
        assert set(body["timings_ms"]) == {"decode", "detect", "quality", "segment", "classify", "total"}
        assert set(body["models"]) == set(MODEL_NAMES)


def test_raw_body_and_multipart_give_the_same_answer(client: TestClient, acetic_photo: Image.Image) -> None:
    data = make.encode(acetic_photo)
    multipart = _post(client, data)
    raw = client.post("/v1/assess", content=data, headers={"content-type": "image/jpeg"}).json()
    assert raw["decision"] == multipart["decision"] == "diagnosis"
    assert raw["diagnosis"] == multipart["diagnosis"]
    assert raw["cervix"] == multipart["cervix"]


def test_quality_endpoint_gates_without_diagnosing(client: TestClient, acetic_photo: Image.Image) -> None:
    frame = acetic_photo.resize((640, 480))
    body = _post(client, make.encode(frame), path="/v1/quality")
    assert body["decision"] == "accept"
    assert body["diagnosis"] is None and body["lesion"] is None
    assert body["quality"]["exam_stage"] in ("acetic", "saline", "iodine", "green")
    assert "segment" not in body["timings_ms"]


def test_a_12_megapixel_photo_is_boxed_in_its_own_pixels(
    client: TestClient, acetic_photo: Image.Image
) -> None:
    small = _post(client, make.encode(acetic_photo))
    big = _post(client, make.encode(acetic_photo.resize((4032, 3024), Image.Resampling.LANCZOS)))
    assert big["decision"] == small["decision"] == "diagnosis"
    scale = 4032 / acetic_photo.width
    np.testing.assert_allclose(
        big["cervix"]["box"], np.array(small["cervix"]["box"]) * scale, atol=0.03 * 4032
    )
    assert abs(big["diagnosis"]["probability"] - small["diagnosis"]["probability"]) < 0.15


def test_mask_and_overlay_on_request(client: TestClient, acetic_photo: Image.Image) -> None:
    response = client.post(
        "/v1/assess?include=mask,overlay", files={"image": ("p.jpg", make.encode(acetic_photo), "image/jpeg")}
    )
    assert response.status_code == 200 and response.json()["decision"] == "diagnosis"
    lesion = response.json()["lesion"]
    mask = Image.open(io.BytesIO(base64.b64decode(lesion["mask_png"])))
    overlay = Image.open(io.BytesIO(base64.b64decode(lesion["overlay_jpeg"])))
    assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert overlay.format == "JPEG" and max(overlay.size) <= 512 and not overlay.getexif()
    assert abs(float(np.mean(np.asarray(mask) == 255)) - lesion["area_fraction"]) < 0.02
    x0, y0, x1, y1 = lesion["region"]
    assert 0 <= x0 < x1 <= acetic_photo.width and 0 <= y0 < y1 <= acetic_photo.height


# --- every reason code from a constructed input -----------------------------------------------------------


def test_defocused_copy_is_sent_back_for_focus(client: TestClient, acetic_photo: Image.Image) -> None:
    body = _post(client, make.encode(make.defocused(acetic_photo)))
    assert body["decision"] == "recapture"
    assert _codes(body)[0] in ("out_of_focus", "motion_blur")
    assert body["advice"] == ADVICE["en"][body["reasons"][0]["code"]]


def test_shaken_copy_is_sent_back_for_blur(client: TestClient, acetic_photo: Image.Image) -> None:
    body = _post(client, make.encode(make.shaken(acetic_photo)))
    assert body["decision"] == "recapture"
    # The blur-kind head is at chance on real photos (quality model card), so either blur reason is right.
    assert _codes(body)[0] in ("motion_blur", "out_of_focus")


@pytest.mark.parametrize(
    ("degrade", "code"),
    [
        (lambda im: make.gained(im, 0.35), "too_dark"),
        (lambda im: make.gained(im, 2.4), "overexposed"),
        (make.glared, "glare"),
    ],
    ids=["dark", "overexposed", "glare"],
)
def test_constructed_bad_capture_gets_its_reason(
    client: TestClient, acetic_photo: Image.Image, degrade, code
) -> None:
    body = _post(client, make.encode(degrade(acetic_photo)))
    assert body["decision"] == "recapture"
    assert code in _codes(body), _codes(body)
    assert body["diagnosis"] is None


@pytest.mark.parametrize(
    ("box", "code"),
    [((360, 270, 440, 330), "cervix_too_small"), ((0, 100, 380, 500), "cervix_cut_off")],
)
def test_framing_reasons_reach_the_response(
    client: TestClient, acetic_photo: Image.Image, monkeypatch: pytest.MonkeyPatch, box: tuple, code: str
) -> None:
    """The framing rules on a detector box, end to end (the rules themselves: test_service_rules.py)."""
    pipeline = client.app.state.service.pipeline
    monkeypatch.setattr(pipeline, "detect", lambda image: Detection(found=True, score=0.99, box=box))
    body = _post(client, make.encode(acetic_photo))
    assert body["decision"] == "recapture" and code in _codes(body)
    assert body["cervix"]["box"] == list(box) and body["advice"] == ADVICE["en"][_codes(body)[0]]


def test_iodine_photo_is_not_acetic(client: TestClient, atlas_root: Path) -> None:
    bodies = [_post(client, path.read_bytes()) for path in _atlas_photos(atlas_root, "iodine")[:4]]
    # The threshold catches 96 % of held-out iodine crops (quality model card): most, not necessarily all.
    assert sum("not_acetic" in _codes(body) for body in bodies) >= 3, [_codes(b) for b in bodies]


@pytest.mark.parametrize("name", ["astronaut", "coffee", "retina"])
def test_photo_without_a_cervix(client: TestClient, name: str) -> None:
    body = _post(client, make.encode(getattr(skimage.data, name)()[..., :3]))
    assert _codes(body) == ["no_cervix"]
    cervix = body["cervix"]
    assert cervix == {"found": False, "score": cervix["score"], "box": None, "distance": cervix["distance"]}
    # How unlike every learned cervix view the photo is: 1 - cosine similarity, so within [0, 2].
    assert isinstance(cervix["distance"], float) and 0.0 <= cervix["distance"] <= 2.0
    assert body["quality"] is None


def test_black_frame_is_a_lighting_problem_not_a_missing_cervix(client: TestClient) -> None:
    body = _post(client, make.encode(np.full((480, 640, 3), 4, np.uint8)))
    assert _codes(body) == ["too_dark"]


# --- formats and orientation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    ["png", "webp", "heic", "grey", "png16", "cmyk", "palette_alpha"],
)
def test_image_formats_and_modes_are_accepted(
    client: TestClient, acetic_photo: Image.Image, variant: str
) -> None:
    if variant == "heic":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    photo = acetic_photo
    data = {
        "png": lambda: make.encode(photo, "PNG"),
        "webp": lambda: make.encode(photo, "WEBP", quality=90),
        "heic": lambda: make.encode(photo, "HEIF", quality=90),
        "grey": lambda: make.encode(photo.convert("L")),
        "png16": lambda: make.encode(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
        "cmyk": lambda: make.encode(photo.convert("CMYK")),
        "palette_alpha": lambda: make.encode(photo.convert("RGBA").convert("P"), "PNG", transparency=0),
    }[variant]()
    response = client.post("/v1/quality", files={"image": ("p", data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    assert response.json()["cervix"]["found"]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_before_boxing(
    client: TestClient, acetic_photo: Image.Image, orientation: int
) -> None:
    upright = _post(client, make.encode(acetic_photo), path="/v1/quality")
    # Store the pixels the way a phone does: sideways, plus the tag that says how to turn them upright.
    stored = acetic_photo.transpose(
        {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[
            orientation
        ]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = _post(client, make.encode(stored, exif=exif), path="/v1/quality")
    np.testing.assert_allclose(
        tagged["cervix"]["box"], upright["cervix"]["box"], atol=0.04 * acetic_photo.width
    )


# --- bad requests ------------------------------------------------------------------------------------


def _problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def test_bad_requests_get_problem_details(client: TestClient) -> None:
    jpeg = make.encode(np.zeros((100, 100, 3), np.uint8))
    gif = make.encode(np.zeros((100, 100, 3), np.uint8), "GIF")
    cases = [
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        (dict(content=b"", headers={"content-type": "image/jpeg"}), 400, "empty_upload"),
        (
            dict(content=b"\xff\xd8\xff" + bytes(range(256)) * 8, headers={"content-type": "image/jpeg"}),
            422,
            "undecodable_image",
        ),
        (
            dict(content=jpeg[: len(jpeg) // 2], headers={"content-type": "image/jpeg"}),
            422,
            "undecodable_image",
        ),
        (dict(content=gif, headers={"content-type": "image/gif"}), 415, "unsupported_image_type"),
        (
            dict(
                content=make.encode(np.zeros((20, 20, 3), np.uint8)), headers={"content-type": "image/jpeg"}
            ),
            422,
            "image_too_small",
        ),
        (dict(files={"photo": ("p.jpg", jpeg, "image/jpeg")}), 422, "missing_image"),
        (
            dict(files=[("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.jpg", jpeg, "image/jpeg"))]),
            422,
            "duplicate_image",
        ),
        (
            dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
            400,
            "malformed_multipart",
        ),
    ]
    for kwargs, status, code in cases:
        _problem(client.post("/v1/assess", **kwargs), status, code)
    _problem(client.get("/v1/assess"), 405, "method_not_allowed")
    _problem(client.get("/v2/nothing"), 404, "not_found")
    _problem(
        client.post("/v1/assess?include=everything", content=jpeg, headers={"content-type": "image/jpeg"}),
        422,
        "invalid_request",
    )
    assert client.get("/readyz").status_code == 200  # still serving after all of that


def test_limits_come_from_settings() -> None:
    settings = Settings(max_upload_bytes=200_000, max_pixels=1_000_000)
    with TestClient(create_app(settings)) as small:
        big_file = make.encode(
            np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8), "PNG"
        )
        _problem(
            small.post("/v1/assess", content=big_file, headers={"content-type": "image/png"}),
            413,
            "upload_too_large",
        )
        many_pixels = make.encode(np.zeros((1200, 1600, 3), np.uint8))
        assert len(many_pixels) < 200_000
        _problem(
            small.post("/v1/assess", content=many_pixels, headers={"content-type": "image/jpeg"}),
            413,
            "too_many_pixels",
        )


def test_broken_multipart_bodies(client: TestClient) -> None:
    jpeg = make.encode(np.zeros((100, 100, 3), np.uint8))
    head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    truncated = head + jpeg  # no closing boundary: the upload was cut off
    many = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(40))
    for body in (truncated, many + b"--b--\r\n"):
        response = client.post(
            "/v1/assess", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        _problem(response, 400, "malformed_multipart")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_is_ignored_not_fatal(client: TestClient, acetic_photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Phone"
    data = bytearray(make.encode(acetic_photo, exif=exif))
    start = data.index(b"Exif\x00\x00") + 6
    data[start + 8 : start + 40] = b"\xff" * 32  # the first IFD entries: counts, types, offsets all garbage
    response = client.post("/v1/quality", content=bytes(data), headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert response.json()["cervix"]["found"]


def test_unexpected_error_is_a_logged_500_with_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(Settings()), raise_server_exceptions=False) as fresh:

        def explode(*args: object, **kwargs: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(fresh.app.state.service.pipeline, "assess", explode)
        response = fresh.post(
            "/v1/quality",
            content=make.encode(np.zeros((100, 100, 3), np.uint8)),
            headers={"content-type": "image/jpeg", "X-Request-ID": "trace-500"},
        )
        body = _problem(response, 500, "internal_error")
        assert "boom" not in body["detail"] and body["request_id"] == "trace-500"
        assert 'cervigate_rejected_total{cause="internal_error"} 1.0' in fresh.get("/metrics").text
        assert fresh.get("/readyz").status_code == 200


def test_overload_is_shed_with_retry_after(client: TestClient) -> None:
    admission = client.app.state.service.admission
    admission.inflight = admission.max_inflight  # as if that many requests were being served
    try:
        response = client.post("/v1/quality", content=b"x", headers={"content-type": "image/jpeg"})
    finally:
        admission.inflight = 0
    _problem(response, 503, "overloaded")
    assert int(response.headers["retry-after"]) >= 0


def test_animated_images_are_refused(client: TestClient) -> None:
    frames = [Image.fromarray(np.full((100, 100, 3), v, np.uint8)) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:])
    _problem(
        client.post("/v1/quality", content=buffer.getvalue(), headers={"content-type": "image/webp"}),
        422,
        "animated_image",
    )


# --- language, ids, models, health, metrics ------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "language"), [("sw", "sw"), ("de-DE, fr;q=0.8, es;q=0.9", "es"), ("de", "en")]
)
def test_advice_in_the_negotiated_language(client: TestClient, header: str, language: str) -> None:
    response = client.post(
        "/v1/quality",
        files={"image": ("p.jpg", make.encode(skimage.data.astronaut()), "image/jpeg")},
        headers={"Accept-Language": header},
    )
    body = response.json()
    assert response.headers["content-language"] == language
    assert body["advice"] == ADVICE[language]["no_cervix"]
    assert body["reasons"][0]["message"] == MESSAGES[language]["no_cervix"]


def test_request_id_is_echoed(client: TestClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "phone-42.frame-7"})
    assert response.headers["x-request-id"] == "phone-42.frame-7"
    unsafe = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


def test_models_endpoint_describes_what_is_loaded(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == set(MODEL_NAMES)
    for name, model in models.items():
        manifest = read_manifest(REPO_MODELS_DIR / name, verify=False)
        assert model["sha256"] == manifest.sha256 and model["version"] == manifest.version
        assert model["thresholds"] == manifest.thresholds
        assert model["headline_metrics"] and model["intended_use"]


def test_health_readiness_and_not_ready_before_startup() -> None:
    app = create_app(Settings())
    cold = TestClient(app)  # no `with`: the lifespan has not run, nothing is loaded
    assert cold.get("/healthz").json() == {"status": "ok"}
    _problem(cold.get("/readyz"), 503, "not_ready")
    _problem(cold.post("/v1/assess", content=b"x", headers={"content-type": "image/jpeg"}), 503, "not_ready")
    with TestClient(app) as warm:
        assert warm.get("/readyz").json() == {"status": "ready"}


def test_metrics_are_exported_with_the_documented_names(client: TestClient) -> None:
    _post(client, make.encode(skimage.data.astronaut()))
    text = client.get("/metrics").text
    for name in (
        'cervigate_requests_total{endpoint="/v1/assess",status="200"}',
        "cervigate_request_duration_seconds_bucket",
        "cervigate_stage_duration_seconds_bucket",
        'cervigate_decisions_total{decision="recapture"}',
        'cervigate_recapture_reasons_total{reason="no_cervix"}',
        "cervigate_inflight_requests",
        'cervigate_model_info{model="detector"',
        "cervigate_ready 1.0",
    ):
        assert name in text, name
    counts = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if "_count{" in line
    }
    assert counts['cervigate_stage_duration_seconds_count{stage="detect"}'] > 0
    assert counts['cervigate_request_duration_seconds_count{endpoint="/v1/assess"}'] > 0


def test_openapi_documents_both_upload_forms_and_problems(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/assess"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/heic"} <= set(body)
    assert "application/problem+json" in schema["paths"]["/v1/assess"]["post"]["responses"]["413"]["content"]
    assert "Problem" in schema["components"]["schemas"]


def test_logs_are_json_without_image_content(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    exif = Image.Exif()
    exif[0x010E] = "PATIENT-NAME-MARKER"  # ImageDescription: the kind of text a clinic app might embed
    data = make.encode(Image.fromarray(skimage.data.astronaut()), exif=exif)
    name = "jane-doe-cervix.jpg"
    with caplog.at_level("DEBUG"):
        client.post("/v1/assess", files={"image": (name, data, "image/jpeg")})
        client.post(
            "/v1/assess",
            content=b"--b\r\nContent-Disposition: form-data; name=image; filename=" + name.encode(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
    lines = [JsonFormatter().format(record) for record in caplog.records]
    access = [json.loads(line) for line in lines if '"cervigate.access"' in line]
    assert [a.get("decision") for a in access] == ["recapture", None]
    assert access[0]["reasons"] == ["no_cervix"] and access[1]["problem"] == "malformed_multipart"
    assert all(a["request_id"] and a["status"] for a in access)
    text = "\n".join(lines)
    for secret in (name, "PATIENT-NAME-MARKER", base64.b64encode(data[100:160]).decode()):
        assert secret not in text


def test_tampered_model_stops_startup(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO_MODELS_DIR, models, ignore=shutil.ignore_patterns("report"))
    with (models / "quality" / "model.onnx").open("r+b") as stream:
        stream.seek(-1, 2)
        last = stream.read(1)
        stream.seek(-1, 2)
        stream.write(bytes([last[0] ^ 0xFF]))
    with (
        pytest.raises(ModelIntegrityError, match="quality"),
        TestClient(create_app(Settings(models_dir=models))),
    ):
        pass


def _models_with_quality_manifest(tmp_path: Path, **changes: object) -> Path:
    models = tmp_path / "models"
    shutil.copytree(REPO_MODELS_DIR, models, ignore=shutil.ignore_patterns("report"))
    path = models / "quality" / "manifest.json"
    manifest = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = manifest
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(manifest))
    return models


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels__stage_logits": ["acetic_acid", "saline", "iodine", "green"]}, "stage_logits.*including"),
        ({"labels__stage_logits": ["acetic", "saline", "iodine"]}, "stage_logits.*one label per logit"),
        ({"labels__blur_kind_logits": ["none", "defocus", "shake"]}, "blur_kind_logits"),
        ({"extra__min_cervix_px": None}, "min_cervix_px"),
    ],
)
def test_a_manifest_the_service_cannot_answer_from_stops_startup(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    """Caught before the first request: otherwise every request would fail on the same inconsistency."""
    models = _models_with_quality_manifest(tmp_path, **change)
    with (
        pytest.raises(ModelConfigurationError, match=message),
        TestClient(create_app(Settings(models_dir=models))),
    ):
        pass


def test_a_cervix_floor_below_the_quality_models_stops_startup() -> None:
    floor = read_manifest(REPO_MODELS_DIR / "quality").extra["min_cervix_px"]
    with (
        pytest.raises(ModelConfigurationError, match="MIN_CERVIX_CROP_PX"),
        TestClient(create_app(Settings(min_cervix_crop_px=int(floor) - 1))),
    ):
        pass


def test_deadline_gives_504_and_the_service_stays_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(Settings(request_deadline_s=0.3)), raise_server_exceptions=False) as fresh:

        def slow(*args: object, **kwargs: object) -> None:
            time.sleep(1.0)

        monkeypatch.setattr(fresh.app.state.service.pipeline, "assess", slow)
        response = fresh.post(
            "/v1/quality",
            content=make.encode(np.zeros((100, 100, 3), np.uint8)),
            headers={"content-type": "image/jpeg"},
        )
        _problem(response, 504, "deadline_exceeded")
        assert fresh.get("/readyz").status_code == 200


def test_no_exif_or_gps_comes_back_and_nothing_touches_the_disk(
    client: TestClient, acetic_photo: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where any spooled upload would land
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = (
        "S",
        (1.0, 17.0, 33.123),
        "E",
        (36.0, 49.0, 12.987),
    )  # a clinic's location
    exif[0x010E] = "PATIENT-0042"
    big = make.encode(acetic_photo.resize((4032, 3024)), exif=exif, quality=98)
    assert len(big) > 1_048_576  # above Starlette's in-memory spool limit for form files
    response = client.post("/v1/assess?include=mask,overlay", files={"image": ("p.jpg", big, "image/jpeg")})
    assert response.status_code == 200
    body = response.json()
    images = {key: body["lesion"].pop(key) for key in ("mask_png", "overlay_jpeg")}
    text = json.dumps(body)  # everything but the two images, which are checked as images below
    for leak in ("PATIENT-0042", "GPS", "33.123", "12.987"):
        assert leak not in text, leak
    for encoded in images.values():
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert not image.getexif() and "exif" not in image.info
    assert not list(tmp_path.iterdir()), "an upload was written to a temporary file"


def test_work_abandoned_at_its_deadline_still_counts_against_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(request_deadline_s=0.2, inference_workers=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as fresh:
        running, most = [0], [0]
        lock = threading.Lock()

        def slow(*args: object, **kwargs: object) -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.5)
            with lock:
                running[0] -= 1

        service = fresh.app.state.service
        monkeypatch.setattr(service.pipeline, "assess", slow)
        frame = make.encode(np.zeros((100, 100, 3), np.uint8))
        for attempt in range(3):  # each times out while the previous abandoned one may still be running
            _problem(
                fresh.post("/v1/quality", content=frame, headers={"content-type": "image/jpeg"}),
                504,
                "deadline_exceeded",
            )
            if attempt == 0:  # the abandoned pipeline still holds its compute slot and its admission
                assert not service.compute_slots.acquire(blocking=False)
                assert service.admission.inflight >= 1
        time.sleep(1.2)
        assert most[0] == 1  # never two pipelines at once with one worker
        assert service.compute_slots.acquire(blocking=False), "the slot never came back"
        service.compute_slots.release()
