"""The one reading of an `Authorization: Bearer <token>` header, shared by both servers' pre-body gates and routes."""

from __future__ import annotations

from collections.abc import Iterable

HOW = "'Authorization: Bearer <token>'"


def bearer_token(authorization: str | None) -> str | None:
    """The token of a Bearer header; None where the header is missing, of another scheme or empty."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def header_authorization(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The Authorization header of a raw ASGI scope, read before any body."""
    return next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
