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

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .logs import redact_access_log


class BodyLimit:
    """Answers 413 for a body over `max_bytes`, by Content-Length or while it streams in, and 408 for one that
    has not arrived whole within `read_timeout` seconds (a slow-body sender holds a connection and a buffer).

    The body is read here in full (the JSON endpoints read it whole anyway) and replayed to the app,
    so a chunked upload is cut off at the limit instead of being buffered without bound.
    """

    def __init__(
        self, app, max_bytes: int, read_timeout: float | None = 60.0, body_paths: frozenset[str] | None = None
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        # The routes that take a body (None: every route); any other request carrying one is answered before a
        # byte of it is read: a 30 MiB POST to /healthz must not be buffered to learn it gets 405.
        self.body_paths = body_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if self.body_paths is not None and scope["path"] not in self.body_paths:
            if (declared is not None and declared != b"0") or b"transfer-encoding" in headers:
                return await send_error(send, 413, f"{scope['path']} takes no request body")
            return await self.app(scope, receive, send)
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
        "--header-timeout",
        type=float,
        default=5.0,
        help="seconds a connection may take to send a request's headers in full, on a new connection or between "
        "keep-alive requests; slower ones are closed (default 5)",
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


def add_docs_argument(parser: argparse.ArgumentParser) -> None:
    """--docs, the same on both servers: the pages are off by default because they are blank without a network."""
    parser.add_argument(
        "--docs",
        action="store_true",
        help="serve the API docs pages /docs and /redoc; they load their scripts from a CDN, so they stay blank "
        "offline (default: off; /openapi.json is always served)",
    )


def uvicorn_options(args: argparse.Namespace) -> dict:
    return {
        "limit_concurrency": args.max_connections,
        "timeout_keep_alive": args.keep_alive,
        "timeout_graceful_shutdown": args.shutdown_timeout,
        "http": header_timeout_protocol(args.header_timeout),
    }


def body_paths(routes: FastAPI | APIRouter) -> frozenset[str]:
    """The paths with a route that takes a body (POST, PUT, PATCH), of an app or of a router. An app lists a
    router it includes as one opaque entry (FastAPI 0.165): give such a router itself."""
    return frozenset(
        getattr(route, "path", "")
        for route in routes.routes
        if {"POST", "PUT", "PATCH"} & set(getattr(route, "methods", None) or ())
    )


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within `seconds`.

    uvicorn times out idle keep-alive connections only after a response: a socket that connects and sends
    nothing, or drips its headers, holds a connection slot (and under --max-connections, turns every new request
    into 503) for as long as it likes. Here a timer runs from the connection's start, and again from the first
    byte of each later request, until h11 has parsed that request's headers.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        header_timeout = seconds
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                if self._header_timer is None and self.timeout_keep_alive_task is None:
                    self._arm()  # part of a later request's headers: they get the same time as the first's
            else:
                self._disarm()  # headers in: the body has --body-timeout, the response its own pace

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def harden(app: FastAPI, allowed_hosts: str = "*") -> None:
    """The Host check, outermost: a request for another name never reaches routing or a redirect; and no query
    string in the access log."""
    redact_access_log()
    hosts = [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    if hosts and hosts != ["*"]:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
