"""Read the photo out of a request: multipart field `image`, or a raw `image/*` body; or an exam's photos
(`image` repeated, with an optional `stages` field).

The body is read into memory with a hard size limit and parsed there: Starlette's form parser would
spool files over 1 MB to a temporary file, and patient photos must never touch the disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import get_args

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import Field, File, FormParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.render.problems import ProblemError
from service.render.schemas import StageName

IMAGE_FIELD = "image"
STAGES_FIELD = "stages"
STAGE_HINTS: tuple[str, ...] = get_args(StageName)
AUTO_STAGE = "auto"
MAX_PARTS = 16  # a photo upload has one or two parts; thousands of tiny ones are an attack on the parser
_RAW_TYPES = ("application/octet-stream",)
# The parser logs client-supplied header text at warning level; the service logs its own, sanitised, line.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


async def read_image(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    media_type, params = _accepted_type(request, multipart_only=False)
    body = await _read_in_time(request, max_bytes, timeout_s)
    # Parsed on the event loop: the body is in memory and at most MAX_PARTS parts are read, so the pure-Python
    # header parsing is bounded (~0.1 ms for a photo); a thread hop would cost more than it saves.
    if media_type == b"multipart/form-data":
        form = _parse_form(body, media_type, params, max_bytes, max_images=1, max_parts=MAX_PARTS)
        data = _only_image(form)
    else:
        data = body
    if not data:
        raise ProblemError(400, "empty_upload", "the image is empty: attach the photo")
    return data


@dataclass(frozen=True)
class ExamUpload:
    """An exam's photos in request order, each with the stage the client says it shows (None: not said)."""

    photos: list[bytes]
    stage_hints: list[str | None]


async def read_exam(request: Request, max_bytes: int, max_photos: int, timeout_s: float) -> ExamUpload:
    """Up to `max_photos` photos as repeated `image` parts, and an optional `stages` field: one stage per
    photo, comma-separated, in the same order (acetic, saline, iodine, green, or auto / empty for "not
    said"). Empty or oversize photos are left for the caller to refuse one by one."""
    media_type, params = _accepted_type(request, multipart_only=True)
    body = await _read_in_time(request, max_bytes, timeout_s)
    form = _parse_form(
        body, media_type, params, max_bytes, max_images=max_photos, max_parts=max_photos + MAX_PARTS
    )
    if not form.images:
        raise _missing_image(form)
    return ExamUpload(form.images, _stage_hints(form.fields.get(STAGES_FIELD), len(form.images)))


def _stage_hints(values: list[bytes] | None, count: int) -> list[str | None]:
    if values is None:
        return [None] * count
    hints = [hint.strip().lower() for hint in values[0].decode("latin-1").split(",")]
    allowed = (*STAGE_HINTS, AUTO_STAGE, "")
    if len(values) > 1 or len(hints) != count or any(hint not in allowed for hint in hints):
        raise ProblemError(
            422,
            "invalid_stages",
            f"send one '{STAGES_FIELD}' field listing one stage per photo ({count}), comma-separated, each "
            f"one of {', '.join(STAGE_HINTS)} or {AUTO_STAGE}",
        )
    return [hint if hint in STAGE_HINTS else None for hint in hints]


def _accepted_type(request: Request, *, multipart_only: bool) -> tuple[bytes, dict[bytes, bytes]]:
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    media = media_type.decode("latin-1").lower()
    if media == "multipart/form-data":
        return b"multipart/form-data", params
    if multipart_only:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"content type {media or '(none)'} is not accepted: send multipart/form-data with one "
            f"'{IMAGE_FIELD}' part per photo",
        )
    if not media.startswith("image/") and media not in _RAW_TYPES:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"content type {media or '(none)'} is not accepted: send multipart/form-data with an "
            f"'{IMAGE_FIELD}' field, or the photo itself with an image/* content type",
        )
    return media_type, params


async def _read_in_time(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    try:
        with anyio.fail_after(timeout_s):
            return await _read_body(request, max_bytes)
    except TimeoutError as error:
        message = f"the photo did not arrive within {timeout_s:g} s; send it again"
        raise ProblemError(408, "upload_timeout", message) from error
    except ClientDisconnect as error:
        raise ProblemError(
            400, "client_disconnected", "the client closed the connection mid-upload"
        ) from error


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
    message = f"the upload is over {describe_size(max_bytes)}; send a smaller photo"
    return ProblemError(413, "upload_too_large", message)


def describe_size(size: int) -> str:
    return f"{size / 1_048_576:g} MB" if size >= 1_048_576 else f"{size / 1024:g} KB"


@dataclass
class _Form:
    images: list[bytes]
    fields: dict[str, list[bytes]]  # other parts without a file name, every value in order
    names: list[str]  # the first few part names, for error messages


def _parse_form(
    body: bytes,
    media_type: bytes,
    params: dict[bytes, bytes],
    max_bytes: int,
    *,
    max_images: int,
    max_parts: int,
) -> _Form:
    boundary = params.get(b"boundary")
    if not boundary:
        raise ProblemError(400, "malformed_multipart", "the multipart content type has no boundary")
    form = _Form(images=[], fields={}, names=[])
    count = [0]
    ended = [False]

    def part(name: str, value: bytes, is_file: bool) -> None:
        count[0] += 1
        if len(form.names) < 5:
            form.names.append(name)
        if count[0] > max_parts:
            raise ProblemError(400, "malformed_multipart", f"more than {max_parts} parts in the form")
        if name == IMAGE_FIELD:
            if len(form.images) == max_images:
                raise _too_many_images(max_images)
            form.images.append(value)
        elif not is_file:
            form.fields.setdefault(name, []).append(value)

    def on_field(field: Field) -> None:  # a part without a filename
        part((field.field_name or b"").decode("latin-1"), field.value or b"", is_file=False)

    def on_file(file: File) -> None:
        file.file_object.seek(0)
        part((file.field_name or b"").decode("latin-1"), file.file_object.read(), is_file=True)
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
    return form


def _only_image(form: _Form) -> bytes:
    if not form.images:
        raise _missing_image(form)
    return form.images[0]


def _missing_image(form: _Form) -> ProblemError:
    fields = ", ".join(repr(name[:40]) for name in form.names) or "none"
    return ProblemError(
        422,
        "missing_image",
        f"no '{IMAGE_FIELD}' field in the form (fields sent: {fields}); attach the photo as '{IMAGE_FIELD}'",
    )


def _too_many_images(max_images: int) -> ProblemError:
    if max_images == 1:
        return ProblemError(
            422, "duplicate_image", f"more than one '{IMAGE_FIELD}' field; send one photo per request"
        )
    return ProblemError(
        422, "too_many_photos", f"more than {max_images} photos; an exam takes at most {max_images}"
    )
