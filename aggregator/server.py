"""Runs the aggregator app under uvicorn."""

from __future__ import annotations

import uvicorn

from fedbpt_wire.asgi import harden
from fedbpt_wire.federation import RunConfig

from .app import create_app
from .coordinator import MAX_CLIENTS


def serve(config: RunConfig, db_path: str, host: str = "127.0.0.1", port: int = 8100,
          enroll_key: str | None = None, operator_key: str | None = None, max_clients: int = MAX_CLIENTS,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, options: dict | None = None,
          allowed_hosts: str = "*") -> None:
    """HTTPS when `ssl_certfile` is given (with the key in it or in `ssl_keyfile`), else plain HTTP."""
    app = create_app(config, db_path, enroll_key=enroll_key, operator_key=operator_key, max_clients=max_clients)
    harden(app, allowed_hosts)
    uvicorn.run(app, host=host, port=port, log_level="info", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                **(options or {}))
