"""DICOM in, FHIR R4 out, end to end on the shipped models (`with TestClient(app)`): atlas photos wrapped as
DICOM get the JPEG's answer, odd files their own 4xx, and every FHIR bundle validates with fhir.resources.

fhir.resources 8 has no R4 (4.0.1) package: its `R4B` models (4.3.0) are used, whose DiagnosticReport,
Observation, Media and Bundle have R4's structure (R4B changed other resources)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from PIL import Image

from service.app import create_app
from service.render import fhir
from service.render.reasons import Reason
from service.settings import Settings
from service.telemetry import JsonFormatter
from tests import dicom_inputs as dcm
from tests import service_inputs as make

pytestmark = pytest.mark.slow  # loads the four models once per module

DICOM = "application/dicom"
FHIR = {"accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings())) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def acetic_paths(atlas_root: Path) -> list[Path]:
    return sorted(atlas_root.glob("images_*/case_*/*cetic*.jpg"))


@pytest.fixture(scope="module")
def photo(acetic_paths: list[Path]) -> bytes:
    return acetic_paths[0].read_bytes()


def _rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def _wrapped(jpeg: bytes) -> bytes:
    rgb = _rgb(jpeg)
    return dcm.jpeg(jpeg, (rgb.shape[1], rgb.shape[0]))


def _post(client: TestClient, body: bytes, content_type: str, path: str = "/v1/assess", **kw: Any) -> Any:
    headers = {"content-type": content_type} | kw.pop("headers", {})
    return client.post(path, content=body, headers=headers, **kw)


def _validated(response: Any) -> dict[str, Any]:
    """The response as a FHIR R4 bundle that fhir.resources accepts, every urn:uuid reference resolved."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == fhir.FHIR_CONTENT_TYPE
    body = response.json()
    bundle = Bundle.model_validate(body)
    assert bundle.type == "collection"
    urls = {entry.fullUrl for entry in bundle.entry}
    assert len(urls) == len(bundle.entry)
    assert set(_references(body)) <= urls
    return body


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value.startswith("urn:uuid:"):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _resources(body: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == kind]


def _observation_codes(body: dict[str, Any]) -> list[str]:
    return [o["code"]["coding"][0]["code"] for o in _resources(body, "Observation")]


# --- DICOM in ---------------------------------------------------------------------------------------------


def test_atlas_photos_wrapped_as_dicom_get_the_jpeg_s_decision(
    client: TestClient, acetic_paths: list[Path]
) -> None:
    for path in acetic_paths[:6]:
        jpeg = path.read_bytes()
        expected = _post(client, jpeg, "image/jpeg").json()
        for name, body in (("jpeg baseline", _wrapped(jpeg)), ("native rgb", dcm.native(_rgb(jpeg)))):
            got = _post(client, body, DICOM).json()
            assert got["decision"] == expected["decision"], (path.name, name)
            assert got["reasons"] == expected["reasons"], (path.name, name)
            assert got["diagnosis"] == expected["diagnosis"], (path.name, name)
            assert got["cervix"] == expected["cervix"], (path.name, name)


def test_dicom_in_a_multipart_part_and_in_an_exam(client: TestClient, photo: bytes) -> None:
    expected = _post(client, photo, "image/jpeg").json()
    part = client.post("/v1/assess", files={"image": ("photo.dcm", _wrapped(photo), DICOM)}).json()
    assert (part["decision"], part["diagnosis"]) == (expected["decision"], expected["diagnosis"])
    exam = client.post(
        "/v1/exams",
        files=[("image", ("a.dcm", _wrapped(photo), DICOM)), ("image", ("b.dcm", b"not dicom", DICOM))],
        data={"stages": "acetic,acetic"},
    )
    assert exam.status_code == 200, exam.text
    photos = exam.json()["photos"]
    assert photos[0]["assessment"]["decision"] == expected["decision"]
    assert photos[1]["problem"]["code"] == "not_dicom"


