"""FastAPI dependencies: the ready service, the response language, the review extras asked for, the API-key
checks, and the `Annotated[..., Depends()]` aliases the routes use.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per
request for work that never blocks (measured: most of the cost of a 503 under overload).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api import access, idempotency
from service.api.handling import AssessmentService
from service.render import fhir
from service.render.problems import ProblemError
from service.render.reasons import negotiate_language
from service.render.schemas import StageName
from service.settings import Settings

INCLUDE_PATTERN = r"^(mask|overlay)(,(mask|overlay))*$"
EXAM_INCLUDE_PATTERN = r"^(mask|overlay|contact_sheet)(,(mask|overlay|contact_sheet))*$"


@dataclass(frozen=True)
class Keys:
    """Digests of the configured API keys and metrics keys (service.api.access)."""

    api: tuple[bytes, ...]
    metrics: tuple[bytes, ...]


async def get_service(request: Request) -> AssessmentService:
    service: AssessmentService | None = getattr(request.app.state, "service", None)
    if service is None or not request.app.state.ready:
        retry_after = str(request.app.state.settings.retry_after_s)
        raise ProblemError(
            503, "not_ready", "the models are still loading; retry shortly", {"Retry-After": retry_after}
        )
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_language(accept_language: Annotated[str | None, Header()] = None) -> str:
    return negotiate_language(accept_language)


async def refuse_repeated_query(request: Request) -> None:
    """Every query parameter of the API is single-valued: a repeated one is refused, since the framework
    would validate (and use) only its last value (`include=bogus&include=mask` passed; a repeated `subject`
    would have put the report on the second patient)."""
    for name in dict.fromkeys(request.query_params.keys()):
        if len(request.query_params.getlist(name)) > 1:
            raise ProblemError(
                422, "invalid_request", f"{name[:40]} is given more than once; give it once, comma-separated"
            )


async def get_include(
    include: Annotated[
        str | None,
        Query(
            pattern=INCLUDE_PATTERN, description="comma-separated extras: mask (lesion PNG), overlay (JPEG)"
        ),
    ] = None,
) -> set[str]:
    return set(include.split(",")) if include else set()


async def get_exam_include(
    include: Annotated[
        str | None,
        Query(
            pattern=EXAM_INCLUDE_PATTERN,
            description="comma-separated extras: mask and overlay (per photo), contact_sheet (the exam's)",
        ),
    ] = None,
) -> set[str]:
    return set(include.split(",")) if include else set()


async def get_stage(
    stage: Annotated[
        StageName,
        Query(
            description="the exam stage the photo should show: acetic (default) flags a photo that does not "
            "look taken after acetic acid (`not_acetic`); saline, iodine or green (an exam's other views, "
            "e.g. the capture app's saline step) check framing and quality only"
        ),
    ] = "acetic",
) -> str:
    return stage


SubjectQuery = Annotated[
    str | None,
    Query(
        pattern=r"^Patient/[A-Za-z0-9\-.]{1,64}$",
        description="FHIR output: the report's subject, e.g. `Patient/123` (else the DICOM PatientID)",
    ),
]
EncounterQuery = Annotated[
    str | None,
    Query(
        pattern=r"^Encounter/[A-Za-z0-9\-.]{1,64}$",
        description="FHIR output: the report's encounter, e.g. `Encounter/456` (else the DICOM AdmissionID)",
    ),
]


async def get_fhir(
    subject: SubjectQuery = None,
    encounter: EncounterQuery = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> fhir.FhirContext | None:
    """The FHIR output's references when the client prefers `application/fhir+json`; None for JSON."""
    if not fhir.is_fhir_preferred(accept):
        return None
    return fhir.FhirContext(subject=subject, encounter=encounter)


async def get_fhir_always(subject: SubjectQuery = None, encounter: EncounterQuery = None) -> fhir.FhirContext:
    return fhir.FhirContext(subject=subject, encounter=encounter)


# The two ways a client may send its key, as OpenAPI security schemes: /docs then offers "Authorize" and
# generated clients know where the key goes. Neither refuses by itself; `require_*` decide.
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="`Authorization: Bearer <key>`: the clinic's API key"
)
api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="apiKey", description="the same key as a header"
)


async def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    header: Annotated[str | None, Security(api_key_header)],
) -> str | None:
    if bearer is not None and bearer.credentials.strip():
        return bearer.credentials.strip()
    return header or None


PresentedKey = Annotated[str | None, Depends(presented_key)]


async def require_api_key(request: Request, key: PresentedKey) -> None:
    """Attached to /v1/* only when keys are configured (service.app), so the schema shows it only then."""
    access.check(key, request.app.state.keys.api)
    # Whose request this is, for what a key scopes (Idempotency-Key): FastAPI resolves a router's
    # dependencies before the route's own, so get_idempotency_key below sees it.
    request.state.api_key_digest = access.digest(key) if key is not None else b""


async def require_metrics_key(request: Request, key: PresentedKey) -> None:
    keys: Keys = request.app.state.keys
    if keys.metrics:
        access.check(key, keys.metrics, also_known=keys.api)


async def get_idempotency_key(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="a client-generated id (1-64 of A-Z a-z 0-9 _ -, e.g. a UUID) that makes a retry "
            "safe: a repeat within CERVIGATE_IDEMPOTENCY_WINDOW_S gets the first answer again, with "
            "`Idempotent-Replayed: true`, instead of a new assessment; the same key with another request "
            "is 422 idempotency_key_reused. The answer echoes it",
            json_schema_extra={"pattern": idempotency.KEY_PATTERN},
        ),
    ] = None,
) -> idempotency.IdempotencyKey | None:
    if idempotency_key is None:
        return None
    return idempotency.parse_key(idempotency_key, getattr(request.state, "api_key_digest", b""))


ServiceDep = Annotated[AssessmentService, Depends(get_service)]
LanguageDep = Annotated[str, Depends(get_language)]
IncludeDep = Annotated[set[str], Depends(get_include)]
ExamIncludeDep = Annotated[set[str], Depends(get_exam_include)]
StageDep = Annotated[str, Depends(get_stage)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
FhirDep = Annotated[fhir.FhirContext | None, Depends(get_fhir)]
FhirAlwaysDep = Annotated[fhir.FhirContext, Depends(get_fhir_always)]
IdempotencyDep = Annotated[idempotency.IdempotencyKey | None, Depends(get_idempotency_key)]
