"""The one logging setup every entry point calls (`fedbpt`, `python -m aggregator`, the compose helpers)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with `verbose`) to stderr; a no-op where the process already configured logging."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT)
    # One line per HTTP request would drown the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
