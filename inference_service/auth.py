"""API keys, per-key query counters and quotas."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def key_id(key: str) -> str:
    """A stable, non-secret name for a key, safe to show in metrics and logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class KeyState:
    quota: int | None
    used: int = 0


class QuotaExceeded(Exception):
    pass


class KeyStore:
    """Which keys may query and how many queries each has left. Empty = open service."""

    def __init__(self, keys: dict[str, int | None]):
        self._keys = {k: KeyState(q) for k, q in keys.items()}
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return not self._keys

    @classmethod
    def from_sources(cls, keys_file: str | None = None, default_quota: int | None = None) -> "KeyStore":
        """Keys from `FEDBPT_API_KEYS` (comma-separated) and a file of `key [quota]` lines."""
        keys: dict[str, int | None] = {}
        for k in os.environ.get("FEDBPT_API_KEYS", "").split(","):
            if k.strip():
                keys[k.strip()] = default_quota
        if keys_file:
            for lineno, line in enumerate(Path(keys_file).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                    raise ValueError(f"{keys_file}:{lineno}: expected 'KEY [QUOTA]'")
                keys[parts[0]] = int(parts[1]) if len(parts) == 2 else default_quota
        store = cls(keys)
        if store.open:
            log.warning("NO API KEYS CONFIGURED: the service answers anyone who can reach it")
        return store

    def known(self, key: str | None) -> bool:
        return self.open or (key is not None and key in self._keys)

    def reserve(self, key: str | None) -> None:
        """Count one query against the key; QuotaExceeded if its quota is spent."""
        if self.open or key is None:
            return
        with self._lock:
            state = self._keys[key]
            if state.quota is not None and state.used >= state.quota:
                raise QuotaExceeded(f"quota of {state.quota} queries used up")
            state.used += 1

    def refund(self, key: str | None) -> None:
        if self.open or key is None:
            return
        with self._lock:
            self._keys[key].used -= 1

    def usage(self, key: str) -> tuple[int, int | None]:
        state = self._keys[key]
        return state.used, state.quota
