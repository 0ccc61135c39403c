"""Serves the capture web app at `/capture/`: the files `make web` built into service/web/static/.

Same origin as the API, so the page needs no CORS, and from the package itself, so it works on a clinic LAN
with no internet. The page is public (it holds no data; its API calls carry the key). Its headers lock it to
its own origin: scripts, styles, API calls and the camera stream from nowhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from service.render.problems import ProblemError

logger = logging.getLogger(__name__)

CAPTURE_PATH = "/capture"
BUILD_MANIFEST = "build.json"  # written last by web/build.mjs: its presence means the build finished

SECURITY_HEADERS = {
    # 'wasm-unsafe-eval' lets the device gate compile ONNX Runtime's WebAssembly (and nothing else: no eval
    # of strings); its threads are workers of the page's own origin.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: "
    "mediastream:; connect-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
    "worker-src 'self' blob:; manifest-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'",
    # Cross-origin isolation: what WebAssembly threads (SharedArrayBuffer) need; everything is same-origin.
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=()",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # The service worker keeps the offline copy; the HTTP cache only revalidates (ETag), so a new build is
    # picked up at the next load rather than after some max-age.
    "Cache-Control": "no-cache",
}


class CaptureFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def built(directory: Path) -> bool:
    return (directory / BUILD_MANIFEST).is_file()


def mount_capture_app(app: FastAPI, directory: Path) -> None:
    @app.get(CAPTURE_PATH, include_in_schema=False)
    async def capture_root() -> RedirectResponse:
        # The page, its service worker and its manifest resolve relative to /capture/.
        return RedirectResponse(CAPTURE_PATH + "/", status_code=308)

    if built(directory):
        app.mount(CAPTURE_PATH, CaptureFiles(directory=directory, html=True), name="capture")
        return

    logger.warning(
        "the capture app is not built in %s: run `make web` to serve it at %s/", directory, CAPTURE_PATH
    )

    @app.get(CAPTURE_PATH + "/{path:path}", include_in_schema=False)
    async def capture_not_built(path: str) -> Response:
        raise ProblemError(
            404,
            "capture_app_not_built",
            # No path in the answer: it goes to any client, and says nothing a client can act on.
            "the capture app is not built on this server; its operator runs `make web` (needs Node.js 20+ "
            "and npm), or uses the Docker image, which has it",
        )
