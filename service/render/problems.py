"""RFC 9457 problem responses: every error the service returns, with a stable `code` to switch on."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.io.decoding import UploadRejected
from service.render.schemas import Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"

# code -> title. Codes are a public contract: add, never rename.
TITLES = {
    "empty_upload": "The upload is empty",
    "upload_too_large": "The upload is too large",
    "too_many_pixels": "The image has too many pixels",
    "image_too_small": "The image is too small",
    "unsupported_media_type": "Unsupported content type",
    "unsupported_image_type": "Unsupported image format",
    "undecodable_image": "The image cannot be decoded",
    "animated_image": "Animated images are not accepted",
    "too_many_scans": "The JPEG has too many scans",
    "missing_image": "No image in the request",
    "duplicate_image": "More than one image in the request",
    "malformed_multipart": "The multipart body is malformed",
    "invalid_request": "Invalid request parameters",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "overloaded": "The service is busy",
    "not_ready": "The service is not ready",
    "internal_error": "Internal error",
    "missing_api_key": "An API key is required",
    "invalid_api_key": "The API key is not valid",
    "forbidden": "Not allowed with this key",
    "upload_timeout": "The upload took too long",
    "header_timeout": "The request headers took too long",
    "headers_too_large": "The request headers are too large",
    "malformed_request": "The request is not valid HTTP",
    "deadline_exceeded": "No answer within the deadline",
    "inference_unavailable": "The inference server is unavailable",
    "client_disconnected": "The client disconnected",
    "too_many_photos": "Too many photos in the exam",
    "invalid_stages": "The stage hints do not fit the photos",
    "not_dicom": "The body is not a DICOM file",
    "truncated_dicom": "The DICOM file is truncated",
    "invalid_dicom": "The DICOM file is malformed",
    "unsupported_dicom_class": "Unsupported DICOM object class",
    "wrong_modality": "The DICOM modality is not a photograph",
    "multi_frame_dicom": "Multi-frame DICOM files are not accepted",
    "missing_pixel_data": "The DICOM file has no pixel data",
    "incomplete_pixel_module": "The DICOM image pixel module is incomplete",
    "unsupported_pixel_format": "Unsupported DICOM pixel format",
    "unsupported_transfer_syntax": "Unsupported DICOM transfer syntax",
    "invalid_idempotency_key": "The Idempotency-Key is not valid",
    "idempotency_key_reused": "The Idempotency-Key was used for another request",
    "idempotency_key_in_use": "A request with this Idempotency-Key is still being processed",
}


class ProblemError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def problem(
    status: int, code: str, detail: str, *, instance: str | None = None, request_id: str | None = None
) -> Problem:
    """The RFC 9457 body for `code`; the app's handlers and the connection layer both answer with it."""
    return Problem(
        type=f"urn:cervigate:problem:{code}",
        title=TITLES.get(code, "Error"),
        status=status,
        detail=detail,
        code=code,
        instance=instance,
        request_id=request_id,
    )


def problem_response(
    request: Request, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body = problem(status, code, detail, instance=request.url.path, request_id=request_id)
    request.state.log_fields = {"problem": code}
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, error: ProblemError) -> JSONResponse:
        return problem_response(request, error.status, error.code, error.detail, error.headers)

    @app.exception_handler(UploadRejected)
    async def _rejected(request: Request, error: UploadRejected) -> JSONResponse:
        return problem_response(request, error.status, error.code, str(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        where = "; ".join(
            f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in error.errors()
        )
        return problem_response(request, 422, "invalid_request", where or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(
            error.status_code, f"http_{error.status_code}"
        )
        return problem_response(
            request, error.status_code, code, str(error.detail), dict(error.headers or {})
        )
