"""API keys, per-key query counters and quotas, and revocation by editing the keys file."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import Counter
from pathlib import Path

from fedbpt_wire.logs import warn_example_keys

log = logging.getLogger(__name__)


def key_id(key: str, salt: bytes = b"") -> str:
    """A non-secret name for a key, safe to show in metrics and logs; salted, so that a guessed or leaked key
    cannot be confirmed against a published id."""
    return hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:12]


class QuotaExceeded(Exception):
    pass


class KeyRevoked(Exception):
    """The key was valid when the request arrived and was revoked before it was counted."""


def read_keys_file(path: Path, default_quota: int | None) -> dict[str, int | None]:
    keys: dict[str, int | None] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"{path}:{lineno}: expected 'KEY [QUOTA]'")
        keys[parts[0]] = int(parts[1]) if len(parts) == 2 else default_quota
    return keys


def _file_stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    # The inode catches an atomic replace (write, then rename) that keeps size and mtime.
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyStore:
    """Which keys may query and how many queries each has left.

    Open (anyone may query) only when no key and no keys file is configured: a keys file that is
    empty, or emptied later, lets no one in rather than everyone.

    The keys file is the revocation mechanism. It is re-read when its (mtime, size, inode) changes,
    checked on the request path at most every `recheck_s` seconds, and on `reload()` or
    `request_reload()` (what SIGHUP does). A key gone from the file gets 401 from the next request on;
    usage is kept per key across reloads, so removing and re-adding a key does not reset its quota.
    A file that cannot be read or parsed leaves the keys in force as they were, with an error logged.
    """

    def __init__(
        self,
        keys: dict[str, int | None],
        keys_file: str | os.PathLike | None = None,
        default_quota: int | None = None,
        recheck_s: float = 1.0,
    ):
        self._static = dict(keys)  # FEDBPT_API_KEYS: fixed for the life of the process
        self._keys_file = Path(keys_file) if keys_file is not None else None
        self._default_quota = default_quota
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._quotas = dict(keys)
        self._used: Counter[str] = Counter()
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._reload_requested = False
        self.open = not keys and self._keys_file is None
        self._salt = secrets.token_bytes(16)  # ids are stable for this process only, by design
        if self._keys_file is not None:
            self.reload()

    @classmethod
    def from_sources(
        cls, keys_file: str | None = None, default_quota: int | None = None, recheck_s: float = 1.0
    ) -> KeyStore:
        """Keys from `FEDBPT_API_KEYS` (comma-separated) and a file of `key [quota]` lines."""
        env = {k.strip(): default_quota for k in os.environ.get("FEDBPT_API_KEYS", "").split(",") if k.strip()}
        store = cls(env, keys_file, default_quota, recheck_s)
        warn_example_keys(log, **{f"API key {i + 1} of FEDBPT_API_KEYS": k for i, k in enumerate(env)})
        if store.open:
            log.warning("NO API KEYS CONFIGURED: the service answers anyone who can reach it")
        elif not store._quotas:
            log.warning("the keys file %s holds no keys: every query gets 401 until keys are added", keys_file)
        return store

    def reload(self) -> None:
        """Re-read the keys file now; OSError or ValueError (and the old keys stay) if it cannot be."""
        if self._keys_file is None:
            return
        stamp = _file_stamp(self._keys_file)  # before reading: a write during the read triggers another reload
        quotas = {**self._static, **read_keys_file(self._keys_file, self._default_quota)}
        with self._lock:
            revoked = self._quotas.keys() - quotas.keys()
            self._quotas = quotas
            self._stamp = stamp
        if revoked:
            log.info(
                "keys file reloaded: %d keys, revoked %s", len(quotas), ", ".join(sorted(map(self.key_id, revoked)))
            )

    def request_reload(self) -> None:
        """Reload before the next key check; safe from a signal handler (it takes no lock)."""
        self._reload_requested = True

    def _maybe_reload(self) -> None:
        if self._keys_file is None:
            return
        now = time.monotonic()
        if not self._reload_requested and now < self._next_check:
            return
        self._next_check = now + self._recheck_s
        forced, self._reload_requested = self._reload_requested, False
        try:
            if forced or _file_stamp(self._keys_file) != self._stamp:
                self.reload()
        except (OSError, ValueError) as exc:
            log.error("keys file not reloaded, the previous keys stay in force: %s", exc)

    def known(self, key: str | None) -> bool:
        self._maybe_reload()
        return self.open or (key is not None and key in self._quotas)

    def reserve(self, key: str | None) -> None:
        """Count one query against the key; QuotaExceeded if its quota is spent, KeyRevoked if it is gone."""
        if self.open or key is None:
            return
        with self._lock:
            if key not in self._quotas:
                raise KeyRevoked("API key revoked")
            quota = self._quotas[key]
            if quota is not None and self._used[key] >= quota:
                raise QuotaExceeded(f"quota of {quota} queries used up")
            self._used[key] += 1

    def refund(self, key: str | None) -> None:
        if self.open or key is None:
            return
        with self._lock:
            self._used[key] -= 1

    def key_id(self, key: str) -> str:
        return key_id(key, self._salt)

    def usage(self, key: str) -> tuple[int, int | None]:
        with self._lock:
            return self._used[key], self._quotas[key]
