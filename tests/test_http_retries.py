"""The clients' HTTP layer against a real server that fails on purpose: what is retried and what is not."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, HTTPException

from fed_clients.http import RequestFailed, RetryingClient

from .conftest import free_port, serve_app


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


def test_5xx_is_retried_with_backoff_and_bytes_are_counted():
    app, calls = flaky_app(2, 503)
    with serve_app(app) as url:
        client = RetryingClient(url, retries=3, backoff=0.01)
        assert client.request("POST", "/echo", {"x": 1}) == {"got": {"x": 1}}
    assert len(calls) == 3
    assert client.wire.requests == 3
    assert client.wire.bytes_up == 3 * len(b'{"x":1}')
    assert client.wire.bytes_down > 0


def test_4xx_is_never_retried():
    app, calls = flaky_app(5, 422)
    with serve_app(app) as url:
        client = RetryingClient(url, retries=3, backoff=0.01)
        with pytest.raises(RequestFailed) as err:
            client.request("POST", "/echo", {"x": 1})
    assert err.value.status == 422 and "failure 1" in err.value.detail
    assert len(calls) == 1


def test_retries_are_bounded():
    app, calls = flaky_app(10, 500)
    with serve_app(app) as url:
        client = RetryingClient(url, retries=2, backoff=0.01)
        with pytest.raises(RequestFailed) as err:
            client.request("POST", "/echo", {})
    assert err.value.status == 500 and len(calls) == 3


def test_connection_errors_are_retried_then_raised():
    import httpx

    client = RetryingClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01)
    with pytest.raises(httpx.TransportError):
        client.request("GET", "/nothing-listens-here")
    assert client.wire.requests == 0
