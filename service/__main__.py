"""`python -m service`: run the API with uvicorn, configured by CERVIGATE_* variables."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.settings import Settings
from service.telemetry import configure_logging


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging configured above
        access_log=False,  # the service writes its own access log, without query strings
        server_header=False,
    )


if __name__ == "__main__":
    main()
