"""Who is calling: FastAPI dependencies that type the caller of each route.

The AuthGate (gate.py) already turned away, before any body was read, whoever a client route does not admit,
and left the caller it resolved in the request's state; routes the gate does not guard resolve it here. The
coordinator still confirms a client token under its lock, since a re-registration may retire it in between.
"""

from __future__ import annotations

from fastapi import Depends, Request

from .auth import UNKNOWN_TOKEN, Caller
from .errors import Unauthorized


def caller(request: Request) -> Caller:
    resolved = getattr(request.state, "caller", None)
    if resolved is not None:
        return resolved
    return request.app.state.coordinator.auth.caller(request.headers.get("authorization"))


def client(who: Caller = Depends(caller)) -> Caller:
    if who.role != "client":
        raise Unauthorized(UNKNOWN_TOKEN)
    return who


def reader(who: Caller = Depends(caller)) -> Caller:
    """A client, the enroll key or the operator key: who may read the global distribution."""
    return who if who.role in ("operator", "enroll") else client(who)
