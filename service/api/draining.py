"""Every refusal reaches the client, whatever it is still sending.

A server that answers (413, 401, 503...) before it has read the request body, then closes the connection,
resets it under a client that is still sending: the client sees a network error, never the answer. Most
HTTP clients (httpx, requests, OkHttp) only read the response once their body is sent. So, as mature servers
do (nginx's lingering close), the unread rest of a refused body is read and discarded before the answer goes
out, up to a hard bound in bytes and seconds so a 10 GB upload cannot hold the server; past the bound the
answer goes out with `Connection: close` and the client may still see a reset. A client that sent
`Expect: 100-continue` (curl does for large bodies) and has not been asked for its body is answered at once:
it never sends the body; so is a client refused for being too slow (408).
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class _Body:
    declared: int | None  # Content-Length, when sent
    expects_continue: bool
    received: int = 0
    started: bool = False  # the app asked for the body: the client has been told to send it
    done: bool = False  # the body has been read to its end (or the client left)


class DrainRefusedBodies:
    """ASGI middleware: before a response starts, read and discard what is left of the request body."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_seconds: float) -> None:
        self.app, self.max_bytes, self.max_seconds = app, max_bytes, max_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _request_body(scope)

        async def tracking_receive() -> Message:
            message = await receive()
            _track(body, message)
            return message

        async def draining_send(message: Message) -> None:
            starting = message["type"] == "http.response.start"
            # A 408 went to a client that was too slow already: waiting for the rest of its body would only
            # hold its answer back (by up to `max_seconds`): it goes at once, and the connection closes.
            too_slow = message.get("status") == 408
            if starting and not body.done and (too_slow or not await self._drain(body, receive)):
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracking_receive, draining_send)

    async def _drain(self, body: _Body, receive: Receive) -> bool:
        """Whether the body was read to its end (else the connection must close after the answer)."""
        if body.expects_continue and not body.started:
            return False  # the client waits for "100 Continue" and sends nothing until it gets it
        if body.declared is not None and body.declared - body.received > self.max_bytes:
            return False  # more than the bound is still to come: reading part of it would not help
        limit = body.received + self.max_bytes
        with anyio.move_on_after(self.max_seconds):
            while not body.done and body.received <= limit:
                _track(body, await receive())
        return body.done


def _request_body(scope: Scope) -> _Body:
    headers = dict(scope.get("headers", []))
    length = headers.get(b"content-length", b"")
    declared = int(length) if length.isdigit() else None
    chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
    return _Body(
        declared=declared,
        expects_continue=headers.get(b"expect", b"").lower() == b"100-continue",
        done=declared in (None, 0) and not chunked,  # no body at all (a GET)
    )


def _track(body: _Body, message: Message) -> None:
    if message["type"] == "http.request":
        body.started = True
        body.received += len(message.get("body", b""))
        body.done = body.done or not message.get("more_body", False)
    elif message["type"] == "http.disconnect":
        body.done = True
