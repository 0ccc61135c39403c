"""HL7 FHIR R4 output (`Accept: application/fhir+json`): one assessment as a `Bundle` of type collection.

The bundle holds a `DiagnosticReport` (status preliminary: software output a clinician still has to read),
one `Observation` per check the photo went through (cervix found, focus, exposure, glare, exam stage) and
the CIN2+ probability when there is one, and a `Media` for the photo (described, never included: its
size, type, SHA-1 and, for DICOM, its UIDs). A recapture is a report whose conclusion is the reason.

Codes: standard systems where a concept exists in them, a CerviGate code system where it does not.
  - the report: SNOMED CT 392003006 |Colposcopy (procedure)| (as HL7 Lithuania's cervical screening IG
    codes its colposcopy report); LOINC has no code for a colposcopy photo assessment.
  - body site: SNOMED CT 71252005 |Cervix uteri structure|; the photo's modality: DICOM XC.
  - categories: observation-category `imaging`; units: UCUM (`1` for fractions and probabilities).
  - the checks, reasons and outcomes: `urn:cervigate:codesystem:*` (below). No LOINC or SNOMED CT concept
    means "focus score of a colposcopy photo" or "retake: glare"; and CIN2+ from a photo is a model's
    suspicion, not the histological finding that SNOMED CT's CIN concepts assert.
The resources are built as plain JSON here (the service does not import a FHIR library); the tests
validate every bundle with `fhir.resources` (R4B models: R4's structure for these resources).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.io.dicom import DicomContext
from service.render.reasons import MESSAGES, Reason
from service.render.schemas import EXAMPLE_ASSESSMENT, AssessmentOut

FHIR_MEDIA_TYPE = "application/fhir+json"
FHIR_CONTENT_TYPE = f"{FHIR_MEDIA_TYPE}; fhirVersion=4.0"

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
MEDIA_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/media-type"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
DICOM_UID = "urn:dicom:uid"

# The CerviGate code systems (README: DICOM and FHIR). Codes are a public contract: add, never rename.
CG_OBSERVATION = "urn:cervigate:codesystem:observation"
CG_REASON = "urn:cervigate:codesystem:reason"
CG_RESULT = "urn:cervigate:codesystem:result"
CG_EXPOSURE = "urn:cervigate:codesystem:exposure"
CG_STAGE = "urn:cervigate:codesystem:exam-stage"
CG_BLUR = "urn:cervigate:codesystem:blur-kind"
CG_REQUEST = "urn:cervigate:request-id"

OBSERVATIONS = {
    "cervix-found": "Cervix found in the photo",
    "cervix-score": "Detector probability that the photo shows a cervix",
    "focus": "Probability that the cervix is sharp enough to assess",
    "blur-kind": "Most likely kind of blur",
    "exposure": "Exposure of the cervix",
    "glare": "Fraction of the central tissue clipped white",
    "exam-stage": "Exam stage the photo shows",
    "cin2plus-probability": "Probability of CIN2+ (one-photo exam)",
}
RESULTS = {
    "cin2plus": "CIN2+ suspected: refer",
    "negative_or_cin1": "Negative or CIN1 suspected",
    "accept": "Photo passed the capture gate",
}
EXPOSURES = {"ok": "Exposure ok", "dark": "Too dark", "over": "Overexposed"}
STAGES = {
    "acetic": "After acetic acid",
    "saline": "After saline",
    "iodine": "After Lugol's iodine",
    "green": "Green filter",
}
BLUR_KINDS = {"none": "No blur", "defocus": "Defocus", "motion": "Motion blur"}
_MODALITIES = {"XC": "External-camera Photography", "OT": "Other", "ES": "Endoscopy"}
_IMAGING = {"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}
_CERVIX = {"coding": [{"system": SNOMED, "code": "71252005", "display": "Cervix uteri structure"}]}


@dataclass(frozen=True)
class PhotoFacts:
    """The photo as the Media resource describes it: never its pixels."""

    media_type: str
    size: int
    sha1_base64: str
    width: int
    height: int


@dataclass(frozen=True)
class FhirContext:
    """Whom and what the report is about: request references win over what a DICOM header says."""

    subject: str | None = None  # "Patient/<id>", from the request
    encounter: str | None = None  # "Encounter/<id>", from the request
    dicom: DicomContext | None = None


def bundle(
    out: AssessmentOut,
    photo: PhotoFacts,
    context: FhirContext,
    language: str,
    *,
    issued: datetime | None = None,
    new_urn: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """The assessment as a FHIR R4 Bundle (type collection), ready for json.dumps. `issued` and `new_urn`
    (the entries' urn:uuid full URLs) default to now and random UUIDs; fixed, the bundle is reproducible."""
    now = (issued or datetime.now(UTC)).isoformat(timespec="seconds")
    _urn = new_urn or _random_urn
    report_url = _urn()
    dicom = context.dicom
    about = _about(context)
    effective = {"effectiveDateTime": dicom.acquired} if dicom is not None and dicom.acquired else {}
    media_url = _urn()
    media = _media(photo, dicom, about)
    observations = [
        {
            "resourceType": "Observation",
            "status": "preliminary",
            "category": [_IMAGING],
            "code": _concept(CG_OBSERVATION, code, OBSERVATIONS[code]),
            **about,
            **effective,
            "issued": now,
            "derivedFrom": [{"reference": media_url}],
            **value,
        }
        for code, value in _checks(out)
    ]
    observation_urls = [_urn() for _ in observations]
    report = {
        "resourceType": "DiagnosticReport",
        "language": language,  # of the conclusion (the reasons' messages and advice)
        "identifier": [{"system": CG_REQUEST, "value": out.id}],
        **_based_on(dicom),
        "status": "preliminary",
        "category": [_IMAGING],
        "code": {
            "coding": [{"system": SNOMED, "code": "392003006", "display": "Colposcopy (procedure)"}],
            "text": "CerviGate colposcopy photo assessment",
        },
        **about,
        **effective,
        "issued": now,
        "result": [{"reference": url} for url in observation_urls],
        **_imaging_study(dicom),
        "media": [{"comment": "the assessed photo", "link": {"reference": media_url}}],
        **_conclusion(out),
    }
    entries = [(report_url, report), *zip(observation_urls, observations, strict=True), (media_url, media)]
    return {
        "resourceType": "Bundle",
        "identifier": {"system": CG_REQUEST, "value": out.id},
        "type": "collection",
        "timestamp": now,
        "entry": [{"fullUrl": url, "resource": resource} for url, resource in entries],
    }


def _checks(out: AssessmentOut) -> list[tuple[str, dict[str, Any]]]:
    """(observation code, its value elements) for each check the photo went through, in pipeline order."""
    cervix_score = {
        "code": _concept(CG_OBSERVATION, "cervix-score", OBSERVATIONS["cervix-score"]),
        "valueQuantity": _fraction(out.cervix.score),
    }
    checks: list[tuple[str, dict[str, Any]]] = [
        ("cervix-found", {"valueBoolean": out.cervix.found, "component": [cervix_score]})
    ]
    q = out.quality
    if q is not None:
        blur = _concept(CG_BLUR, q.blur_kind, BLUR_KINDS[q.blur_kind])
        blur_component = {
            "code": _concept(CG_OBSERVATION, "blur-kind", OBSERVATIONS["blur-kind"]),
            "valueCodeableConcept": blur,
        }
        checks += [
            ("focus", {"valueQuantity": _fraction(q.sharpness), "component": [blur_component]}),
            ("exposure", {"valueCodeableConcept": _concept(CG_EXPOSURE, q.exposure, EXPOSURES[q.exposure])}),
            ("glare", {"valueQuantity": _fraction(q.glare_fraction)}),
            ("exam-stage", {"valueCodeableConcept": _concept(CG_STAGE, q.exam_stage, STAGES[q.exam_stage])}),
        ]
    d = out.diagnosis
    if d is not None:
        flag = ("POS", "Positive") if d.referral else ("NEG", "Negative")
        interpretation = {"coding": [{"system": INTERPRETATION, "code": flag[0], "display": flag[1]}]}
        checks.append(
            (
                "cin2plus-probability",
                {"valueQuantity": _fraction(d.probability), "interpretation": [interpretation]},
            )
        )
    return checks


def _conclusion(out: AssessmentOut) -> dict[str, Any]:
    """A recapture concludes with its reasons (the advice after them); otherwise the outcome."""
    if out.reasons:
        english = MESSAGES["en"]
        text = " ".join(r.message for r in out.reasons) + (f" {out.advice}" if out.advice else "")
        codes = [_concept(CG_REASON, r.code.value, english[Reason(r.code)], r.message) for r in out.reasons]
        return {"conclusion": f"Recapture: {text}", "conclusionCode": codes}
    if out.diagnosis is not None:
        d = out.diagnosis
        text = (
            f"{RESULTS[d.label]} (P(CIN2+) {d.probability:.2f}). Research software, not a medical device: "
            "a clinician decides."
        )
        return {"conclusion": text, "conclusionCode": [_concept(CG_RESULT, d.label, RESULTS[d.label])]}
    return {
        "conclusion": f"{RESULTS['accept']}; no diagnosis was asked for.",
        "conclusionCode": [_concept(CG_RESULT, "accept", RESULTS["accept"])],
    }


def _about(context: FhirContext) -> dict[str, Any]:
    """subject and encounter: the request's references, else logical ones from the DICOM header."""
    dicom = context.dicom
    about: dict[str, Any] = {}
    if context.subject:
        about["subject"] = {"reference": context.subject}
    elif dicom is not None and dicom.patient_id:
        identifier: dict[str, Any] = {"value": dicom.patient_id}
        if dicom.patient_id_issuer:  # DICOM's issuer is a name, not a URI: it is the assigner
            identifier["assigner"] = {"display": dicom.patient_id_issuer}
        about["subject"] = {"type": "Patient", "identifier": identifier}
    if context.encounter:
        about["encounter"] = {"reference": context.encounter}
    elif dicom is not None and dicom.admission_id:
        about["encounter"] = {"type": "Encounter", "identifier": {"value": dicom.admission_id}}
    return about


def _media(photo: PhotoFacts, dicom: DicomContext | None, about: dict[str, Any]) -> dict[str, Any]:
    media: dict[str, Any] = {"resourceType": "Media"}
    if dicom is not None and dicom.sop_instance_uid:
        media["identifier"] = [{"system": DICOM_UID, "value": f"urn:oid:{dicom.sop_instance_uid}"}]
    media |= {
        "status": "completed",
        "type": {"coding": [{"system": MEDIA_TYPE_SYSTEM, "code": "image", "display": "Image"}]},
    }
    modality = dicom.modality if dicom is not None and dicom.modality in _MODALITIES else "XC"
    media["modality"] = _concept(DICOM_DCM, modality, _MODALITIES[modality])
    media |= about
    if dicom is not None and dicom.acquired:
        media["createdDateTime"] = dicom.acquired
    media |= {
        "bodySite": _CERVIX,
        "width": photo.width,
        "height": photo.height,
        "content": {"contentType": photo.media_type, "size": photo.size, "hash": photo.sha1_base64},
    }
    return media


def _based_on(dicom: DicomContext | None) -> dict[str, Any]:
    """The DICOM accession number names the order: a logical ServiceRequest reference."""
    if dicom is None or not dicom.accession_number:
        return {}
    kind = {"coding": [{"system": IDENTIFIER_TYPE, "code": "ACSN", "display": "Accession ID"}]}
    identifier = {"type": kind, "value": dicom.accession_number}
    return {"basedOn": [{"type": "ServiceRequest", "identifier": identifier}]}


def _imaging_study(dicom: DicomContext | None) -> dict[str, Any]:
    if dicom is None or not dicom.study_uid:
        return {}
    identifier = {"system": DICOM_UID, "value": f"urn:oid:{dicom.study_uid}"}
    return {"imagingStudy": [{"type": "ImagingStudy", "identifier": identifier}]}


def _concept(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [{"system": system, "code": code, "display": display}]}
    if text is not None and text != display:
        concept["text"] = text
    return concept


def _fraction(value: float) -> dict[str, Any]:
    return {"value": round(value, 4), "unit": "1", "system": UCUM, "code": "1"}


def _random_urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


_EXAMPLE_URNS = (f"urn:uuid:00000000-0000-4000-8000-{n:012d}" for n in itertools.count(1))
EXAMPLE_BUNDLE = bundle(
    AssessmentOut.model_validate(EXAMPLE_ASSESSMENT),
    PhotoFacts("application/dicom", 1_440_842, "2jmj7l5rSw0yVb/vlWAYkK/YBwk=", 800, 600),
    FhirContext(subject="Patient/123", encounter="Encounter/456"),
    "en",
    issued=datetime(2026, 3, 15, 9, 15, tzinfo=UTC),
    new_urn=lambda: next(_EXAMPLE_URNS),
)


def is_fhir_preferred(accept: str | None) -> bool:
    """Whether the Accept header prefers application/fhir+json to plain JSON (by q-value; ties: JSON)."""
    if not accept:
        return False
    weights: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        weights[media] = max(weights.get(media, 0.0), quality)
    fhir = weights.get(FHIR_MEDIA_TYPE, 0.0)
    plain = max(weights.get(name, 0.0) for name in ("application/json", "application/*", "*/*"))
    return fhir > 0 and fhir > plain
