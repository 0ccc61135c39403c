"""Read the photo out of a request: multipart field `image`, or a raw `image/*` or `application/dicom`
body; or an exam's photos (`image` repeated, with an optional `stages` field).

The body is parsed as it streams in, chunk by chunk, with hard limits on its size and its parts: the event
loop never spends more than a chunk's worth of parsing at a time (20 MB joined and parsed in one go held it
for 20 ms; one 256 KiB chunk takes 0.15 ms: bench/loop_stall.py), and nothing is spooled to a temporary
file, so patient photos never touch the disk. A photo's chunks are joined only in the worker thread
(`Photo.data`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import get_args

import anyio
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.io.dicom import DICOM_MEDIA_TYPE
from service.render.problems import ProblemError
from service.render.schemas import StageName

IMAGE_FIELD = "image"
STAGES_FIELD = "stages"
STAGE_HINTS: tuple[str, ...] = get_args(StageName)
AUTO_STAGE = "auto"
MAX_PARTS = 16  # a photo upload has one or two parts; thousands of tiny ones are an attack on the parser
MAX_FIELD_BYTES = 4096  # a non-file field (the stages list) is a short string
MAX_PREAMBLE_BYTES = 4096  # text before the first boundary (RFC 2046 lets a client send some: it is ignored)
_RAW_TYPES = ("application/octet-stream", DICOM_MEDIA_TYPE)
# The parser logs client-supplied header text at warning level; the service logs its own, sanitised, line.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass
class Photo:
    """One photo's bytes as they arrived."""

    chunks: list[bytes] = field(default_factory=list)
    media_type: str = ""  # as the client declared it (the body's or the part's), lower case

    @property
    def declared_dicom(self) -> bool:
        return self.media_type == DICOM_MEDIA_TYPE

    @property
    def size(self) -> int:
        return sum(map(len, self.chunks))

    def data(self) -> bytes:
        """The photo as one bytes object: a copy of it all, so call it on a worker thread."""
        return b"".join(self.chunks)


def _no_progress_watch() -> None:
    pass


async def read_image(
    request: Request, max_bytes: int, timeout_s: float, progress: Callable[[], None] = _no_progress_watch
) -> Photo:
    """The request's photo; `progress` is called whenever part of the body arrives."""
    media_type, params = _accepted_type(request, multipart_only=False)
    if media_type == b"multipart/form-data":
        form = _StreamingForm(params, max_images=1, max_parts=MAX_PARTS)
        await _read_in_time(request, max_bytes, timeout_s, form.feed, progress)
        photo = _only_image(form.finish())
    else:
        photo = Photo(media_type=media_type.decode("latin-1").lower())
        await _read_in_time(request, max_bytes, timeout_s, photo.chunks.append, progress)
    if not photo.size:
        raise ProblemError(400, "empty_upload", "the image is empty: attach the photo")
    return photo


@dataclass(frozen=True)
class ExamUpload:
    """An exam's photos in request order, each with the stage the client says it shows (None: not said)."""

    photos: list[Photo]
    stage_hints: list[str | None]


async def read_exam(
    request: Request,
    max_bytes: int,
    max_photos: int,
    timeout_s: float,
    progress: Callable[[], None] = _no_progress_watch,
) -> ExamUpload:
    """Up to `max_photos` photos as repeated `image` parts, and an optional `stages` field: one stage per
    photo, comma-separated, in the same order (acetic, saline, iodine, green, or auto / empty for "not
    said"). Empty or oversize photos are left for the caller to refuse one by one."""
    _, params = _accepted_type(request, multipart_only=True)
    form = _StreamingForm(params, max_images=max_photos, max_parts=max_photos + MAX_PARTS)
    await _read_in_time(request, max_bytes, timeout_s, form.feed, progress)
    parts = form.finish()
    if not parts.images:
        raise _missing_image(parts)
    return ExamUpload(parts.images, _stage_hints(parts.fields.get(STAGES_FIELD), len(parts.images)))


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
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        # Not decoded here (a gzip bomb stays a few KB); a photo is compressed already anyway.
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {_shown(encoding)} is not accepted: send the photo as it is, unencoded",
        )
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    media = media_type.decode("latin-1").lower()
    if media == "multipart/form-data":
        return b"multipart/form-data", params
    if multipart_only:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"content type {_shown(media)} is not accepted: send multipart/form-data with one "
            f"'{IMAGE_FIELD}' part per photo",
        )
    if not media.startswith("image/") and media not in _RAW_TYPES:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"content type {_shown(media)} is not accepted: send multipart/form-data with an "
            f"'{IMAGE_FIELD}' field, or the photo itself with an image/* or {DICOM_MEDIA_TYPE} content type",
        )
    return media_type, params


def _shown(value: str, limit: int = 40) -> str:
    """A client's header value as an error detail quotes it: printable, and short (a 20 KB Content-Type
    came back whole)."""
    printable = "".join(c for c in value[: limit + 1] if c.isprintable())
    return "(none)" if not printable else printable if len(printable) <= limit else printable[:limit] + "..."


async def _read_in_time(
    request: Request,
    max_bytes: int,
    timeout_s: float,
    consume: Callable[[bytes], None],
    progress: Callable[[], None],
) -> None:
    try:
        with anyio.fail_after(timeout_s):
            await _read_body(request, max_bytes, consume, progress)
    except TimeoutError as error:
        message = f"the photo did not arrive within {timeout_s:g} s; send it again"
        raise ProblemError(408, "upload_timeout", message) from error
    except ClientDisconnect as error:
        raise ProblemError(
            400, "client_disconnected", "the client closed the connection mid-upload"
        ) from error


