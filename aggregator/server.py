"""Runs the aggregator app under uvicorn."""

from __future__ import annotations

import uvicorn

from fedbpt_wire.federation import RunConfig

from .app import create_app


def serve(config: RunConfig, db_path: str, host: str = "127.0.0.1", port: int = 8100,
          enroll_key: str | None = None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """HTTPS when `ssl_certfile` is given (with the key in it or in `ssl_keyfile`), else plain HTTP."""
    uvicorn.run(create_app(config, db_path, enroll_key=enroll_key), host=host, port=port, log_level="info",
                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
