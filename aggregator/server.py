"""Runs the aggregator app under uvicorn."""

from __future__ import annotations

import uvicorn

from fedbpt_wire.federation import RunConfig

from .app import create_app


def serve(config: RunConfig, db_path: str, host: str = "127.0.0.1", port: int = 8100,
          enroll_key: str | None = None) -> None:
    uvicorn.run(create_app(config, db_path, enroll_key=enroll_key), host=host, port=port, log_level="info")
