"""Read the photo out of a request: multipart field `image`, or a raw `image/*` body.

The body is read into memory with a hard size limit and parsed there: Starlette's form parser would
spool files over 1 MB to a temporary file, and patient photos must never touch the disk.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import Field, File, FormParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.render.problems import ProblemError

IMAGE_FIELD = "image"
MAX_PARTS = 16  # a photo upload has one or two parts; thousands of tiny ones are an attack on the parser
_RAW_TYPES = ("application/octet-stream",)
# The parser logs client-supplied header text at warning level; the service logs its own, sanitised, line.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


async def read_image(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    media = media_type.decode("latin-1").lower()
    if media != "multipart/form-data" and not media.startswith("image/") and media not in _RAW_TYPES:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"content type {media or '(none)'} is not accepted: send multipart/form-data with an "
            f"'{IMAGE_FIELD}' field, or the photo itself with an image/* content type",
        )
    try:
        with anyio.fail_after(timeout_s):
            body = await _read_body(request, max_bytes)
    except TimeoutError as error:
        message = f"the photo did not arrive within {timeout_s:g} s; send it again"
        raise ProblemError(408, "upload_timeout", message) from error
    except ClientDisconnect as error:
        raise ProblemError(
            400, "client_disconnected", "the client closed the connection mid-upload"
        ) from error
    # Parsed on the event loop: the body is in memory and at most MAX_PARTS parts are read, so the pure-Python
    # header parsing is bounded (~0.1 ms for a photo); a thread hop would cost more than it saves.
    data = (
        _image_from_multipart(body, media_type, params, max_bytes) if media == "multipart/form-data" else body
    )
    if not data:
        raise ProblemError(400, "empty_upload", "the image is empty: attach the photo")
    return data


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ProblemError:
    limit = f"{max_bytes / 1_048_576:g} MB" if max_bytes >= 1_048_576 else f"{max_bytes / 1024:g} KB"
    return ProblemError(413, "upload_too_large", f"the upload is over {limit}; send a smaller photo")


def _image_from_multipart(
    body: bytes, media_type: bytes, params: dict[bytes, bytes], max_bytes: int
) -> bytes:
    boundary = params.get(b"boundary")
    if not boundary:
        raise ProblemError(400, "malformed_multipart", "the multipart content type has no boundary")
    images: list[bytes] = []
    seen: list[str] = []  # the first few field names, for the error message
    parts = [0]
    ended = [False]

    def count(name: str) -> None:
        parts[0] += 1
        if len(seen) < 5:
            seen.append(name)
        if parts[0] > MAX_PARTS:
            raise ProblemError(
                400, "malformed_multipart", f"more than {MAX_PARTS} parts; send one '{IMAGE_FIELD}'"
            )

    def on_field(field: Field) -> None:  # a part without a filename
        name = (field.field_name or b"").decode("latin-1")
        count(name)
        if name == IMAGE_FIELD:
            images.append(field.value or b"")

    def on_file(file: File) -> None:
        name = (file.field_name or b"").decode("latin-1")
        count(name)
        if name == IMAGE_FIELD:
            file.file_object.seek(0)
            images.append(file.file_object.read())
        file.close()

    def on_end() -> None:
        ended[0] = True

    # The whole body is already in memory and bounded, so the parser may keep every part in memory too.
    config = {"MAX_MEMORY_FILE_SIZE": max_bytes + 1, "MAX_BODY_SIZE": max_bytes, "UPLOAD_DIR": None}
    try:
        parser = FormParser(
            media_type.decode("latin-1"), on_field, on_file, on_end=on_end, boundary=boundary, config=config
        )
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as error:
        # The parser's message can quote client headers (file names): keep it out of the response.
        raise ProblemError(400, "malformed_multipart", "the multipart body cannot be parsed") from error
    if not ended[0]:
        raise ProblemError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    if not images:
        fields = ", ".join(repr(name[:40]) for name in seen[:5]) or "none"
        raise ProblemError(
            422,
            "missing_image",
            f"no '{IMAGE_FIELD}' field in the form (fields sent: {fields}); "
            f"attach the photo as '{IMAGE_FIELD}'",
        )
    if len(images) > 1:
        raise ProblemError(
            422, "duplicate_image", f"{len(images)} '{IMAGE_FIELD}' fields; send one photo per request"
        )
    return images[0]