async def _read_body(
    request: Request, max_bytes: int, consume: Callable[[bytes], None], progress: Callable[[], None]
) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        if chunk:
            progress()
            consume(chunk)


def _too_large(max_bytes: int) -> ProblemError:
    message = f"the upload is over {describe_size(max_bytes)}; send a smaller photo"
    return ProblemError(413, "upload_too_large", message)


def describe_size(size: int) -> str:
    return f"{size / 1_048_576:g} MB" if size >= 1_048_576 else f"{size / 1024:g} KB"


@dataclass
class _Form:
    images: list[Photo] = field(default_factory=list)
    fields: dict[str, list[bytes]] = field(default_factory=dict)  # parts without a file name, in order
    names: list[str] = field(default_factory=list)  # the first few part names, for error messages


class _StreamingForm:
    """multipart/form-data parsed chunk by chunk as it arrives: `image` parts become `Photo`s (their data
    kept as the parser hands it over, never copied whole), other parts without a file name become short
    fields, anything else is skipped."""

    def __init__(self, params: dict[bytes, bytes], *, max_images: int, max_parts: int) -> None:
        boundary = params.get(b"boundary")
        if not boundary:
            raise ProblemError(400, "malformed_multipart", "the multipart content type has no boundary")
        self.max_images, self.max_parts = max_images, max_parts
        self.form = _Form()
        self._parts = 0
        self._ended = False
        self._header_name: list[bytes] = []
        self._header_value: list[bytes] = []
        self._disposition = b""
        self._part_type = b""
        self._sink: Callable[[bytes], None] | None = None
        self._field_name = ""
        self._field: list[bytes] | None = None
        # Until the first boundary: python-multipart refuses a preamble, so it is found and dropped here.
        self._first_boundary: bytes | None = b"--" + boundary
        self._preamble = b""
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.append(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.append(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except (MultipartParseError, ValueError) as error:
            raise ProblemError(400, "malformed_multipart", "the multipart boundary is not valid") from error

    def feed(self, chunk: bytes) -> None:
        if self._first_boundary is not None:
            chunk = self._without_preamble(chunk)
            if not chunk:
                return
        try:
            self._parser.write(chunk)
        except (MultipartParseError, ValueError) as error:
            # The parser's message can quote client headers (file names): keep it out of the response.
            raise ProblemError(400, "malformed_multipart", "the multipart body cannot be parsed") from error

    def _without_preamble(self, chunk: bytes) -> bytes:
        """`chunk` from the first boundary on, or b"" while the preamble before it goes on."""
        assert self._first_boundary is not None
        seen = self._preamble + chunk
        if seen.startswith(self._first_boundary):
            start = 0
        else:
            found = seen.find(b"\r\n" + self._first_boundary)
            start = found + 2 if found >= 0 else -1
        # The same bound however the body was cut into reads (a boundary may straddle two of them).
        searched = len(seen) - len(self._first_boundary) - 2
        if start > MAX_PREAMBLE_BYTES + 2 or (start < 0 and searched > MAX_PREAMBLE_BYTES):
            raise ProblemError(
                400,
                "malformed_multipart",
                f"no multipart boundary in the first {MAX_PREAMBLE_BYTES} bytes of the body; check that the "
                "boundary in Content-Type is the one the body uses",
            )
        if start < 0:
            self._preamble = seen
            return b""
        self._first_boundary, self._preamble = None, b""
        return seen[start:]

    def finish(self) -> _Form:
        if not self._ended:
            raise ProblemError(
                400, "malformed_multipart", "the multipart body ends before its closing boundary"
            )
        return self.form

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > self.max_parts:
            raise ProblemError(400, "malformed_multipart", f"more than {self.max_parts} parts in the form")
        self._disposition, self._part_type, self._sink, self._field = b"", b"", None, None

    def _header_end(self) -> None:
        header = b"".join(self._header_name).lower()
        if header == b"content-disposition":
            self._disposition = b"".join(self._header_value)
        elif header == b"content-type":
            self._part_type = b"".join(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        # Browsers send a field name as raw UTF-8 (RFC 7578), which the parser hands over as bytes.
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if len(self.form.names) < 5:
            self.form.names.append(name)
        if name == IMAGE_FIELD:
            if len(self.form.images) == self.max_images:
                raise _too_many_images(self.max_images)
            part_type, _ = parse_options_header(self._part_type)
            photo = Photo(media_type=part_type.decode("latin-1").lower())
            self.form.images.append(photo)
            self._sink = photo.chunks.append
        elif b"filename" not in options or name == STAGES_FIELD:  # stages sent as a file are stages too
            self._field_name, self._field = name, []
            self._sink = self._field_data

    def _field_data(self, data: bytes) -> None:
        assert self._field is not None
        self._field.append(data)
        if sum(map(len, self._field)) > MAX_FIELD_BYTES:
            # Usually a photo sent in a part without the right Content-Disposition name: say so.
            which = (
                f"the form field {self._field_name[:40]!r}" if self._field_name else "a nameless form part"
            )
            raise ProblemError(
                400,
                "malformed_multipart",
                f"{which} is over {MAX_FIELD_BYTES} bytes; send the photo as a file part named "
                f"'{IMAGE_FIELD}' (Content-Disposition: form-data; name=\"{IMAGE_FIELD}\"; filename=...)",
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None and end > start:
            self._sink(data[start:end])

    def _part_end(self) -> None:
        if self._field is not None:
            self.form.fields.setdefault(self._field_name, []).append(b"".join(self._field))
        self._sink, self._field = None, None

    def _end(self) -> None:
        self._ended = True


def _only_image(form: _Form) -> Photo:
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
