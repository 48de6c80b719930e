"""An httpx session that retries what is worth retrying and counts every byte on the wire."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

RETRY_STATUS = {500, 502, 503, 504}


class RequestFailed(RuntimeError):
    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class WireCounter:
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        return response.text[:500]


class RetryingClient:
    """Bounded retries with exponential backoff on connection errors, timeouts and 5xx; never on 4xx.

    Bytes are the request and response bodies as sent and received (content, not headers).
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 10.0, verify: bool | str = True):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, verify=verify)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.wire = WireCounter()

    def set_token(self, token: str) -> None:
        self.http.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, json_body: dict | None = None) -> dict:
        content = json.dumps(json_body, separators=(",", ":")).encode() if json_body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, content=content, headers=headers)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt == self.retries:
                    raise
                log.warning("%s %s: %s; retry %d/%d", method, path, exc, attempt + 1, self.retries)
            else:
                self.wire.requests += 1
                self.wire.bytes_up += len(content or b"")
                self.wire.bytes_down += len(response.content)
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    raise RequestFailed(response.status_code, _detail(response))
                log.warning("%s %s: HTTP %d; retry %d/%d", method, path, response.status_code, attempt + 1, self.retries)
            time.sleep(min(self.backoff * 2**attempt, self.max_backoff))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()
