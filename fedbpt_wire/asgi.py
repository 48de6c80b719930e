"""Pieces both servers use at their HTTP boundary: a body-size and body-time limit, readable 422s, and the
connection settings both expose as flags.

Imported by the servers only (it needs starlette/fastapi, which a client does not install).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class BodyLimit:
    """Answers 413 for a body over `max_bytes`, by Content-Length or while it streams in, and 408 for one that
    has not arrived whole within `read_timeout` seconds (a slow-body sender holds a connection and a buffer).

    The body is read here in full (the JSON endpoints read it whole anyway) and replayed to the app,
    so a chunked upload is cut off at the limit instead of being buffered without bound.
    """

    def __init__(self, app, max_bytes: int, read_timeout: float | None = 60.0):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        body = bytearray()
        deadline = time.monotonic() + self.read_timeout if self.read_timeout else None
        while True:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                return await send_error(send, 408, f"request body not received within {self.read_timeout:g} s")
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _too_large(send, self.max_bytes)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    await send_error(send, 413, f"request body over the limit of {limit} bytes")


async def send_error(send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A `{"detail": ...}` JSON answer sent straight from ASGI middleware, before any route runs."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def readable_422(request: Request, exc: RequestValidationError):
        errors = [{"field": _field(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return JSONResponse(status_code=422, content={"detail": summary, "errors": errors})


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Connection limits, the same flags on both servers; uvicorn enforces them (no socket code of ours)."""
    group = parser.add_argument_group("connections")
    group.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="concurrent connections and requests; beyond them new ones get 503 (default 256)",
    )
    group.add_argument(
        "--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection is held open (default 5)"
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        help="seconds a request body may take to arrive in full; slower ones get 408 (default 60)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=15.0,
        help="on SIGTERM/SIGINT, seconds to let in-flight requests finish before they are cancelled (default 15)",
    )
    group.add_argument(
        "--allowed-hosts",
        default="*",
        help="comma-separated Host header values to answer (e.g. 'fedbpt.example.org,127.0.0.1'); "
        "others get 400 (default '*': any)",
    )


def uvicorn_options(args: argparse.Namespace) -> dict:
    return {
        "limit_concurrency": args.max_connections,
        "timeout_keep_alive": args.keep_alive,
        "timeout_graceful_shutdown": args.shutdown_timeout,
    }


def harden(app: FastAPI, allowed_hosts: str = "*") -> None:
    """The Host check, outermost: a request for another name never reaches routing or a redirect."""
    hosts = [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    if hosts and hosts != ["*"]:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
