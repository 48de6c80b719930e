"""Connections that hold a server without finishing a request (issue 24, findings 3-5 and 8), on real uvicorn
servers on 127.0.0.1: idle and slow-header sockets are closed, --body-timeout reaches the body reader, a body on a
route that takes none is refused unread, and keys in a query string stay out of the access log."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from aggregator.app import create_app
from fedbpt.loopback import free_port, serve_app
from fedbpt_wire.asgi import header_timeout_protocol
from fedbpt_wire.logs import DropHealthChecks, DropQueryStrings

from .test_aggregator import ROOT, config, wait_for


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole response: its headers and its Content-Length of body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed `sock` (recv returns b"" or the connection resets); fails past `seconds`."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server still held the connection after {seconds} s")
    return time.monotonic() - t0


@pytest.fixture
def server(tmp_path):
    app = create_app(config(), str(tmp_path / "agg.db"), body_timeout=1.0)
    with serve_app(app, http=header_timeout_protocol(0.5), limit_concurrency=8) as url:
        yield url


def test_idle_and_slow_header_sockets_are_closed(server):
    idle = [raw(server) for _ in range(8)]  # every connection slot of --max-connections 8
    slow = raw(server)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the headers
    for sock in [*idle, slow]:
        assert closed_within(sock, 5.0) < 5.0
        sock.close()
    # The slots are free again: a real request is answered, not refused with 503.
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200


def test_a_keep_alive_connection_dripping_its_next_headers_is_closed(server):
    with raw(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in sock.recv(4096)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert closed_within(sock, 5.0) < 5.0


def test_a_slow_body_gets_408_after_the_body_timeout(server):
    with raw(server) as sock:
        sock.sendall(
            b"POST /v1/clients HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        t0 = time.monotonic()
        sock.settimeout(10)
        answer = sock.recv(4096)
        assert b"408" in answer.split(b"\r\n")[0] and time.monotonic() - t0 < 5.0


def test_a_body_on_a_route_that_takes_none_is_refused_unread(server):
    with raw(server) as sock:
        # 30 MiB announced, none sent: answered at once from the headers, not after reading (or waiting for) it.
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 31457280\r\n\r\n")
        answer = response(sock, timeout=5)
    assert b"413" in answer.split(b"\r\n")[0] and b"takes no request body" in answer
    r = httpx.post(f"{server}/no/such/path", content=b"x" * 1000, timeout=10)
    assert r.status_code == 413
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200


def test_the_cli_body_timeout_reaches_the_body_reader(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedbpt.cli", "aggregator", "--port", str(port), "--db", str(tmp_path / "a.db")]
        + ["--body-timeout", "1", "--intrinsic-dim", "8"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _healthy(url), timeout=60, what="the aggregator")
        with raw(url) as sock:
            sock.sendall(b"POST /v1/clients HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            t0 = time.monotonic()
            sock.settimeout(30)
            answer = sock.recv(4096)
        # Before the flag reached the reader, the answer came after the default 60 s.
        assert b"408" in answer.split(b"\r\n")[0] and time.monotonic() - t0 < 10.0
    finally:
        proc.terminate()
        proc.wait(30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_query_strings_are_dropped_from_the_access_log():
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/round?key=s3cret&wait=10", "1.1", 401), None,
    )  # fmt: skip
    assert DropQueryStrings().filter(record) and "s3cret" not in record.getMessage()
    assert "/v1/round?[query dropped]" in record.getMessage()


def test_successful_health_checks_stay_out_of_the_access_log():
    def record(path: str, status: int) -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5000", "GET", path, "1.1", status), None,
        )  # fmt: skip

    assert not DropHealthChecks().filter(record("/healthz", 200))
    assert DropHealthChecks().filter(record("/healthz", 503))  # a failing check is worth a line
    assert DropHealthChecks().filter(record("/v1/status", 200))
