"""A client's aggregator token, kept on disk so a restarted client can re-bind its own id.

The aggregator re-binds an existing client id only for the holder of that id's current token (the enroll
key creates new ids only), so a client that crashes must find its token again. One small file per
(aggregator URL, client id), readable by its owner only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_state_dir() -> Path:
    env = os.environ.get("FEDBPT_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "fedbpt" / "clients"


class TokenFile:
    def __init__(self, state_dir: Path, aggregator_url: str, client_id: str):
        key = hashlib.sha256(f"{aggregator_url.rstrip('/')}\n{client_id}".encode()).hexdigest()[:24]
        self.path = Path(state_dir) / f"{key}.token"

    def read(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def write(self, token: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.replace(tmp, self.path)  # a crash mid-write leaves the old token, never half a new one
