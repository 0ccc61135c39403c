"""Property-based API fuzzing from the OpenAPI schema (schemathesis): no server errors, and every response
(status, content type, body) matches what the schema documents. Bounded, so it fits in `make test`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.slow

app = create_app(Settings())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _lifespan() -> Iterator[None]:
    """Load the models once: schemathesis calls the ASGI app directly, so the lifespan is run here."""
    with TestClient(app):
        yield


@schema.parametrize()
@pytest.mark.filterwarnings("ignore:Skipped test cases with unsupported payload media types")
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_matches_its_schema(case: schemathesis.Case) -> None:
    # "Any schema-valid request is accepted" cannot hold here: the schema can only say "binary", and most
    # random bytes are not a photo, which the service rightly refuses with a documented 4xx.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
