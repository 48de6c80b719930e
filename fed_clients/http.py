"""An httpx session that retries what is worth retrying and counts every byte on the wire."""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

RETRY_STATUS = {500, 502, 503, 504}


class RequestFailed(RuntimeError):
    def __init__(self, status: int, detail: str, path: str = ""):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.path = path  # the request's path, for telling the caller which step was refused


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

    Retries stop after `retries` attempts, or, with `retry_for`, once that many seconds have gone by since the
    first failure (a server restarting takes minutes, not a fixed number of tries). `verify` is True, False or
    a CA bundle file. Bytes are the request and response bodies as sent and received (content, not headers).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        verify: bool | str = True,
        retry_for: float | None = None,
        name: str = "server",
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # httpx takes a CA file only through an SSL context.
        context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, verify=context)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_for = retry_for
        self.name = name
        self.wire = WireCounter()

    def _give_up(self, attempt: int, failing_since: float) -> bool:
        if self.retry_for is None:
            return attempt >= self.retries
        return time.monotonic() - failing_since >= self.retry_for

    @property
    def base_url(self) -> str:
        return str(self.http.base_url)

    @property
    def token(self) -> str | None:
        value = self.http.headers.get("Authorization")
        return value.removeprefix("Bearer ") if value else None

    def set_token(self, token: str | None) -> None:
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"
        else:
            self.http.headers.pop("Authorization", None)

    def request(self, method: str, path: str, json_body: dict | None = None, *, token: str | None = None) -> dict:
        """`token` authorizes this request only, in place of the session's."""
        content = json.dumps(json_body, separators=(",", ":")).encode() if json_body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        failing_since = None
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, content=content, headers=headers)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                failing_since = failing_since or time.monotonic()
                # A certificate the client does not trust will not become trusted by waiting.
                if self._give_up(attempt, failing_since) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise
                problem = str(exc) or type(exc).__name__
            else:
                self.wire.requests += 1
                self.wire.bytes_up += len(content or b"")
                self.wire.bytes_down += len(response.content)
                if response.status_code < 400:
                    return response.json()
                failing_since = failing_since or time.monotonic()
                if response.status_code not in RETRY_STATUS or self._give_up(attempt, failing_since):
                    raise RequestFailed(response.status_code, _detail(response), path)
                problem = f"HTTP {response.status_code}"
            if self.retry_for is None:
                log.warning("%s %s: %s; retry %d/%d", method, path, problem, attempt + 1, self.retries)
            elif attempt == 0:
                log.warning(
                    "%s %s: %s; the %s may be restarting: retrying for up to %.0f s (--retry-for)",
                    method,
                    path,
                    problem,
                    self.name,
                    self.retry_for,
                )
            time.sleep(min(self.backoff * 2**attempt, self.max_backoff))
            attempt += 1

    def close(self) -> None:
        self.http.close()
