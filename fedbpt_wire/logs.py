"""The one logging setup every entry point calls (`fedbpt`, `python -m aggregator`, the compose helpers)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with `verbose`) to stderr; a no-op where the process already configured logging."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT)
    # One line per HTTP request would drown the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class DropQueryStrings(logging.Filter):
    """Access-log lines without query strings: a client that puts its key in the URL must not find it written
    to the server's log. uvicorn logs (client, method, path with query, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query dropped]", *args[3:])
        return True


def redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, DropQueryStrings) for f in access.filters):
        access.addFilter(DropQueryStrings())
