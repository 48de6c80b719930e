"""The clients' HTTP layer against a real server that fails on purpose: what is retried, how long it waits.

The backoff is read off the client's own sleeps, which a fake `time` records (and where the test needs it,
acts on: bringing the server up between two attempts) instead of waiting: what is checked is how often the
client tries and the delays it asks for, never how long anything took.
"""

from __future__ import annotations

import contextlib
import types

import httpx
import pytest
from fastapi import FastAPI, HTTPException

from fed_clients import http as client_http
from fed_clients.http import RequestFailed, RetryingClient

from ..conftest import free_port, serve_app


def flaky_app(failures: int, status: int) -> tuple[FastAPI, list[int]]:
    """Answers `status` to the first `failures` calls, then 200; records every call."""
    app = FastAPI()
    calls: list[int] = []

    @app.post("/echo")
    def echo(body: dict) -> dict:
        calls.append(1)
        if len(calls) <= failures:
            raise HTTPException(status, f"failure {len(calls)}")
        return {"got": body}

    return app, calls


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The delays the client asks for between attempts, in order; nothing actually waits."""
    asked: list[float] = []
    monkeypatch.setattr(client_http, "time", logical_time(asked.append))
    return asked


def logical_time(on_sleep) -> types.SimpleNamespace:
    """A clock that moves only when the client sleeps: `retry_for` windows are counted in asked-for delays."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        on_sleep(seconds)

    return types.SimpleNamespace(sleep=sleep, monotonic=lambda: now[0])


def test_5xx_is_retried_with_exponential_backoff_and_bytes_are_counted(sleeps):
    app, calls = flaky_app(2, 503)
    with serve_app(app) as url:
        client = RetryingClient(url, retries=3, backoff=0.5)
        assert client.request("POST", "/echo", {"x": 1}) == {"got": {"x": 1}}
    assert len(calls) == 3 and sleeps == [0.5, 1.0]
    assert client.wire.requests == 3
    assert client.wire.bytes_up == 3 * len(b'{"x":1}')
    assert client.wire.bytes_down > 0


def test_4xx_is_never_retried(sleeps):
    app, calls = flaky_app(5, 422)
    with serve_app(app) as url:
        client = RetryingClient(url, retries=3, backoff=0.5)
        with pytest.raises(RequestFailed) as err:
            client.request("POST", "/echo", {"x": 1})
    assert err.value.status == 422 and "failure 1" in err.value.detail
    assert len(calls) == 1 and sleeps == []


def test_retries_are_bounded_and_the_backoff_capped(sleeps):
    app, calls = flaky_app(10, 500)
    with serve_app(app) as url:
        client = RetryingClient(url, retries=5, backoff=1.0, max_backoff=3.0)
        with pytest.raises(RequestFailed) as err:
            client.request("POST", "/echo", {})
    # No sleep after the last attempt: the failure is raised at once.
    assert err.value.status == 500 and len(calls) == 6 and sleeps == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_a_connection_refused_is_retried_until_the_server_is_up(sleeps, monkeypatch):
    """Nothing listens on the port until the client's second backoff, when the server starts: only a client
    that retries connection errors gets the answer."""
    app, calls = flaky_app(0, 200)
    port = free_port()
    with contextlib.ExitStack() as stack:

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == 2:
                stack.enter_context(serve_app(app, port=port))

        monkeypatch.setattr(client_http, "time", logical_time(sleep))
        client = RetryingClient(f"http://127.0.0.1:{port}", retries=4, backoff=0.25)
        assert client.request("POST", "/echo", {"x": 2}) == {"got": {"x": 2}}
    assert sleeps == [0.25, 0.5] and len(calls) == 1
    # Only the attempt that reached the server is counted on the wire.
    assert client.wire.requests == 1


def test_connection_errors_are_retried_then_raised(sleeps):
    client = RetryingClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.5)
    with pytest.raises(httpx.ConnectError):
        client.request("GET", "/nothing-listens-here")
    assert sleeps == [0.5, 1.0] and client.wire.requests == 0
