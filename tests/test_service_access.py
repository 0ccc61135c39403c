"""API keys (stored hashed, compared in constant time), 401 vs 403, open health endpoints, CORS."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api import access
from service.app import create_app
from service.settings import Settings
from service.telemetry import JsonFormatter

pytestmark = pytest.mark.slow  # each app loads the four models

API_KEY = "clinic-7f3a-key"
SCRAPER_KEY = "prometheus-b41c-key"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(
        api_keys=[f"sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()}", "second-key"],
        metrics_api_keys=[SCRAPER_KEY],
        cors_origins=["https://app.example.org"],
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _problem(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


def test_v1_needs_a_key(client: TestClient) -> None:
    missing = client.get("/v1/models")
    _problem(missing, 401, "missing_api_key")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    _problem(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    _problem(
        client.post("/v1/assess", content=b"x", headers={"content-type": "image/jpeg"}),
        401,
        "missing_api_key",
    )
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": "second-key"}).status_code == 200


def test_health_stays_open(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_metrics_key_is_separate_from_api_keys(client: TestClient) -> None:
    _problem(client.get("/metrics"), 401, "missing_api_key")
    _problem(client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}), 403, "forbidden")
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPER_KEY}"})
    assert ok.status_code == 200 and "cervigate_requests_total" in ok.text


def test_no_keys_configured_means_open() -> None:
    with TestClient(create_app(Settings())) as open_client:
        assert open_client.get("/v1/models").status_code == 200
        assert open_client.get("/metrics").status_code == 200
        preflight = open_client.options(
            "/v1/assess", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers  # CORS closed by default


def test_cors_allows_only_configured_origins(client: TestClient) -> None:
    def preflight(origin: str):
        return client.options(
            "/v1/assess", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
        )

    assert (
        preflight("https://app.example.org").headers["access-control-allow-origin"]
        == "https://app.example.org"
    )
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_keys_never_reach_the_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG"):
        client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        client.get("/v1/models", headers={"Authorization": "Bearer wrong-key-123"})
    text = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "cervigate.access" in text
    assert API_KEY not in text and "wrong-key-123" not in text


def test_key_parsing() -> None:
    digest = access.parse_keys([f"sha256:{hashlib.sha256(b'k').hexdigest()}", " plain ", ""])
    assert len(digest) == 2 and access.matches("k", digest) and access.matches("plain", digest)
    assert not access.matches("K", digest)
    with pytest.raises(ValueError, match="64 hex digits"):
        access.parse_keys(["sha256:abc"])
    with pytest.raises(ValueError, match="64 hex digits"):
        access.parse_keys(["sha256:" + "zz" * 32])


def test_the_schema_shows_the_key_schemes_only_when_keys_are_configured(client: TestClient) -> None:
    secured = client.get("/openapi.json").json()
    schemes = secured["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearer"]["description"],
    }
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    for path in ("/v1/assess", "/v1/quality", "/v1/exams"):
        assert {"bearer": []} in secured["paths"][path]["post"]["security"], path
    assert "security" not in secured["paths"]["/healthz"]["get"]
    open_schema = create_app(Settings()).openapi()  # no keys: nothing to authorise
    assert "securitySchemes" not in open_schema.get("components", {})
    assert "security" not in open_schema["paths"]["/v1/assess"]["post"]
