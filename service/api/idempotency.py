"""`Idempotency-Key` (IETF draft-ietf-httpapi-idempotency-key-header) for /v1/assess and /v1/exams.

A phone that stored photos offline posts them when the network comes back, and a link that drops mid-answer
makes it post the same photo again. With a key, the service answers a repeat from a store instead of
assessing it twice: the same status and body, `Idempotent-Replayed: true`. A repeat that arrives while the
first is still computing waits for that answer rather than computing it again.

The fingerprint a key is bound to is a SHA-256 of what was received, as parsed: the path and query, what
was negotiated from the headers (the language, JSON or FHIR), each photo's declared type and bytes, and the
stage hints. Not the raw bytes: a browser gives every send of the same FormData a new random multipart
boundary, and a proxy or another HTTP stack may send other raw Accept headers for the same request, so a
raw digest would refuse honest retries as reused keys.

Only 2xx answers are stored (a 4xx or 5xx can be retried), in process memory, least recently used first
out beyond `idempotency_max_bytes`, each for `idempotency_window_s`. Several replicas therefore need the
load balancer to route by key (sticky on the `Idempotency-Key` header) or a shared store (not built).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Response

from service.io.decoding import UploadRejected
from service.io.uploads import Photo
from service.render.problems import ProblemError
from service.settings import Settings
from service.telemetry import Metrics

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_KEY = re.compile(KEY_PATTERN)
_ENTRY_OVERHEAD = 512  # bytes an entry costs beside its body: the key, the digests, the headers, the dict
_STORED_HEADERS = ("content-type", "content-language", "vary")


@dataclass(frozen=True)
class IdempotencyKey:
    """A validated client key and whose it is: the digest of the API key it came with (b"" when the service
    is open), so two clinics that pick the same key never see each other's answers."""

    value: str
    scope: bytes = b""


def parse_key(value: str, scope: bytes = b"") -> IdempotencyKey:
    if not _KEY.fullmatch(value):
        raise ProblemError(
            422,
            "invalid_idempotency_key",
            f"{HEADER} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'; send a UUID",
        )
    return IdempotencyKey(value, scope)


def fingerprint(path: str, query: str, photos: Iterable[Photo], fields: Iterable[str]) -> bytes:
    """SHA-256 of a request as parsed (module docstring: why not of its raw bytes). Every piece is
    length-prefixed, so no two different requests run together into the same byte stream."""
    digest = hashlib.sha256()

    def add(piece: bytes) -> None:
        digest.update(len(piece).to_bytes(8, "big"))
        digest.update(piece)

    for text in (path, query, *fields):
        add(text.encode("utf-8"))
    for photo in photos:
        add(photo.media_type.encode("latin-1"))
        digest.update(photo.size.to_bytes(8, "big"))
        for chunk in photo.chunks:  # hashlib releases the GIL on large buffers: call this off the loop
            digest.update(chunk)
    return digest.digest()


@dataclass
class _Stored:
    fingerprint: bytes
    status: int
    body: bytes
    headers: dict[str, str]
    expires: float

    @property
    def cost(self) -> int:
        return len(self.body) + _ENTRY_OVERHEAD


@dataclass
class _Pending:
    fingerprint: bytes
    done: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0


class IdempotencyStore:
    """Answers by (scope, key): the 2xx ones stored, the ones being computed awaited. Used from the event
    loop only, so it needs no lock."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.window_s, self.max_bytes = settings.idempotency_window_s, settings.idempotency_max_bytes
        self.metrics, self.retry_after = metrics, str(settings.retry_after_s)
        self._stored: OrderedDict[tuple[bytes, str], _Stored] = OrderedDict()  # least recently used first
        self._pending: dict[tuple[bytes, str], _Pending] = {}
        self.bytes = 0

    def waiting(self, key: IdempotencyKey) -> int:
        """Requests now waiting for the first one with this key to finish (tests, diagnostics)."""
        pending = self._pending.get((key.scope, key.value))
        return pending.waiting if pending else 0

    def __len__(self) -> int:
        return len(self._stored)

    async def answer(
        self,
        key: IdempotencyKey,
        fingerprint: bytes,
        produce: Callable[[], Awaitable[Response]],
        *,
        endpoint: str,
        wait_s: float,
    ) -> Response:
        """The stored answer for `key`, else the one the request computing it now gives, else `produce()`'s
        (stored when 2xx). `wait_s` bounds the wait for another request's answer."""
        slot = (key.scope, key.value)
        waited_until = time.monotonic() + wait_s
        while True:
            stored = self._lookup(slot)
            if stored is not None:
                self._check(stored.fingerprint, fingerprint)
                self.metrics.idempotent_replays.labels(endpoint).inc()
                return self._replay(stored, key)
            pending = self._pending.get(slot)
            if pending is None:
                break
            self._check(pending.fingerprint, fingerprint)
            await self._wait(pending, waited_until - time.monotonic())
            # Done: its answer is stored (replayed on the next turn), or it failed and this one computes.
        pending = self._pending[slot] = _Pending(fingerprint)
        try:
            response = await produce()
            self._keep(slot, fingerprint, response)
        finally:
            del self._pending[slot]
            pending.done.set()
        response.headers[HEADER] = key.value
        return response

    async def _wait(self, pending: _Pending, seconds: float) -> None:
        pending.waiting += 1
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await pending.done.wait()
        except TimeoutError as error:
            raise ProblemError(
                409,
                "idempotency_key_in_use",
                f"a request with this {HEADER} is still being processed; retry it with the same key shortly",
                {"Retry-After": self.retry_after},
            ) from error
        finally:
            pending.waiting -= 1

    @staticmethod
    def _check(expected: bytes, got: bytes) -> None:
        if expected != got:
            raise ProblemError(
                422,
                "idempotency_key_reused",
                f"this {HEADER} was used for a different request; send each new request with a new key",
            )

    def _lookup(self, slot: tuple[bytes, str]) -> _Stored | None:
        stored = self._stored.get(slot)
        if stored is None:
            return None
        if stored.expires <= time.monotonic():
            self._drop(slot)
            return None
        self._stored.move_to_end(slot)
        return stored

    def _keep(self, slot: tuple[bytes, str], fingerprint: bytes, response: Response) -> None:
        if not 200 <= response.status_code < 300:
            return
        headers = {name: response.headers[name] for name in _STORED_HEADERS if name in response.headers}
        stored = _Stored(fingerprint, response.status_code, bytes(response.body), headers,
                         time.monotonic() + self.window_s)  # fmt: skip
        if stored.cost > self.max_bytes:  # could never fit: served, not kept
            return
        self._stored[slot] = stored
        self.bytes += stored.cost
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._stored)))
        self.metrics.idempotency_bytes.set(self.bytes)

    def _drop(self, slot: tuple[bytes, str]) -> None:
        self.bytes -= self._stored.pop(slot).cost
        self.metrics.idempotency_bytes.set(self.bytes)

    @staticmethod
    def _replay(stored: _Stored, key: IdempotencyKey) -> Response:
        headers = stored.headers | {HEADER: key.value, REPLAYED_HEADER: "true"}
        return Response(stored.body, status_code=stored.status, headers=headers)


@asynccontextmanager
async def echoing(key: IdempotencyKey | None) -> AsyncIterator[None]:
    """Problem answers carry the key back too, so a client matches every answer to what it sent."""
    try:
        yield
    except ProblemError as error:
        if key is not None:
            error.headers = error.headers | {HEADER: key.value}
        raise
    except UploadRejected as error:
        if key is None:
            raise
        raise ProblemError(error.status, error.code, str(error), {HEADER: key.value}) from error
