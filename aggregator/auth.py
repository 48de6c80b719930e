"""Who a request comes from, and what that lets it do: the operator key, the enroll key, one-time enroll codes,
per-client tokens, and the pace at which new ids may register.

Tokens and codes are stored only as SHA-256 digests; keys are compared in constant time. Nothing here reads a
body or knows HTTP: a refusal is an `Unauthorized` (or `RateLimited`) and statuses.py answers it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Literal

from fedbpt_wire.bearer import bearer_token

from .errors import InvalidRequest, RateLimited, Unauthorized
from .store import Store

MAX_CODES_PER_REQUEST = 1000
UNKNOWN_TOKEN = "Authorization: unknown client token (register at POST /v1/clients)"


@dataclass(frozen=True)
class Caller:
    """What an Authorization header proves: a role (None: nothing), and for a client its id and token digest."""

    role: Literal["operator", "enroll", "code", "client"] | None = None  # "code": an unused one-time enroll code
    client_id: str | None = None
    token_digest: str | None = None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _matches(authorization: str | None, secret: str | None) -> bool:
    if secret is None or not authorization:
        return False
    token = bearer_token(authorization)
    if token is None:
        return False
    return hmac.compare_digest(token.encode(), secret.encode())


class Auth:
    """The run's credentials over its store. Callers that change the store hold the coordinator's lock."""

    def __init__(self, store: Store, enroll_key: str | None, operator_key: str | None):
        self.store = store
        self.enroll_key = enroll_key
        self.operator_key = operator_key

    def is_operator(self, authorization: str | None) -> bool:
        return _matches(authorization, self.operator_key)

    def caller(self, authorization: str | None) -> Caller:
        """What the header proves, without reading any body."""
        if self.is_operator(authorization):
            return Caller("operator")
        if _matches(authorization, self.enroll_key):
            return Caller("enroll")
        token = bearer_token(authorization)
        if token is None:
            return Caller()
        digest = sha256(token)
        client_id = self.store.client_by_token(digest)
        if client_id is not None:
            return Caller("client", client_id, digest)
        return Caller("code", None, digest) if self.store.enroll_code_unused(digest) else Caller()

    def sees_details(self, caller: Caller) -> bool:
        """Client ids, selections and metrics: for the operator, or for anyone where no operator key is set."""
        return self.operator_key is None or caller.role == "operator"

    def check_enroll(self, caller: Caller) -> None:
        """A new id, or a partition, needs the enroll key or an unused code where enrollment is closed."""
        if caller.role == "code":
            return  # checked unused; the registration that takes it consumes it
        codes_only = self.enroll_key is None and self.store.has_enroll_codes()  # no key, but codes minted
        if (self.enroll_key is not None or codes_only) and caller.role not in ("enroll", "operator"):
            raise Unauthorized("Authorization: wrong enroll key or enroll code")

    def holds_token(self, caller: Caller) -> bool:
        """The client's token is still its current one (a re-registration retires the old)."""
        return (
            caller.role == "client"
            and caller.token_digest is not None
            and self.store.client_by_token(caller.token_digest) == caller.client_id
        )

    def client(self, caller: Caller) -> str:
        """The id of a client whose token is current."""
        if caller.client_id is None or not self.holds_token(caller):
            raise Unauthorized(UNKNOWN_TOKEN)
        return caller.client_id

    def mint_codes(self, count: int, caller: Caller, now: float) -> list[str]:
        """`count` one-time enroll codes, each registering one new client id; the operator's alone."""
        if caller.role != "operator":
            raise Unauthorized("Authorization: enroll codes take the operator key")
        if not 1 <= count <= MAX_CODES_PER_REQUEST:
            raise InvalidRequest(f"count: between 1 and {MAX_CODES_PER_REQUEST}, got {count}")
        codes = [secrets.token_urlsafe(24) for _ in range(count)]
        self.store.add_enroll_codes([sha256(c) for c in codes], now)
        return codes

    def take_code(self, caller: Caller, client_id: str) -> None:
        """Inside the registration's transaction: the code registers `client_id` and is spent."""
        if caller.token_digest is None or not self.store.enroll_code_unused(caller.token_digest):
            raise Unauthorized("Authorization: this enroll code was used already")
        self.store.use_enroll_code(caller.token_digest, client_id)


class RegistrationPace:
    """New ids at most `per_minute` a minute, whoever asks (the operator's own are not counted)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._registered_at: deque[float] = deque()  # when the last minute's new ids registered

    def charge(self, caller: Caller, now: float) -> None:
        if caller.role == "operator":
            return
        window = self._registered_at
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= self.per_minute:
            wait = 60.0 - (now - window[0])
            raise RateLimited(
                f"client_id: {self.per_minute} new ids registered in the last minute (aggregator "
                f"--max-registrations-per-minute); retry in {wait:.0f} s",
                retry_after=wait,
            )
        window.append(now)
