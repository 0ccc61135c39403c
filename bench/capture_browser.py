"""Drives the capture web app in real Chromium with a fake camera, for its tests (tests/test_capture_app.py)
and its benchmark (bench/capture.py): the atlas scenes the camera plays, the browser's launch flags, and
what the page is watched through (its status element, its requests).

Chromium comes from Debian (`apt-get install chromium`), driven by Playwright's Python API through
`executable_path`: Playwright's own browser download is never used.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter

from bench.fake_camera import Scene, write_y4m

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
# One cervix: a sharp photo after acetic acid, and the same cervix after Lugol's iodine.
SCENE_CASE = "case_AACD"
CAMERA_SIZE = (800, 600)  # the atlas's own size: the still is full size, the preview frames 640x480
CAMERA_FPS = 10
TEST_HOST = "cervigate.test"  # a name, not localhost: only https:// makes it a secure context


def chromium() -> str | None:
    return next((path for name in CHROMIUM_CANDIDATES if (path := shutil.which(name))), None)


def atlas_scenes(atlas: Path, seconds: float = 2.5) -> list[Scene]:
    """Sharp, then out of focus (Gaussian blur, sigma 1 % of the short side), then iodine, then sharp."""
    case = next(atlas.glob(f"images_*/{SCENE_CASE}"))
    sharp = Image.open(case / "2_After_acetic_acid.jpg").convert("RGB")
    iodine = Image.open(next(case.glob("*_After_Lugol*_iodine.jpg"))).convert("RGB")
    blurred = sharp.filter(ImageFilter.GaussianBlur(0.01 * min(sharp.size)))
    return [
        Scene("sharp", sharp, seconds),
        Scene("out_of_focus", blurred, seconds),
        Scene("iodine", iodine, seconds),
        Scene("sharp_again", sharp, seconds),
    ]


def camera_video(atlas: Path, out: Path, seconds: float = 2.5) -> Path:
    write_y4m(out, atlas_scenes(atlas, seconds), CAMERA_SIZE, CAMERA_FPS)
    return out


def launch_args(video: Path) -> list[str]:
    return [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",  # grants the camera without a prompt
        f"--use-file-for-fake-video-capture={video}",
        f"--host-resolver-rules=MAP {TEST_HOST} 127.0.0.1",
    ]


def settings_script(**settings: Any) -> str:
    """An init script that stores the page's settings before it loads (as the settings dialog would)."""
    return f"localStorage.setItem('cervigate.settings', {json.dumps(json.dumps(settings))});"


# Every change of the status element (state, reason, text), with the time: what the worker saw, in order.
STATUS_RECORDER = """
window.__statusLog = [];
document.addEventListener('DOMContentLoaded', () => {
  const status = document.getElementById('status');
  new MutationObserver(() => {
    const entry = {t: performance.now(), state: status.dataset.state, reason: status.dataset.reason || '',
                   text: document.getElementById('status-text').textContent,
                   advice: document.getElementById('advice').textContent};
    const last = window.__statusLog[window.__statusLog.length - 1];
    if (!last || last.state !== entry.state || last.reason !== entry.reason || last.text !== entry.text)
      window.__statusLog.push(entry);
  }).observe(status, {attributes: true, childList: true, subtree: true, characterData: true});
});
"""


# What the page posts, recorded by wrapping fetch from outside the app (the browser's network events do not
# carry blob bodies): each upload's path, size and pixel size, and an exam's form fields.
UPLOAD_RECORDER = """
window.__uploads = [];
const pageFetch = window.fetch.bind(window);
window.fetch = (input, init) => {
  const body = init && init.body;
  const entry = {path: new URL(String(input), location.href).pathname, bytes: null, width: null, height: null,
                 images: [], fields: {}};
  window.__uploads.push(entry);
  const measure = (blob, into) => createImageBitmap(blob)
    .then(b => { into.width = b.width; into.height = b.height; b.close(); }).catch(() => {});
  if (body instanceof Blob) { entry.bytes = body.size; measure(body, entry); }
  if (body instanceof FormData) {
    for (const [name, value] of body.entries()) {
      if (value instanceof Blob) { const image = {name, bytes: value.size}; entry.images.push(image);
                                   measure(value, image); }
      else entry.fields[name] = value;
    }
  }
  return pageFetch(input, init);
};
"""


