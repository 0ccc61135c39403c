"""How the service serves the capture app (without a browser: tests/test_capture_app.py drives it in
Chromium), the preview gate's `stage` parameter the app's exam steps use, and the TLS settings."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.pipeline import measures
from service.settings import CAPTURE_APP_DIR, Settings
from service.web import capture


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings())) as test_client:
        yield test_client


def test_capture_redirects_to_the_app_directory(client: TestClient) -> None:
    response = client.get("/capture", follow_redirects=False)
    assert response.status_code == 308 and response.headers["location"] == "/capture/"


def test_the_page_and_its_shell_are_served_with_locked_down_headers(client: TestClient) -> None:
    if not capture.built(CAPTURE_APP_DIR):
        pytest.skip(f"the capture app is not built in {CAPTURE_APP_DIR}: run `make web`")
    page = client.get("/capture/")
    assert page.status_code == 200 and "<title>CerviGate capture</title>" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["permissions-policy"].startswith("camera=(self)")
    assert page.headers["cache-control"] == "no-cache"
    for name in ("app.js", "app.css", "sw.js", "manifest.webmanifest", "icon-192.png", "icon-512.png"):
        assert client.get(f"/capture/{name}").status_code == 200, name
    # No CORS: the page is same-origin, and the API grants no other origin.
    assert "access-control-allow-origin" not in client.get("/capture/app.js").headers


def test_a_missing_file_is_a_problem_not_a_page(client: TestClient) -> None:
    response = client.get("/capture/no-such-file.js")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


def test_an_unbuilt_app_says_how_to_build_it(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(capture_app_dir=tmp_path))) as test_client:
        response = test_client.get("/capture/")
    assert response.status_code == 404 and response.json()["code"] == "capture_app_not_built"
    assert "make web" in response.json()["detail"]
    assert str(tmp_path) not in response.json()["detail"]  # a server path tells a client nothing it can use


def test_the_capture_app_can_be_switched_off() -> None:
    app = create_app(Settings(capture_app=False))
    assert not any(getattr(r, "path", "").startswith(capture.CAPTURE_PATH) for r in app.router.routes)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here: uvicorn loads it")
    with pytest.raises(ValidationError, match="both"):
        Settings(tls_certfile=cert)
    with pytest.raises(ValidationError, match="does not exist"):
        Settings(tls_certfile=cert, tls_keyfile=tmp_path / "missing.pem")
    settings = Settings(tls_certfile=cert, tls_keyfile=cert)
    assert settings.tls_certfile == settings.tls_keyfile == cert


def test_the_preview_gate_judges_the_stage_the_exam_step_expects(
    client: TestClient, atlas_root: Path
) -> None:
    """An iodine photo is `not_acetic` for the single-photo gate, but not when the app's exam step says it
    expects iodine (framing and quality are still judged)."""
    flagged_by_default = 0
    for path in sorted(atlas_root.glob("images_*/case_*/*_After_Lugol*_iodine.jpg"))[:8]:
        data = path.read_bytes()
        headers = {"content-type": "image/jpeg"}
        default = client.post("/v1/quality", content=data, headers=headers).json()
        as_iodine = client.post("/v1/quality?stage=iodine", content=data, headers=headers).json()
        codes = {r["code"] for r in default["reasons"]}
        flagged_by_default += "not_acetic" in codes
        assert "not_acetic" not in {r["code"] for r in as_iodine["reasons"]}
        assert {r["code"] for r in as_iodine["reasons"]} == codes - {"not_acetic"}
    assert flagged_by_default >= 4
    bad = client.post("/v1/quality?stage=lugol", content=data, headers=headers)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"


def test_the_device_gate_gets_its_models_rules_and_words(client: TestClient) -> None:
    gate = client.get("/v1/gate").json()
    assert [m["name"] for m in gate["models"]] == ["detector", "quality"]
    for model in gate["models"]:
        manifest = client.get(model["manifest_url"]).json()
        onnx = client.get(model["model_url"])
        assert onnx.status_code == 200 and onnx.headers["content-type"] == "application/octet-stream"
        assert hashlib.sha256(onnx.content).hexdigest() == manifest["sha256"] == model["sha256"]
        assert len(onnx.content) == model["bytes"] and model["sha256"] in model["model_url"]
    assert gate["rules"]["focus_threshold"] == "not_sharp"  # the default operating point, high_sensitivity
    assert gate["rules"]["min_cervix_crop_px"] == 192  # the quality manifest's min_cervix_px
    detector = client.get(gate["models"][0]["manifest_url"]).json()
    assert gate["rules"]["max_cervix_distance"] == detector["thresholds"]["cervix_distance"]
    assert gate["rules"]["tissue_sample_pixels"] == measures.MAX_SAMPLED_PIXELS
    assert set(gate["messages"]) == set(gate["advice"]) == {"en", "es", "fr", "pt", "sw"}
    for language in gate["messages"]:
        assert set(gate["messages"][language]) == set(gate["advice"][language]) == set(gate["reasons"])


def test_only_the_gate_models_files_are_served(client: TestClient) -> None:
    for path in (
        "/v1/models/segmenter/model.onnx",
        "/v1/models/detector/../settings.py",
        "/v1/models/quality/x",
    ):
        response = client.get(path)
        assert 400 <= response.status_code < 500 and response.json()["code"] in (
            "invalid_request",
            "not_found",
        )


def test_the_gate_follows_the_operating_point_and_needs_the_key() -> None:
    settings = Settings(focus_operating_point="balanced", api_keys=["gate-key"])
    with TestClient(create_app(settings)) as keyed:
        assert keyed.get("/v1/gate").status_code == 401
        assert keyed.get("/v1/models/detector/model.onnx").status_code == 401
        gate = keyed.get("/v1/gate", headers={"Authorization": "Bearer gate-key"}).json()
    assert gate["rules"]["focus_threshold"] == "not_sharp_balanced"
