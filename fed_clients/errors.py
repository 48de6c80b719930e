"""Errors a user acts on: one line saying what went wrong and what to do; the CLI prints it without a traceback."""

from __future__ import annotations

import httpx

from .http import RequestFailed


class FatalError(RuntimeError):
    """Stops the command with its message (one line) and exit status 1."""


def unreachable(what: str, url: str, exc: Exception) -> FatalError:
    reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
    if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return FatalError(
            f"the {what} at {url} presented a certificate this machine does not trust ({reason}); "
            "pass its CA certificate with --ca-cert FILE"
        )
    return FatalError(f"cannot reach the {what} at {url} ({reason}); check the URL and that the {what} is running")


def service_refused(url: str, exc: RequestFailed) -> FatalError:
    if exc.status == 401:
        return FatalError(
            f"the service at {url} refused the API key (HTTP 401: {exc.detail}); "
            "check --api-key or FEDBPT_API_KEY with the service's operator"
        )
    if exc.status == 429:
        return FatalError(f"the service at {url} refused the request: quota or rate limit reached ({exc.detail})")
    return FatalError(f"the service at {url} refused the request (HTTP {exc.status}: {exc.detail})")
