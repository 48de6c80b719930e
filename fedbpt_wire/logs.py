"""The one logging setup every entry point calls (`fedbpt`, `python -m aggregator`, the compose helpers)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with `verbose`) to stderr; a no-op where the process already configured logging."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT)
    # One line per HTTP request would drown the progress lines; matplotlib's font-cache notice is nothing a user
    # can act on.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


# What .env.example's keys hold: a stack started with them is open to anyone who read the example.
EXAMPLE_KEY_MARK = "change-me"


def warn_example_keys(log: logging.Logger, **keys: str | None) -> None:
    """A loud warning for each key still holding the example's placeholder."""
    for name, key in keys.items():
        if key and EXAMPLE_KEY_MARK in key:
            log.warning(
                "%s is the EXAMPLE key from .env.example: anyone who read the example can use it; set a fresh "
                'one (python3 -c "import secrets; print(secrets.token_urlsafe(24))")',
                name,
            )


class DropQueryStrings(logging.Filter):
    """Access-log lines without query strings: a client that puts its key in the URL must not find it written
    to the server's log. uvicorn logs (client, method, path with query, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query dropped]", *args[3:])
        return True


class DropHealthChecks(logging.Filter):
    """No access-log line for a successful /healthz: compose and load balancers poll it every few seconds, and
    those lines drowned everything else in the servers' logs. A failing health check is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) >= 5 and args[2] == "/healthz" and args[4] == 200)


def redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    for kind in (DropQueryStrings, DropHealthChecks):
        if not any(isinstance(f, kind) for f in access.filters):
            access.addFilter(kind())
