"""What the run refuses, as domain errors: the coordinator says why, statuses.py says which HTTP status that is.

`detail` names the field or the rule at fault, and is what the caller reads.
"""

from __future__ import annotations


class Refused(Exception):
    """A request the run cannot accept."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class Unauthorized(Refused):
    """The credentials do not admit the caller to this request."""


class Conflict(Refused):
    """The run's state refuses it: a round not open, a client not selected, an id or a part taken."""


class InvalidRequest(Refused):
    """A field breaks a rule of the run (validation.py's checks, a count out of range)."""


class RateLimited(Refused):
    """Too many requests of this kind in the window; `retry_after` seconds until one is accepted again."""

    def __init__(self, detail: str, retry_after: float):
        super().__init__(detail)
        self.retry_after = retry_after
