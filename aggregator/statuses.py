"""The aggregator's domain errors as HTTP answers: the one place that maps a refusal to a status and its headers.

The app's exception handler and the pre-body gate both answer through here, so a 401 carries its
WWW-Authenticate and a 429 its Retry-After wherever it is raised.
"""

from __future__ import annotations

from .errors import Conflict, InvalidRequest, RateLimited, Refused, Unauthorized

STATUS: dict[type[Refused], int] = {
    Unauthorized: 401,
    Conflict: 409,
    InvalidRequest: 422,
    RateLimited: 429,
}


def http_answer(exc: Refused) -> tuple[int, dict[str, str]]:
    """The status and the headers that answer `exc`."""
    status = next(code for cls, code in STATUS.items() if isinstance(exc, cls))
    if isinstance(exc, Unauthorized):
        return status, {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        return status, {"Retry-After": str(max(1, round(exc.retry_after)))}
    return status, {}
