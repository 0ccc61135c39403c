"""The capture app's encrypted outbox (web/src/outbox.ts) in real Chromium against the real service.

The module is bundled with the repository's esbuild and loaded into a page on the service's own origin (a
loopback origin is a secure context: WebCrypto, Web Locks and crypto.randomUUID work there), so its
IndexedDB, its WebCrypto and its posts are the browser's own. Assessments are counted by the service's
stage metrics (`decode` is observed once per photo the pipeline assesses; warm-up does not count), so
"assessed exactly once" is what the server saw, not what the page says.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.capture_browser import chromium
from bench.run import Server

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ESBUILD = REPO / "web" / "node_modules" / ".bin" / "esbuild"
PASSPHRASE = "speculum-lugol-42"
LIMITS = {"maxItems": 8, "maxBytes": 8 * 1024 * 1024}
# Page-side helpers: the caller's `send` as the capture app would write it (the entry id as the key), a
# record of what each send got back, and raw reads of every IndexedDB record for the at-rest checks.
HELPERS = """
window.sends = [];
window.send = async (entry, body) => {
  const response = await fetch(entry.endpoint, {
    method: "POST", body, headers: { "Idempotency-Key": entry.id }, cache: "no-store",
  });
  let code;
  if (!response.ok) code = (await response.json().catch(() => ({}))).code;
  window.sends.push({
    id: entry.id, status: response.status, key: response.headers.get("Idempotency-Key"),
    replayed: response.headers.get("Idempotent-Replayed"),
  });
  return { status: response.status, code };
};
window.blob = (b64, type = "image/jpeg") =>
  new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type });
