"""Authentication at the door: a client route's credentials are checked from its headers before any body is read.

FastAPI reads and parses a request body before it resolves the route's dependencies, so a check inside the
endpoint comes after the work (and after the traffic meter has counted the bytes). This ASGI middleware
answers 401 from the Authorization header alone; only requests it lets through reach the meter and the app,
with the caller it resolved in the request's state for the routes' dependencies (auth.py), which still make
the exact per-route decision (whose token, which id).
"""

from __future__ import annotations

import asyncio

from fedbpt_wire.asgi import send_error
from fedbpt_wire.bearer import header_authorization

from .errors import Unauthorized
from .statuses import http_answer

# Who may knock at each client route. "open" stands for anyone where no enroll key is set.
ALLOWED = {
    "/v1/round": {"client"},
    "/v1/round/update": {"client"},
    "/v1/global": {"client", "enroll", "operator"},
    "/v1/clients": {"client", "enroll", "code", "operator", "open"},
    "/v1/partitions/claim": {"enroll", "code", "operator", "open"},
    "/v1/enroll-codes": {"operator"},
}


class AuthGate:
    def __init__(self, app, coordinator):
        self.app = app
        self.coordinator = coordinator

    async def __call__(self, scope, receive, send):
        allowed = ALLOWED.get(scope["path"]) if scope["type"] == "http" else None
        if allowed is None:
            return await self.app(scope, receive, send)
        authorization = header_authorization(scope["headers"])
        who = await asyncio.to_thread(self.coordinator.auth.caller, authorization)
        if who.role in allowed or ("open" in allowed and self.coordinator.auth.enroll_key is None):
            scope.setdefault("state", {})["caller"] = who
            return await self.app(scope, receive, send)
        names = {
            "client": "a client token",
            "enroll": "the enroll key",
            "code": "an enroll code",
            "operator": "the operator key",
        }
        wanted = " or ".join(names[a] for a in sorted(allowed) if a in names)
        refusal = Unauthorized(
            f"Authorization: {'missing' if not authorization else 'not accepted here'}; "
            f"{scope['path']} takes {wanted} as 'Authorization: Bearer <token>'"
        )
        status, headers = http_answer(refusal)
        await send_error(send, status, refusal.detail, [(k.lower().encode(), v.encode()) for k, v in headers.items()])
