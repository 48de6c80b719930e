"""Serving an ASGI app on 127.0.0.1 in a background thread: for tests and benchmarks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(
    app, port: int | None = None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None, **uvicorn_kwargs
):
    """Run `app` under uvicorn on 127.0.0.1 (HTTPS with `ssl_certfile`); yields its base URL; stops it cleanly on
    exit."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        **uvicorn_kwargs,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"{'https' if ssl_certfile else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
