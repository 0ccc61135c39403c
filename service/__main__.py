"""`python -m service`: run the API with uvicorn, configured by CERVIGATE_* variables.

On SIGTERM or SIGINT the service first turns `/readyz` to 503 and keeps serving for `shutdown_drain_s`, so
load balancers stop sending it work; then uvicorn stops accepting connections, lets in-flight requests finish
for up to `shutdown_grace_s`, and exits. A second signal during the drain stops at once.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service import sizing
from service.api.http_protocol import guarded_h11
from service.app import create_app
from service.settings import Settings
from service.telemetry import configure_logging

log = logging.getLogger("cervigate")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s = app, drain_s
        self._drain: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None:  # a second signal: no more waiting
            self._drain.cancel()
            super().handle_exit(sig, frame)
            return
        self.app.state.draining = True
        log.info("draining", extra={"signal": sig, "drain_s": self.drain_s})
        self._drain = threading.Timer(self.drain_s, super().handle_exit, args=(sig, frame))
        self._drain.daemon = True
        self._drain.start()


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    # The server process only (not tests or tools that import the app): set before any photo is decoded.
    sizing.set_mmap_threshold(settings.malloc_mmap_threshold_bytes)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging configured above
        access_log=False,  # the service writes its own access log, without query strings
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
        # h11 with a header bound and deadline, answering in problem+json (service/api/http_protocol.py);
        # no WebSocket upgrades: the API has none, so an upgrade request is an ordinary (refused) request.
        http=guarded_h11(settings.header_timeout_s, settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        ws="none",
    )
    DrainingServer(config, app, settings.shutdown_drain_s).run()


if __name__ == "__main__":
    main()