def test_quality_endpoint_reads_dicom_too(client: TestClient, photo: bytes) -> None:
    expected = _post(client, photo, "image/jpeg", path="/v1/quality").json()
    got = _post(client, dcm.ybr_full_422(_rgb(photo)), DICOM, path="/v1/quality").json()
    assert got["decision"] == expected["decision"] == "accept"


def _odd_files(photo: bytes) -> list[tuple[str, bytes, int, str]]:
    rgb = _rgb(photo)
    native = dcm.native(rgb)
    return [
        ("missing photometric interpretation", dcm.without(rgb, "PhotometricInterpretation"), 422,
         "incomplete_pixel_module"),
        ("no pixel data", dcm.without(rgb, "PixelData"), 422, "missing_pixel_data"),
        ("two frames", dcm.frames(rgb, 2), 422, "multi_frame_dicom"),
        ("wrong modality", dcm.native(rgb, sop_class=dcm.CT_IMAGE, modality="CT"), 422, "wrong_modality"),
        ("wrong class", dcm.native(rgb, sop_class=dcm.CT_IMAGE), 422, "unsupported_dicom_class"),
        ("truncated", native[: len(native) * 2 // 3], 422, "truncated_dicom"),
        ("truncated jpeg", _wrapped(photo)[: len(photo) // 2], 422, "truncated_dicom"),
        ("200000x200000 header", dcm.header_claiming(200_000, 200_000), 413, "too_many_pixels"),
        ("monochrome", dcm.monochrome(rgb[..., 1]), 422, "unsupported_pixel_format"),
        ("JPEG lossless", dcm.with_syntax(rgb, dcm.JPEG_LOSSLESS_SV1), 415, "unsupported_transfer_syntax"),
        ("a JPEG declared as DICOM", photo, 422, "not_dicom"),
    ]  # fmt: skip


def test_each_odd_dicom_gets_its_own_problem(client: TestClient, photo: bytes) -> None:
    for name, body, status, code in _odd_files(photo):
        for path in ("/v1/assess", "/v1/quality"):
            response = _post(client, body, DICOM, path=path)
            assert response.status_code == status, (name, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == code, name
        # The FHIR output refuses as the JSON one does (problem+json, not a bundle).
        assert _post(client, body, DICOM, headers=FHIR).json()["code"] == code, name
    assert client.get("/readyz").status_code == 200


def test_the_accepted_yet_odd_encodings_are_answered(client: TestClient, photo: bytes) -> None:
    """YBR_FULL_422, JPEG baseline, RLE and JPEG-LS: the issue's odd encodings that the service decodes."""
    rgb = _rgb(photo)
    expected = _post(client, photo, "image/jpeg").json()
    for name, body in (
        ("ybr_full_422", dcm.ybr_full_422(rgb)),
        ("jpeg baseline labelled RGB", dcm.jpeg(photo, (rgb.shape[1], rgb.shape[0]), "RGB")),
        ("rle", dcm.compressed(rgb, dcm.RLE_LOSSLESS)),
        ("jpeg-ls", dcm.compressed(rgb, dcm.JPEG_LS_LOSSLESS)),
    ):
        got = _post(client, body, DICOM).json()
        assert got["decision"] == expected["decision"], name


# --- FHIR out ---------------------------------------------------------------------------------------------


def test_a_diagnosis_as_fhir(client: TestClient, photo: bytes) -> None:
    plain = _post(client, photo, "image/jpeg").json()
    assert plain["decision"] == "diagnosis"
    body = _validated(_post(client, photo, "image/jpeg", headers=FHIR, params={"subject": "Patient/p1"}))
    (report,) = _resources(body, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["category"][0]["coding"][0]["code"] == "imaging"
    assert report["code"]["coding"][0] == {
        "system": "http://snomed.info/sct", "code": "392003006", "display": "Colposcopy (procedure)"
    }  # fmt: skip
    assert report["subject"] == {"reference": "Patient/p1"} and "encounter" not in report
    label = plain["diagnosis"]["label"]
    assert report["conclusionCode"][0]["coding"][0] == {
        "system": fhir.CG_RESULT, "code": label, "display": fhir.RESULTS[label]
    }  # fmt: skip
    assert f"{plain['diagnosis']['probability']:.2f}" in report["conclusion"]
    assert _observation_codes(body) == [
        "cervix-found", "focus", "exposure", "glare", "exam-stage", "cin2plus-probability"
    ]  # fmt: skip
    observations = {o["code"]["coding"][0]["code"]: o for o in _resources(body, "Observation")}
    assert observations["cin2plus-probability"]["valueQuantity"]["value"] == plain["diagnosis"]["probability"]
    assert observations["focus"]["valueQuantity"]["value"] == plain["quality"]["sharpness"]
    stage = observations["exam-stage"]["valueCodeableConcept"]["coding"][0]
    assert stage == {"system": fhir.CG_STAGE, "code": plain["quality"]["exam_stage"],
                     "display": fhir.STAGES[plain["quality"]["exam_stage"]]}  # fmt: skip
    assert all(o["subject"] == {"reference": "Patient/p1"} for o in observations.values())
    (media,) = _resources(body, "Media")
    assert media["content"]["contentType"] == "image/jpeg" and media["content"]["size"] == len(photo)
    assert (media["width"], media["height"]) == tuple(_rgb(photo).shape[1::-1])
    assert report["media"][0]["link"]["reference"] == body["entry"][-1]["fullUrl"]


def test_a_recapture_as_fhir_concludes_with_its_reason(client: TestClient, photo: bytes) -> None:
    blurred = make.encode(make.defocused(Image.open(io.BytesIO(photo)).convert("RGB")))
    plain = _post(client, blurred, "image/jpeg").json()
    assert plain["decision"] == "recapture"
    body = _validated(_post(client, blurred, "image/jpeg", headers=FHIR | {"accept-language": "fr"}))
    (report,) = _resources(body, "DiagnosticReport")
    codes = [c["coding"][0]["code"] for c in report["conclusionCode"]]
    assert codes == [r["code"] for r in plain["reasons"]]
    assert all(c["coding"][0]["system"] == fhir.CG_REASON for c in report["conclusionCode"])
    assert report["conclusion"].startswith("Recapture: ") and report["language"] == "fr"
    french = _post(client, blurred, "image/jpeg", headers={"accept-language": "fr"}).json()
    assert french["reasons"][0]["message"] in report["conclusion"]
    assert "cin2plus-probability" not in _observation_codes(body)
    assert "subject" not in report  # no reference asked for and no DICOM header to take one from


def test_no_cervix_and_the_quality_gate_as_fhir(client: TestClient, photo: bytes) -> None:
    astronaut = make.encode(Image.fromarray(skimage.data.astronaut()))
    body = _validated(_post(client, astronaut, "image/jpeg", headers=FHIR))
    assert _observation_codes(body) == ["cervix-found"]
    (report,) = _resources(body, "DiagnosticReport")
    assert report["conclusionCode"][0]["coding"][0]["code"] == Reason.NO_CERVIX.value
    gate = _validated(_post(client, photo, "image/jpeg", path="/v1/quality", headers=FHIR))
    (report,) = _resources(gate, "DiagnosticReport")
    assert report["conclusionCode"][0]["coding"][0]["code"] == "accept"
    assert "cin2plus-probability" not in _observation_codes(gate)


def test_fhir_from_dicom_takes_references_from_the_header(client: TestClient, photo: bytes) -> None:
    wrapped = _wrapped(photo)
    body = _validated(_post(client, wrapped, DICOM, headers=FHIR))
    (report,) = _resources(body, "DiagnosticReport")
    assert report["subject"] == {
        "type": "Patient", "identifier": {"value": dcm.PATIENT_ID, "assigner": {"display": "CLINIC-MARKER"}}
    }  # fmt: skip
    assert report["encounter"] == {"type": "Encounter", "identifier": {"value": "ADM-MARKER-9"}}
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-MARKER-7"
    assert report["effectiveDateTime"] == "2026-03-15T10:15:00+01:00"
    assert report["imagingStudy"][0]["identifier"]["value"].startswith("urn:oid:")
    (media,) = _resources(body, "Media")
    assert media["content"]["contentType"] == DICOM and media["content"]["size"] == len(wrapped)
    assert media["identifier"][0]["value"].startswith("urn:oid:")
    assert media["modality"]["coding"][0]["code"] == "XC"
    # Request references win over the header's.
    params = {"subject": "Patient/abc", "encounter": "Encounter/e-1"}
    body = _validated(_post(client, wrapped, DICOM, headers=FHIR, params=params))
    (report,) = _resources(body, "DiagnosticReport")
    assert report["subject"] == {"reference": "Patient/abc"}
    assert report["encounter"] == {"reference": "Encounter/e-1"}
    # The explicit FHIR operations answer the same way without an Accept header.
    explicit = _validated(client.post("/v1/assess/fhir", files={"image": ("p.dcm", wrapped, DICOM)}))
    assert _observation_codes(explicit) == _observation_codes(body)
    _validated(client.post("/v1/quality/fhir", files={"image": ("p.jpg", photo, "image/jpeg")}))


@pytest.mark.parametrize(
    ("accept", "fhir_out"),
    [
        ("application/fhir+json", True),
        ("application/fhir+json; fhirVersion=4.0", True),
        ("application/json;q=0.5, application/fhir+json", True),
        ("application/fhir+json;q=0.4, application/json", False),
        ("application/json", False),
        ("*/*", False),
        (None, False),
    ],
)
def test_accept_chooses_between_json_and_fhir(accept: str | None, fhir_out: bool) -> None:
    assert fhir.is_fhir_preferred(accept) is fhir_out


def test_bad_references_are_refused(client: TestClient, photo: bytes) -> None:
    for params in ({"subject": "Observation/1"}, {"subject": "Patient/a b"}, {"encounter": "Patient/1"}):
        response = _post(client, photo, "image/jpeg", headers=FHIR, params=params)
        assert response.status_code == 422 and response.json()["code"] == "invalid_request", params


def test_openapi_documents_dicom_fhir_and_names_every_operation(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assess = schema["paths"]["/v1/assess"]["post"]
    assert DICOM in assess["requestBody"]["content"]
    ok = assess["responses"]["200"]["content"]
    assert {"application/json", "application/fhir+json"} <= set(ok)
    Bundle.model_validate(ok["application/fhir+json"]["example"])
    assert "example" in ok["application/json"]
    names = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("operationId") and operation.get("tags"), (method, path)
            names.append(operation["operationId"])
    assert len(names) == len(set(names))
    assert {"assess", "checkQuality", "assessFhir", "checkQualityFhir", "assessExam"} <= set(names)


# --- privacy ----------------------------------------------------------------------------------------------


def test_patient_identifiers_never_reach_the_logs_nor_a_json_answer(
    client: TestClient, photo: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    rgb = _rgb(photo)
    bodies = [_wrapped(photo), dcm.without(rgb, "PixelData"), dcm.frames(rgb, 2), _wrapped(photo)[:20_000]]
    markers = (dcm.PATIENT_NAME, "PATIENT-NAME-MARKER", dcm.PATIENT_ID, "CLINIC-MARKER", "ACC-MARKER-7",
               "ADM-MARKER-9")  # fmt: skip
    with caplog.at_level("DEBUG"):
        answers = [_post(client, body, DICOM).text for body in bodies]
        answers.append(client.post("/v1/assess", files={"image": ("p.dcm", bodies[0], DICOM)}).text)
        as_fhir = _post(client, bodies[0], DICOM, headers=FHIR).text
    logs = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    access = [json.loads(line) for line in logs.splitlines() if '"cervigate.access"' in line]
    assert len(access) == len(bodies) + 2
    for marker in markers:
        assert marker not in logs, marker
        assert all(marker not in answer for answer in answers), marker
    # The FHIR output, asked for, names the patient by the header's PatientID (never by name).
    assert dcm.PATIENT_ID in as_fhir
    assert "PATIENT-NAME-MARKER" not in as_fhir