@dataclass
class RequestWatch:
    """The page's photo uploads as the browser's network layer saw them: how many were open at once."""

    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, page: Any) -> RequestWatch:
        page.on("request", self._started)
        page.on("requestfinished", self._ended)
        page.on("requestfailed", self._ended)
        return self

    @staticmethod
    def _is_api(request: Any) -> bool:
        # Photos posted to the API (the device gate's model downloads are GETs, made once, in parallel)
        return "/v1/" in request.url and request.method == "POST"

    def _started(self, request: Any) -> None:
        if self._is_api(request):
            with self._lock:
                self.requests.append(request)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _ended(self, request: Any) -> None:
        if self._is_api(request):
            with self._lock:
                self.in_flight -= 1

    def to(self, path: str) -> list[Any]:
        return [r for r in self.requests if path in r.url]


# --- the device gate against the service -------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    kind: str  # sharp, blurred, dark, iodine, no_cervix
    name: str
    jpeg: bytes


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)  # as the capture app encodes its preview frames
    return buffer.getvalue()


def parity_frames(atlas: Path, per_kind: int = 8) -> list[Frame]:
    """640x480 preview frames of each kind the gate judges, from real photos: atlas photos after acetic
    acid as they are, out of focus (sigma 1 % of the short side), dark (a quarter of the light), atlas
    photos after Lugol's iodine, and photos with no cervix (scikit-image's sample photos)."""
    from skimage import data as samples  # the train extra: make test installs it

    def preview(image: Image.Image) -> Image.Image:
        return image.convert("RGB").resize((640, 480), Image.Resampling.BILINEAR)

    def spread(paths: list[Path]) -> list[Path]:  # one photo per case first, across the atlas
        by_case: dict[str, Path] = {}
        for path in sorted(paths):
            by_case.setdefault(path.parent.name, path)
        return list(by_case.values())[:per_kind]

    acetic = [
        preview(Image.open(p)) for p in spread(list(atlas.glob("images_*/case_*/*_After_acetic_acid.jpg")))
    ]
    iodine = spread(list(atlas.glob("images_*/case_*/*_After_Lugol*_iodine.jpg")))
    frames = [Frame("sharp", f"acetic {i}", _jpeg(im)) for i, im in enumerate(acetic)]
    frames += [
        Frame("blurred", f"acetic {i}", _jpeg(im.filter(ImageFilter.GaussianBlur(0.01 * min(im.size)))))
        for i, im in enumerate(acetic)
    ]
    frames += [Frame("dark", f"acetic {i}", _jpeg(im.point(lambda v: v // 4))) for i, im in enumerate(acetic)]
    frames += [Frame("iodine", p.parent.name, _jpeg(preview(Image.open(p)))) for p in iodine]
    # scikit-image's sample photos that are not cervices (the detector trained on them: parity, not rejection)
    others = (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
    )
    frames += [
        Frame("no_cervix", name, _jpeg(preview(Image.fromarray(getattr(samples, name)()))))
        for name in others[:per_kind]
    ]
    return frames


DEVICE_ASSESS = """async ([b64, stage]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  return await window.cervigate.deviceGate.assessJpeg(bytes, stage);
}"""


def verdict(answer: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    return answer["decision"], tuple(r["code"] for r in answer["reasons"])


def wait_for_device_gate(page: Any, timeout_s: float = 120) -> dict[str, Any]:
    """The page loads the device gate by itself (from the service); returns its telemetry once ready."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = page.evaluate("window.cervigate.deviceGate")
        if state["ready"]:
            return state
        if state["error"]:
            raise RuntimeError(f"the device gate did not load: {state['error']}")
        time.sleep(0.2)
    raise TimeoutError(f"the device gate was not ready after {timeout_s:g} s")
