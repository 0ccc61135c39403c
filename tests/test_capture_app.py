"""The capture web app in a real browser: Debian's Chromium, driven by Playwright, with a fake camera that
plays atlas photos (sharp, out of focus, iodine, sharp again; bench/capture_browser.py) against the service
running as `python -m service` does, over a real socket.

What the worker sees is read from the page (its status element, its result), what it sends from the
browser's own network events, so the page cannot vouch for itself.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.capture_browser import (
    CAMERA_SIZE,
    DEVICE_ASSESS,
    STATUS_RECORDER,
    TEST_HOST,
    UPLOAD_RECORDER,
    RequestWatch,
    camera_video,
    chromium,
    launch_args,
    parity_frames,
    settings_script,
    verdict,
    wait_for_device_gate,
)
from bench.run import Server
from service.render.reasons import MESSAGES, Reason

pytestmark = pytest.mark.slow
KEY = "capture-test-key"
PREVIEW_LONG_SIDE = 640
WAIT_S = 90  # how long a scene sequence may take on a loaded CI machine (the video loops every 10 s)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = chromium()
    if path is None:
        pytest.skip("Chromium not found: `apt-get install chromium` (.ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def video(atlas_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return camera_video(atlas_root, tmp_path_factory.mktemp("camera") / "atlas.y4m")


@contextmanager
def _running(env: dict[str, str] | None = None, trust: Path | None = None) -> Iterator[Server]:
    server = Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess", env=env or {})
    if trust is not None:
        server.scheme, server.verify = "https", ssl.create_default_context(cafile=trust)
    with server.running():
        yield server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with _running() as running:
        yield running


@pytest.fixture(scope="module")
def browser(chromium_path: str, video: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=launch_args(video))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., tuple[Any, RequestWatch]]]:
    """Opens the capture page with the given stored settings; returns the page and its request watch."""
    contexts = []

    def open_(
        url: str, ignore_https_errors: bool = False, init: str = "", **settings: Any
    ) -> tuple[Any, RequestWatch]:
        context = browser.new_context(
            permissions=["camera"],
            viewport={"width": 900, "height": 800},
            ignore_https_errors=ignore_https_errors,
        )
        contexts.append(context)
        context.add_init_script(settings_script(**settings))
        context.add_init_script(STATUS_RECORDER)
        context.add_init_script(UPLOAD_RECORDER)
        if init:
            context.add_init_script(init)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        watch = RequestWatch().attach(page)
        page.goto(url)
        return page, watch

    yield open_
    for context in contexts:
        context.close()


def _wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up after {timeout_s:g} s waiting for {what}")


def _status_log(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("window.__statusLog")


def _reasons_seen(page: Any) -> list[str]:
    """The overlay's verdicts in order, repeats folded: 'accept' or the first recapture reason."""
    seen: list[str] = []
    for entry in _status_log(page):
        shown = "accept" if entry["state"] in ("hold", "ready") else entry["reason"]
        if entry["state"] in ("hold", "ready", "recapture") and (not seen or seen[-1] != shown):
            seen.append(shown)
    return seen


def _contains_in_order(seen: list[str], expected: list[str]) -> bool:
    position = 0
    for shown in seen:
        if position < len(expected) and shown == expected[position]:
            position += 1
    return position == len(expected)


def _uploads(page: Any, path: str) -> list[dict[str, Any]]:
    return [u for u in page.evaluate("window.__uploads") if u["path"] == path]


def _size(upload: dict[str, Any]) -> tuple[int, int]:
    return upload["width"], upload["height"]


SCENE_ORDER = ["accept", Reason.OUT_OF_FOCUS.value, Reason.NOT_ACETIC.value, "accept"]