window.blob1 = (b64) => blob(b64);
window.openOutbox = async (limits, name) => {
  window.outbox = await OutboxModule.Outbox.open(limits, name);
  return window.outbox.locked;
};
window.errorName = async (call) => {
  try { await call(); return null; } catch (error) {
    for (const name of ["OutboxFull", "OutboxLocked"]) if (error instanceof OutboxModule[name]) return name;
    return String(error);
  }
};
window.rawRecords = async (name) => {
  const db = await new Promise((ok, fail) => {
    const req = indexedDB.open(name);
    req.onsuccess = () => ok(req.result);
    req.onerror = () => fail(req.error);
  });
  const out = [];
  const flatten = (value, store) => {
    if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
      const bytes = value instanceof ArrayBuffer ? new Uint8Array(value)
        : new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
      let text = "";
      for (let i = 0; i < bytes.length; i += 8192) {
        text += String.fromCharCode(...bytes.subarray(i, i + 8192));
      }
      out.push({ store, kind: "bytes", value: btoa(text) });
    } else if (value instanceof Blob) {
      out.push({ store, kind: "blob", value: "" });
    } else if (value && typeof value === "object") {
      for (const [k, v] of Object.entries(value)) {
        out.push({ store, kind: "name", value: k });
        flatten(v, store);
      }
    } else {
      out.push({ store, kind: typeof value, value: String(value) });
    }
  };
  for (const store of db.objectStoreNames) {
    const records = await new Promise((ok) => {
      const req = db.transaction(store).objectStore(store).getAll(); req.onsuccess = () => ok(req.result);
    });
    records.forEach((record) => flatten(record, store));
  }
  db.close();
  return out;
};
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not ESBUILD.is_file():
        pytest.skip("esbuild not installed: `cd web && npm ci` (make web does it)")
    out = tmp_path_factory.mktemp("outbox") / "outbox.js"
    subprocess.run(
        [str(ESBUILD), "--bundle", "--format=iife", "--global-name=OutboxModule", "--target=es2022",
         f"--outfile={out}", "--log-level=warning", str(REPO / "web" / "src" / "outbox.ts")],
        check=True,
    )  # fmt: skip
    return out.read_text()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess").running() as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    if path is None:
        pytest.skip("Chromium not found: `apt-get install chromium` (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh profile per test (its own IndexedDB); the bundle goes in as an inline script tag."""
    created = browser.new_context(bypass_csp=True)
    try:
        yield created
    finally:
        created.close()


@pytest.fixture(scope="module")
def photos(atlas_root: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(atlas_root.glob("images_*/case_*/*acetic*.jpg"))[:3]]


def _page(context: Any, server: Server, bundle: str) -> Any:
    page = context.new_page()
    _load(page, server, bundle)
    return page


def _load(page: Any, server: Server, bundle: str) -> None:
    if page.url.startswith(server.url):
        page.reload()
    else:
        page.goto(server.url + "/healthz")  # any page of the service's origin
    page.add_script_tag(content=bundle)
    page.add_script_tag(content=HELPERS)


def _open(page: Any, limits: dict[str, int] = LIMITS, name: str = "cervigate-outbox") -> bool:
    locked: bool = page.evaluate("([limits, name]) => openOutbox(limits, name)", [limits, name])
    return locked


def _add(page: Any, photos: list[bytes], endpoint: str = "/v1/assess", fields: dict | None = None) -> dict:
    encoded = [base64.b64encode(photo).decode() for photo in photos]
    entry: dict = page.evaluate(
        "([photos, endpoint, fields]) => outbox.add({ endpoint, photos: photos.map(blob1), fields })",
        [encoded, endpoint, fields],
    )
    return entry


def _sync(page: Any) -> dict:
    result: dict = page.evaluate("() => outbox.sync(send)")
    return result


def _metric(server: Server, name: str) -> float:
    for row in httpx.get(server.url + "/metrics").text.splitlines():
        if row.startswith(name + " "):
            return float(row.split()[-1])
    return 0.0


def _assessed(server: Server) -> float:
    return _metric(server, 'cervigate_stage_duration_seconds_count{stage="decode"}')


def _replayed(server: Server) -> float:
    return _metric(server, 'cervigate_idempotent_replays_total{endpoint="/v1/assess"}')


def test_a_stored_photo_survives_a_reload_and_is_assessed_once(
    context: Any, server: Server, bundle: str, photos: list[bytes]
) -> None:
    page = _page(context, server, bundle)
    assert _open(page) is True
    assert page.evaluate("() => outbox.hasPassphrase()") is False
    assert page.evaluate("(p) => outbox.unlock(p)", PASSPHRASE) is True  # the first unlock sets it
    entry = _add(page, photos[:1])
    assert entry["photos"] == 1 and entry["attempts"] == 0 and entry["failed"] is False
    assert entry["bytes"] > len(photos[0])  # ciphertext: the photo, a small header, the GCM tag

    _load(page, server, bundle)  # a reload forgets the key, not the entry
    assert _open(page) is True
    assert [e["id"] for e in page.evaluate("() => outbox.list()")] == [entry["id"]]
    assert page.evaluate("() => outbox.hasPassphrase()") is True
    assert page.evaluate("() => errorName(() => outbox.sync(send))") == "OutboxLocked"
    assert page.evaluate("() => outbox.unlock('not the passphrase')") is False
    assert page.evaluate("() => outbox.locked") is True
    assert page.evaluate("(p) => outbox.unlock(p)", PASSPHRASE) is True

    assessed = _assessed(server)
    result = page.evaluate("""() => {
      window.progress = [];
      return outbox.sync(send, (done, total) => progress.push([done, total]));
    }""")
    assert result == {"sent": [entry["id"]], "kept": [], "failed": []}
    assert page.evaluate("() => progress") == [[1, 1]]
    sends = page.evaluate("() => sends")
    assert sends == [{"id": entry["id"], "status": 200, "key": entry["id"], "replayed": None}]
    assert _assessed(server) == assessed + 1
    assert page.evaluate("() => outbox.list()") == []


def test_nothing_but_metadata_is_in_clear_at_rest(
    context: Any, server: Server, bundle: str, photos: list[bytes]
) -> None:
    page = _page(context, server, bundle)
    _open(page)
    page.evaluate("(p) => outbox.unlock(p)", PASSPHRASE)
    assert page.evaluate("() => outbox.key.extractable") is False  # not even this page can export it
    _add(page, photos[:1])
    exam = _add(page, photos[1:3], "/v1/exams", {"stages": "saline,acetic"})
    records = page.evaluate("() => rawRecords('cervigate-outbox')")
    assert not [r for r in records if r["kind"] == "blob"]  # a Blob would sit on disk in clear
    stored = [base64.b64decode(r["value"]) for r in records if r["kind"] == "bytes"]
    payloads = [b for b in stored if len(b) > 1000]
    assert len(payloads) == 2
    for data in stored:
        assert not data.startswith(b"\xff\xd8\xff")
        for photo in photos:
            assert photo[1000:1064] not in data  # no run of a photo's bytes, anywhere
    texts = " ".join(r["value"] for r in records if r["kind"] in ("string", "name"))
    assert "saline" not in texts  # the fields are encrypted with the photos
    ivs = [b for b in stored if len(b) == 12]
    assert len(set(ivs)) == len(ivs) == 3  # a fresh IV per record: two payloads and the verifier

    sent = page.evaluate("() => outbox.sync(send)")["sent"]
    assert exam["id"] in sent and len(sent) == 2  # the exam's photos and stages decrypt to a valid request
    assert all(s["status"] == 200 for s in page.evaluate("() => sends"))


def test_a_full_outbox_refuses_more(context: Any, server: Server, bundle: str, photos: list[bytes]) -> None:
    page = _page(context, server, bundle)
    _open(page, {"maxItems": 2, "maxBytes": 8 * 1024 * 1024}, "by-count")
    page.evaluate("(p) => outbox.unlock(p)", PASSPHRASE)
    _add(page, photos[:1])
    _add(page, photos[1:2])
    encoded = base64.b64encode(photos[2]).decode()
    add = "(p) => errorName(() => outbox.add({ endpoint: '/v1/assess', photos: [blob(p)] }))"
    assert page.evaluate(add, encoded) == "OutboxFull"
    usage = page.evaluate("() => outbox.usage()")
    assert usage["count"] == 2 and usage["maxItems"] == 2

    limit = len(photos[0]) + len(photos[1]) // 2  # one photo fits, two do not
    _open(page, {"maxItems": 8, "maxBytes": limit}, "by-bytes")
    page.evaluate("(p) => outbox.unlock(p)", PASSPHRASE)
    assert page.evaluate("() => outbox.locked") is False
    _add(page, photos[:1])
    assert page.evaluate(add, base64.b64encode(photos[1]).decode()) == "OutboxFull"
    usage = page.evaluate("() => outbox.usage()")
    assert usage["count"] == 1 and usage["bytes"] <= limit


def test_an_unanswered_send_keeps_the_entry_and_a_refused_one_is_marked_failed(
    context: Any, server: Server, bundle: str, photos: list[bytes]
) -> None:
    page = _page(context, server, bundle)
    _open(page)
    page.evaluate("(p) => outbox.unlock(p)", PASSPHRASE)
    first, second = _add(page, photos[:1]), _add(page, photos[1:2])
    overloaded = {"status": 503, "content_type": "application/problem+json", "body": '{"code":"overloaded"}'}
    page.route("**/v1/assess", lambda route: route.fulfill(**overloaded))
    result = _sync(page)
    assert result == {"sent": [], "kept": [first["id"], second["id"]], "failed": []}  # stops at "later"
    assert len(page.evaluate("() => sends")) == 1
    page.unroute("**/v1/assess")
    page.route("**/v1/assess", lambda route: route.abort())  # the network is gone
    assert _sync(page)["kept"] == [first["id"], second["id"]]
    entries = {e["id"]: e for e in page.evaluate("() => outbox.list()")}
    assert entries[first["id"]]["attempts"] == 2 and entries[first["id"]]["lastError"] == "network"
    assert entries[second["id"]]["attempts"] == 0  # never reached
    page.unroute("**/v1/assess")

    refused = page.evaluate(
        "() => outbox.add({ endpoint: '/v1/assess', photos: [blob(btoa('not a photo'))] })"
    )
    result = _sync(page)
    assert result == {"sent": [first["id"], second["id"]], "kept": [], "failed": [refused["id"]]}
    [kept] = page.evaluate("() => outbox.list()")
    assert kept["id"] == refused["id"] and kept["failed"] is True and kept["lastError"] == "undecodable_image"
    sends = len(page.evaluate("() => sends"))
    assert _sync(page) == {"sent": [], "kept": [], "failed": []}  # a failed entry is not sent again
    assert len(page.evaluate("() => sends")) == sends
    page.evaluate("(id) => outbox.remove(id)", refused["id"])
    assert page.evaluate("() => outbox.list()") == []


def test_a_lost_answer_is_replayed_by_the_service_not_assessed_again(
    context: Any, server: Server, bundle: str, photos: list[bytes]
) -> None:
    page = _page(context, server, bundle)
    _open(page)
    page.evaluate("(p) => outbox.unlock(p)", PASSPHRASE)
    entry = _add(page, photos[2:3])
    assessed, replayed = _assessed(server), _replayed(server)

    def lose_the_answer(route: Any) -> None:
        route.fetch()  # the service receives, assesses and answers...
        route.abort()  # ...and the answer never reaches the phone

    page.route("**/v1/assess", lose_the_answer)
    assert _sync(page)["kept"] == [entry["id"]]
    page.unroute("**/v1/assess")
    assert _assessed(server) == assessed + 1
    assert page.evaluate("() => outbox.list()")[0]["attempts"] == 1

    second = _sync(page)
    assert second["sent"] == [entry["id"]], (second, page.evaluate("() => [sends, outbox.list()]"))
    [sent] = page.evaluate("() => sends")
    assert sent["status"] == 200 and sent["replayed"] == "true" and sent["key"] == entry["id"]
    assert _assessed(server) == assessed + 1  # exactly once
    assert _replayed(server) == replayed + 1


def test_two_tabs_syncing_at_once_send_each_entry_once(
    context: Any, server: Server, bundle: str, photos: list[bytes]
) -> None:
    tabs = [_page(context, server, bundle) for _ in range(2)]
    for tab in tabs:
        _open(tab)
        assert tab.evaluate("(p) => outbox.unlock(p)", PASSPHRASE) is True  # the second checks the first's
    ids = {_add(tabs[0], [photo])["id"] for photo in photos}
    for tab in tabs:  # both start before either awaits
        tab.evaluate("() => { window.syncing = outbox.sync(send); }")
    results = [tab.evaluate("() => window.syncing") for tab in tabs]
    sent = [set(result["sent"]) for result in results]
    assert sent[0] | sent[1] == ids and not sent[0] & sent[1]
    sends = [s for tab in tabs for s in tab.evaluate("() => sends")]
    assert len(sends) == len(ids) and all(s["replayed"] is None for s in sends)
