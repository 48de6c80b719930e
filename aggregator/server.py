"""Runs the aggregator app under uvicorn."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from fedbpt_wire.asgi import harden
from fedbpt_wire.federation import RunConfig

from .app import create_app
from .coordinator import MAX_CLIENTS, MAX_REGISTRATIONS_PER_MINUTE

log = logging.getLogger(__name__)


def serve(
    config: RunConfig,
    db_path: str,
    host: str = "127.0.0.1",
    port: int = 8100,
    enroll_key: str | None = None,
    operator_key: str | None = None,
    max_clients: int = MAX_CLIENTS,
    max_registrations_per_minute: int = MAX_REGISTRATIONS_PER_MINUTE,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    options: dict | None = None,
    allowed_hosts: str = "*",
    exit_when_done: float | None = None,
    body_timeout: float | None = 60.0,
    docs: bool = False,
) -> int:
    """HTTPS when `ssl_certfile` is given (with the key in it or in `ssl_keyfile`), else plain HTTP.

    With `exit_when_done`, the server stops that many seconds after the run's last round closed (time for the
    clients to fetch the final prompt) and the status is 1 when no round merged; without it, it serves on."""
    app = create_app(
        config,
        db_path,
        enroll_key=enroll_key,
        operator_key=operator_key,
        max_clients=max_clients,
        max_registrations_per_minute=max_registrations_per_minute,
        body_timeout=body_timeout,
        docs=docs,
    )
    coordinator = app.state.coordinator
    harden(app, allowed_hosts)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            **(options or {}),
        )
    )
    outcome = {"status": 0}
    if exit_when_done is not None:

        def stop_when_done() -> None:
            while coordinator.state() != "done":
                time.sleep(0.5)
            merged = sum(r.state == "merged" for r in coordinator.store.rounds())
            if not merged:
                log.error("run %s ended with none of its rounds merged: no prompt was tuned", coordinator.config.run_id)
                outcome["status"] = 1
            time.sleep(exit_when_done)
            server.should_exit = True

        threading.Thread(target=stop_when_done, daemon=True).start()
    server.run()
    return outcome["status"]
