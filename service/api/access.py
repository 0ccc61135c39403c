"""Optional API keys: who may call `/v1/*`, and who may read `/metrics`.

Keys are kept only as SHA-256 digests (configure them as `sha256:<hex>` to keep plaintext out of env files)
and every comparison is constant-time. Missing or unknown credentials are 401 with `WWW-Authenticate`; a valid
key used where it has no right (an API key on a restricted `/metrics`) is 403.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from service.render.problems import ProblemError

_PREFIX = "sha256:"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(entries: Iterable[str]) -> tuple[bytes, ...]:
    """Configured keys -> digests. An entry is a key, or `sha256:` and the hex digest of one."""
    digests = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        if entry.startswith(_PREFIX):
            try:
                value = bytes.fromhex(entry[len(_PREFIX) :])
            except ValueError as error:
                raise ValueError(f"{entry[:12]}...: a sha256: entry must be 64 hex digits") from error
            if len(value) != 32:
                raise ValueError(f"{entry[:12]}...: a sha256: entry must be 64 hex digits")
            digests.append(value)
        else:
            digests.append(digest(entry))
    return tuple(digests)


def matches(key: str, digests: tuple[bytes, ...]) -> bool:
    candidate = digest(key)
    found = False
    for stored in digests:  # no early exit: the time taken does not depend on which entry matched
        found |= hmac.compare_digest(candidate, stored)
    return found


def _unauthorised(code: str, detail: str) -> ProblemError:
    return ProblemError(401, code, detail, {"WWW-Authenticate": 'Bearer realm="cervigate"'})


def check(key: str | None, allowed: tuple[bytes, ...], also_known: tuple[bytes, ...] = ()) -> None:
    """401 unless the request carried one of `allowed`; 403 for a key that is only in `also_known`."""
    if key is None:
        raise _unauthorised("missing_api_key", "send your API key as 'Authorization: Bearer <key>'")
    if matches(key, allowed):
        return
    if matches(key, also_known):
        raise ProblemError(403, "forbidden", "this key may not read this resource; use a key made for it")
    raise _unauthorised("invalid_api_key", "the API key is not valid; check the key the clinic was given")
