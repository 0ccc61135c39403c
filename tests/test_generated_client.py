"""A Python client generated from the live service's /openapi.json by openapi-python-client (as an
integrator would, offline, into tmp_path), calling the service over a real socket: a photo, a DICOM file
and the FHIR output, through operations named by their operationId."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from PIL import Image

from bench.run import Server
from tests import dicom_inputs as dcm

pytestmark = pytest.mark.slow
PACKAGE = "cervigate_client"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess").running() as running:
        yield running


@pytest.fixture(scope="module")
def generated(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("client")
    schema = root / "openapi.json"
    schema.write_bytes(httpx.get(server.url + "/openapi.json", timeout=10).content)
    config = root / "config.yaml"
    config.write_text("post_hooks: []\n")  # no formatter run: the generator needs nothing but itself
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(schema),
               "--output-path", str(root / PACKAGE), "--meta", "none", "--config", str(config)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.fixture(scope="module")
def photo(atlas_root: Path) -> bytes:
    return sorted(atlas_root.glob("images_*/case_*/*cetic*.jpg"))[0].read_bytes()


def test_operations_are_named_by_their_operation_ids(generated: ModuleType) -> None:
    for name in ("assessment.assess", "assessment.check_quality", "fhir.assess_fhir",
                 "fhir.check_quality_fhir", "exams.assess_exam", "models.list_models",
                 "health.check_readiness"):  # fmt: skip
        module = _module(f"api.{name}")
        assert callable(module.sync) and callable(module.sync_detailed), name


def test_a_photo_a_dicom_file_and_the_fhir_output_through_the_client(
    generated: ModuleType, server: Server, photo: bytes
) -> None:
    types, models = _module("types"), _module("models")
    assess, assess_fhir = _module("api.assessment.assess"), _module("api.fhir.assess_fhir")
    readiness, list_models = _module("api.health.check_readiness"), _module("api.models.list_models")
    rgb = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))
    wrapped = dcm.jpeg(photo, (rgb.shape[1], rgb.shape[0]))

    def upload(data: bytes, name: str, media_type: str) -> object:
        return types.File(payload=io.BytesIO(data), file_name=name, mime_type=media_type)

    with generated.Client(base_url=server.url, timeout=httpx.Timeout(60.0)) as client:
        assert readiness.sync(client=client).status.value == "ready"
        assert {m.name for m in list_models.sync(client=client).models} >= {"detector", "severity"}

        as_photo = assess.sync(
            client=client, body=models.AssessFilesBody(image=upload(photo, "p.jpg", "image/jpeg"))
        )
        assert isinstance(as_photo, models.AssessmentOut), as_photo
        assert as_photo.decision.value == "diagnosis"

        as_dicom = assess.sync(
            client=client, body=models.AssessFilesBody(image=upload(wrapped, "p.dcm", dcm.DICOM))
        )
        assert isinstance(as_dicom, models.AssessmentOut), as_dicom
        assert as_dicom.decision == as_photo.decision
        assert as_dicom.diagnosis.probability == as_photo.diagnosis.probability

        body = models.AssessFhirFilesBody(image=upload(wrapped, "p.dcm", dcm.DICOM))
        bundle = assess_fhir.sync(client=client, body=body, encounter="Encounter/e-7")
        assert isinstance(bundle, models.FhirBundleOut), bundle
        validated = Bundle.model_validate(bundle.to_dict())
        report = validated.entry[0].resource
        assert report.get_resource_type() == "DiagnosticReport"
        assert report.encounter.reference == "Encounter/e-7"
        assert report.subject.identifier.value == dcm.PATIENT_ID

        refused = assess.sync_detailed(
            client=client, body=models.AssessFilesBody(image=upload(dcm.frames(rgb, 2), "p.dcm", dcm.DICOM))
        )
        assert refused.status_code == 422
        assert isinstance(refused.parsed, models.Problem) and refused.parsed.code == "multi_frame_dicom"