def test_the_overlay_follows_the_scenes_with_one_frame_in_flight(server: Server, open_page: Callable) -> None:
    page, watch = open_page(server.url + "/capture/", autoCaptureFrames=0, language="fr")
    page.click("#start")
    _wait_for(
        lambda: _contains_in_order(_reasons_seen(page), SCENE_ORDER), f"the overlay to show {SCENE_ORDER}"
    )
    log = _status_log(page)
    # The worker reads the service's own sentence, in the chosen language, and the advice with it.
    blurred = next(e for e in log if e["reason"] == Reason.OUT_OF_FOCUS.value)
    assert blurred["text"] == MESSAGES["fr"][Reason.OUT_OF_FOCUS]
    assert blurred["advice"]
    # While the frame passes (auto-capture off), the cervix box is drawn over the preview.
    _wait_for(lambda: page.eval_on_selector("#status", "e => e.dataset.state") == "ready", "a passing frame")
    drawn = page.evaluate(
        "() => { const c = document.getElementById('box'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
        " for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"
    )
    assert drawn > 0
    previews = watch.to("/v1/quality")
    assert watch.max_in_flight == 1 and len(previews) > 10
    assert _size(_uploads(page, "/v1/quality")[0]) == (PREVIEW_LONG_SIDE, PREVIEW_LONG_SIDE * 3 // 4)
    assert all(r.headers.get("accept-language") == "fr" for r in previews)
    assert not watch.to("/v1/assess")  # auto-capture off: nothing but the gate
    assert not page.errors


def test_auto_capture_fires_on_the_sharp_run_and_shows_the_assessment(
    server: Server, open_page: Callable, record_property: Callable[[str, object], None]
) -> None:
    page, watch = open_page(server.url + "/capture/", autoCaptureFrames=3)
    page.click("#start")
    result = page.wait_for_selector("#result:not([hidden])", timeout=WAIT_S * 1000)
    assert result.get_attribute("data-decision") == "diagnosis"
    assert page.eval_on_selector("#result-image", "img => img.complete && img.naturalWidth > 0")
    assert "%" in page.inner_text("#result-figures")
    capture = page.evaluate("window.cervigate.captures[0]")
    assert capture["trigger"] == "auto" and capture["decision"] == "diagnosis"
    # The still is the camera's full frame, not a preview frame.
    stills = _uploads(page, "/v1/assess")
    assert len(stills) == 1 and len(watch.to("/v1/assess")) == 1 and _size(stills[0]) == CAMERA_SIZE
    assert (capture["width"], capture["height"]) == CAMERA_SIZE
    # Three passing frames in a row came before it (the worker saw "hold still" count up; the third frame
    # takes the photo at once), and nothing else was sent while they were judged.
    before = watch.requests[: watch.requests.index(watch.to("/v1/assess")[0])][-3:]
    assert all("/v1/quality" in r.url and r.response().json()["decision"] == "accept" for r in before)
    log = _status_log(page)
    capturing = next(i for i, e in enumerate(log) if e["state"] == "capturing")
    assert [e["text"] for e in log[capturing - 2 : capturing]] == ["Hold still: 1 of 3", "Hold still: 2 of 3"]
    assert watch.max_in_flight == 1
    record_property("hold_still_to_assessment_ms", round(capture["shownAt"] - capture["holdStillAt"]))
    # Retake goes back to the live preview; the shutter takes a still at once.
    page.click("#retake")
    _wait_for(lambda: page.eval_on_selector("#result", "e => e.hidden"), "the result to close")
    page.evaluate("window.cervigate.captures.length = 0")
    page.click("#shutter")
    page.wait_for_selector("#result:not([hidden])", timeout=WAIT_S * 1000)
    assert page.evaluate("window.cervigate.captures[0].trigger") == "manual"
    assert not page.errors


def test_the_page_works_with_api_keys(open_page: Callable) -> None:
    with _running({"CERVIGATE_API_KEYS": json.dumps([KEY])}) as keyed:
        page, watch = open_page(keyed.url + "/capture/", autoCaptureFrames=0)
        page.click("#start")
        page.wait_for_selector("#settings[open]", timeout=WAIT_S * 1000)
        assert page.eval_on_selector("#notice", "e => e.dataset.code") == "keyNeeded"
        page.fill("#setting-key", KEY)
        page.click("#save-settings")
        _wait_for(lambda: len(_reasons_seen(page)) >= 2, "verdicts with the key")
        answered = [r for r in watch.to("/v1/quality") if r.response() and r.response().status == 200]
        assert answered and all(r.headers.get("authorization") == f"Bearer {KEY}" for r in answered)
        assert not any(KEY in r.url for r in watch.requests)  # never in a URL
        assert KEY in page.evaluate("localStorage.getItem('cervigate.settings')")
        assert watch.max_in_flight == 1


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TEST_HOST)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = x509.SubjectAlternativeName(
        [x509.DNSName(TEST_HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(alt_names, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_the_camera_needs_https_on_the_clinic_network(
    server: Server, open_page: Callable, tmp_path: Path
) -> None:
    # Over plain http from another machine (a name, not localhost) the browser gives no camera: the page says
    # how to fix it instead of failing silently.
    page, _ = open_page(f"http://{TEST_HOST}:{server.port}/capture/")
    assert page.eval_on_selector("#notice", "e => e.dataset.code") == "secureContext"
    assert page.is_disabled("#start")
    # With the service's TLS settings the same name is a secure context and the camera works.
    cert, key = _self_signed(tmp_path)
    env = {"CERVIGATE_TLS_CERTFILE": str(cert), "CERVIGATE_TLS_KEYFILE": str(key)}
    with _running(env, trust=cert) as secure:
        page, watch = open_page(
            f"https://{TEST_HOST}:{secure.port}/capture/", ignore_https_errors=True, autoCaptureFrames=0
        )
        assert page.evaluate("window.isSecureContext")
        page.click("#start")
        _wait_for(lambda: _reasons_seen(page), "a verdict over https")
        assert all(r.url.startswith("https://") for r in watch.requests)


def test_the_page_installs_and_opens_offline(server: Server, open_page: Callable) -> None:
    page, _ = open_page(server.url + "/capture/")
    manifest = page.evaluate("fetch('manifest.webmanifest').then(r => r.json())")
    assert manifest["display"] == "standalone" and {i["sizes"] for i in manifest["icons"]} >= {
        "192x192",
        "512x512",
    }
    page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    cached = page.evaluate(
        "caches.keys().then(keys => Promise.all(keys.map(k => caches.open(k).then(c => c.keys()))))"
        ".then(lists => lists.flat().map(r => new URL(r.url).pathname))"
    )
    assert {"/capture/", "/capture/app.js", "/capture/app.css", "/capture/manifest.webmanifest"} <= set(
        cached
    )
    page.context.set_offline(True)
    page.reload()
    assert page.inner_text("h1") == "CerviGate capture"
    assert page.is_visible("#start")


def test_the_exam_steps_through_saline_and_acetic_acid(server: Server, open_page: Callable) -> None:
    # A browser without ImageCapture (Safari, Firefox): the still is a full-size grab of the frame.
    page, watch = open_page(
        server.url + "/capture/",
        init="delete window.ImageCapture;",
        mode="exam",
        aceticWaitSeconds=2,
        autoCaptureFrames=2,
    )
    page.click("#start")
    _wait_for(lambda: page.inner_text("#step").startswith("Step 1"), "the saline step")
    # Between the photos: the countdown while the acetic acid works.
    _wait_for(
        lambda: any(e["state"] == "waiting" and "acetic acid" in e["text"] for e in _status_log(page)),
        "the acetic-acid countdown",
    )
    result = page.wait_for_selector("#result:not([hidden])", timeout=WAIT_S * 1000)
    exams = _uploads(page, "/v1/exams")
    assert len(exams) == 1 and len(watch.to("/v1/exams")) == 1
    assert [i["name"] for i in exams[0]["images"]] == ["image", "image"]
    assert exams[0]["fields"] == {"stages": "saline,acetic"}
    captures = page.evaluate("window.cervigate.captures")
    assert [(c["source"], c["width"], c["height"]) for c in captures] == [("canvas", *CAMERA_SIZE)] * 2
    # The saline step's preview asked for the saline stage, the acetic step's for acetic acid.
    stages = [r.url.rsplit("stage=", 1)[-1] for r in watch.to("/v1/quality")]
    assert stages[0] == "saline" and stages[-1] == "acetic"
    assert result.get_attribute("data-decision") in ("diagnosis", "recapture")
    assert not page.errors


def test_the_device_gate_agrees_with_the_service(
    server: Server, open_page: Callable, atlas_root: Path, record_property: Callable[[str, object], None]
) -> None:
    """The same preview frames (sharp, out of focus, dark, iodine, no cervix) judged by the service and by
    the page's own gate (ONNX Runtime Web on the manifests' models, checked by sha256): the same decision
    and reasons on at least 95 % of them."""
    page, _ = open_page(server.url + "/capture/")
    state = wait_for_device_gate(page)
    gate = httpx.get(server.url + "/v1/gate", timeout=10).json()
    assert state["downloadBytes"] == sum(m["bytes"] for m in gate["models"])
    frames = parity_frames(atlas_root, per_kind=6)
    assert {f.kind for f in frames} == {"sharp", "blurred", "dark", "iodine", "no_cervix"}
    differences = []
    for frame in frames:
        served = httpx.post(
            server.url + "/v1/quality", content=frame.jpeg, headers={"content-type": "image/jpeg"}, timeout=30
        ).json()
        device = page.evaluate(DEVICE_ASSESS, [base64.b64encode(frame.jpeg).decode(), "acetic"])
        if verdict(served) != verdict(device):
            differences.append((frame.kind, frame.name, verdict(served), verdict(device)))
    agreement = 1 - len(differences) / len(frames)
    record_property("device_gate_agreement", f"{agreement:.3f} of {len(frames)}: {differences}")
    assert agreement >= 0.95, differences


PASSPHRASE = "clinic-passphrase-1"


def test_offline_the_gate_goes_on_and_the_stored_photo_is_assessed_once_when_back(
    open_page: Callable,
) -> None:
    """The service stops after the page (and its device gate) loaded: the device gate gives live advice
    and auto-captures into the encrypted outbox; the service comes back on the same address: the photo is
    assessed exactly once (its outbox id as Idempotency-Key) and shown."""
    # No drain on SIGTERM: the service is gone at once (a draining one still answers for 3 s).
    env = {"CERVIGATE_SHUTDOWN_DRAIN_S": "0"}
    server = Server("cervigate", [sys.executable, "-m", "service"], "/readyz", "/v1/assess", env=env)
    with server.running():
        page, watch = open_page(server.url + "/capture/", autoCaptureFrames=3)
        wait_for_device_gate(page)
        assert page.eval_on_selector("#gate", "e => e.dataset.gate") == "server"
        server.stop()
        page.click("#start")
        _wait_for(
            lambda: page.eval_on_selector("#gate", "e => e.dataset.gate") == "device", "the device gate"
        )
        page.wait_for_selector("#unlock[open]", timeout=WAIT_S * 1000)  # the first photo kept asks for it
        page.fill("#unlock-passphrase", PASSPHRASE)
        page.click("[data-testid=unlock-submit]")
        page.wait_for_selector("#result[data-decision=stored]:not([hidden])", timeout=WAIT_S * 1000)
        # Live verdicts went on with the service down, and three passing ones took the photo. The camera
        # started after the service stopped, so every verdict in the log is the device gate's (counting from
        # the switch instead raced it: the device gate can pass three frames before the switch is polled).
        offline = _status_log(page)
        assert [e["text"] for e in offline if e["state"] == "hold"][:2] == [
            "Hold still: 1 of 3",
            "Hold still: 2 of 3",
        ]
        assert page.evaluate("window.cervigate.captures.at(-1).decision") == "stored"
        assert page.eval_on_selector("#outbox", "e => e.dataset.count") == "1"
        assert not watch.to("/v1/assess")
        server.start()
        page.click("#retake")
        _wait_for(
            lambda: page.evaluate("window.cervigate.forwarded.length") >= 1, "the stored photo's answer"
        )
        _wait_for(lambda: page.eval_on_selector("#outbox", "e => e.dataset.count") == "0", "an empty outbox")
        result = page.wait_for_selector("#result:not([hidden])", timeout=WAIT_S * 1000)
        forwarded = page.evaluate("window.cervigate.forwarded")
        assert (
            result.get_attribute("data-decision") == forwarded[-1]["decision"] in ("diagnosis", "recapture")
        )
        for entry in forwarded:
            sends = [r for r in watch.to("/v1/assess") if r.headers.get("idempotency-key") == entry["id"]]
            assert len(sends) == 1, entry
        # A reload finds nothing left to send.
        sent = len(watch.to("/v1/assess"))
        page.reload()
        time.sleep(3)
        assert len(watch.to("/v1/assess")) == sent
        assert page.eval_on_selector("#outbox", "e => e.dataset.count") == "0"
        assert not page.errors
