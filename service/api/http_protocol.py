"""The HTTP/1.1 connection layer: what the app never sees, answered as the app would answer.

uvicorn's httptools parser puts no bound on header size (a 200 MB header was read into memory) and no
server in uvicorn bounds how long request headers may take (a slowloris connection stayed open for good).
So the service runs uvicorn's h11 protocol (same latency here: 1.1 against 1.0-1.6 ms for a bare GET,
measured back to back) with:
- a header bound: more than `max_header_bytes` before the headers end gets 431, and the buffer never grows
  past it;
- a header deadline: request headers not complete within `header_timeout_s` of the first byte (or of the
  connection opening) get 408, and the connection closes;
- every answer of its own, those two and h11's 400s for malformed requests, as problem+json with a
  stable code, instead of uvicorn's plain text;
- and, as ASGI middleware (`RequestHeadGuard`), the header bound for headers that came in one read, and a
  400 for a request framed two ways at once.
"""

from __future__ import annotations

import asyncio
import uuid
from http import HTTPStatus
from typing import Any

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.render.problems import PROBLEM_MEDIA_TYPE, problem

LINGER_S, LINGER_BYTES = 2.0, 1024 * 1024


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a header deadline and problem+json answers. Configure with `guarded_h11`."""

    header_timeout_s = 10.0
    max_header_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = -1  # bytes dropped since our own answer went out; -1 until then

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a byte is a slow request too

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:  # answered already: what the client still sends is read and dropped
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        super().data_received(data)
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # the headers are in (or the connection is done)
        else:
            self._arm_header_timer()  # part of a request line or of its headers: the clock runs

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request that came in with the last one may be only partly here: its clock runs now.
        waiting = self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]
        if waiting and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (malformed, or headers past the bound): say so as problem+json."""
        pending, _ = self.conn.trailing_data
        if len(pending) > self.max_header_bytes:
            detail = f"the request headers are over {self.max_header_bytes} bytes"
            self._answer(431, "headers_too_large", detail)
        else:
            self._answer(400, "malformed_request", "the request is not valid HTTP/1.1; check the client")

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        # Armed only when the connection opened or part of a request came in: between two requests of a
        # keep-alive connection it is not, and uvicorn's keep-alive timeout closes an idle one.
        self._answer(
            408, "header_timeout", f"the request headers did not arrive within {self.header_timeout_s:g} s"
        )

    def _answer(self, status: int, code: str, detail: str) -> None:
        """Write the problem straight to the socket and close: there is no request for h11 to answer."""
        body = problem_bytes(status, code, detail)
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: {PROBLEM_MEDIA_TYPE}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        # Closing with unread bytes in the socket resets the connection, and a client still sending (a
        # 200 KB header) would see the reset, not the answer: so, as nginx's lingering close does, say
        # that nothing more comes, read and drop what still arrives for a moment, then close.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._lingering = 0
        self.loop.call_later(LINGER_S, self.transport.close)


def problem_bytes(status: int, code: str, detail: str) -> bytes:
    """A problem+json body for answers given before (or instead of) the app's own handlers."""
    body = problem(status, code, detail, request_id=str(uuid.uuid4()))
    return body.model_dump_json(exclude_none=True).encode()


class RequestHeadGuard:
    """ASGI middleware for what h11 lets through, answered before the app sees the request:
    - request headers (with the request target) over `max_header_bytes` get 431. h11 bounds only headers
      still incomplete, so a large header that arrives in one read would pass it;
    - a request with both Content-Length and Transfer-Encoding gets 400 and the connection closes
      (RFC 9112 section 6.1 lets a server reject it, and requires the close either way). h11 frames such a
      body by Transfer-Encoding; a proxy in front that framed it by Content-Length would read the rest as a
      second request (request smuggling)."""

    def __init__(self, app: ASGIApp, max_header_bytes: int) -> None:
        self.app, self.max_header_bytes = app, max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        size += sum(len(name) + len(value) + 4 for name, value in headers)  # ": " and CRLF
        names = {name for name, _ in headers}
        if size > self.max_header_bytes:
            detail = f"the request headers are over {self.max_header_bytes} bytes"
            await _refuse(send, 431, "headers_too_large", detail)
        elif b"content-length" in names and b"transfer-encoding" in names:
            detail = "send either Content-Length or Transfer-Encoding, not both"
            await _refuse(send, 400, "malformed_request", detail)
        else:
            await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, code: str, detail: str) -> None:
    body = problem_bytes(status, code, detail)
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded_h11(header_timeout_s: float, max_header_bytes: int) -> type[GuardedH11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with the service's settings."""
    return type(
        "ConfiguredH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
    )
