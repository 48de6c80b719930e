"""SQLite persistence of a run: config, clients, partition claims, rounds, accepted updates, traffic, strategy state.

One connection in WAL mode with synchronous=FULL, guarded by a lock: every write is committed (and
on disk) before the caller answers the client, so a SIGKILL loses nothing that was acknowledged.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fedbpt_wire.federation import RunConfig, UpdateRequest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    num_samples INTEGER NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'merged', 'failed')),
    selected TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline_at REAL NOT NULL,
    sigma_before REAL NOT NULL,
    local_sigma REAL,
    sigma_merged REAL,
    sigma_after REAL,
    closed_at REAL,
    metrics TEXT
);
-- The global mean each round handed out (and its clients validated): a served prompt is one of them.
CREATE TABLE IF NOT EXISTS round_means (
    round INTEGER PRIMARY KEY,
    mean BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS traffic (
    round INTEGER PRIMARY KEY,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS strategy (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state BLOB NOT NULL
);
-- One-time enroll codes the operator minted: each registers one new client id (stored hashed, like tokens).
CREATE TABLE IF NOT EXISTS enroll_codes (
    code_sha256 TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS partition_claims (
    instance TEXT PRIMARY KEY,
    idx INTEGER NOT NULL UNIQUE,
    parts INTEGER NOT NULL
);
"""


@dataclass
class RoundRow:
    round: int
    state: str
    selected: list[str]
    opened_at: float
    deadline_at: float
    sigma_before: float
    local_sigma: float | None = None
    sigma_merged: float | None = None
    sigma_after: float | None = None
    closed_at: float | None = None
    metrics: dict | None = None


_ROUND_COLUMNS = (
    "round, state, selected, opened_at, deadline_at, sigma_before, local_sigma, sigma_merged, sigma_after, "
    "closed_at, metrics"
)


def _round_row(row) -> RoundRow:
    """A `rounds` row, its JSON columns (selected, metrics) decoded."""
    values = list(row)
    values[2] = json.loads(values[2])
    values[10] = json.loads(values[10]) if values[10] else None
    return RoundRow(*values)


class Store:
    def __init__(self, path: str):
        # isolation_level=None: statements outside `transaction()` commit on their own.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._depth = 0
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self):
        """All writes inside commit together or not at all; nesting joins the outer transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    def _query(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args=()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    # ------------------------------------------------------------------ run

    def load_config(self) -> RunConfig | None:
        rows = self._query("SELECT config FROM run WHERE id = 1")
        return RunConfig.model_validate_json(rows[0][0]) if rows else None

    def save_config(self, config: RunConfig) -> None:
        self._write("INSERT OR REPLACE INTO run (id, config) VALUES (1, ?)", (config.model_dump_json(),))

    @staticmethod
    def peek_config(path: str) -> RunConfig | None:
        """The config of the run stored at `path`, without creating a database where there is none."""
        if not os.path.exists(path):
            return None
        store = Store(path)
        try:
            return store.load_config()
        finally:
            store.close()

    # ------------------------------------------------------------------ clients

    def upsert_client(self, client_id: str, token_sha256: str, num_samples: int, now: float) -> None:
        self._write(
            "INSERT INTO clients (client_id, token_sha256, num_samples, registered_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (client_id) DO UPDATE SET token_sha256 = excluded.token_sha256, "
            "num_samples = excluded.num_samples",
            (client_id, token_sha256, num_samples, now),
        )

    def newcomers(self, round_: int, rounds: int) -> set[str]:
        """Ids registered after round 0 opened with updates in fewer than `rounds` merged rounds before `round_`.
        A re-registration keeps the id's first registration time, so a restart does not make a founder new."""
        rows = self._query(
            "SELECT c.client_id FROM clients c JOIN rounds r0 ON r0.round = 0 WHERE c.registered_at > r0.opened_at "
            "AND (SELECT COUNT(*) FROM updates u JOIN rounds r ON r.round = u.round WHERE u.client_id = c.client_id "
            "AND u.round < ? AND r.state = 'merged') < ?",
            (round_, rounds),
        )
        return {r[0] for r in rows}

    def client_by_token(self, token_sha256: str) -> str | None:
        rows = self._query("SELECT client_id FROM clients WHERE token_sha256 = ?", (token_sha256,))
        return rows[0][0] if rows else None

    def client_ids(self) -> list[str]:
        return [r[0] for r in self._query("SELECT client_id FROM clients ORDER BY client_id")]

    # ------------------------------------------------------------------ enroll codes

    def add_enroll_codes(self, digests: list[str], now: float) -> None:
        with self.transaction():
            for digest in digests:
                self._write("INSERT INTO enroll_codes (code_sha256, created_at) VALUES (?, ?)", (digest, now))

    def has_enroll_codes(self) -> bool:
        return bool(self._query("SELECT 1 FROM enroll_codes LIMIT 1"))

    def enroll_code_unused(self, digest: str) -> bool:
        rows = self._query("SELECT used_by FROM enroll_codes WHERE code_sha256 = ?", (digest,))
        return bool(rows) and rows[0][0] is None

    def use_enroll_code(self, digest: str, client_id: str) -> None:
        self._write("UPDATE enroll_codes SET used_by = ? WHERE code_sha256 = ?", (client_id, digest))

    # ------------------------------------------------------------------ partition claims

    def partition_claims(self) -> dict[str, tuple[int, int]]:
        """instance -> (index, parts)."""
        rows = self._query("SELECT instance, idx, parts FROM partition_claims")
        return {instance: (idx, parts) for instance, idx, parts in rows}

    def add_partition_claim(self, instance: str, idx: int, parts: int) -> None:
        self._write("INSERT INTO partition_claims (instance, idx, parts) VALUES (?, ?, ?)", (instance, idx, parts))

    # ------------------------------------------------------------------ rounds

    def insert_round(self, r: RoundRow) -> None:
        self._write(
            f"INSERT INTO rounds ({_ROUND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.round,
                r.state,
                json.dumps(r.selected),
                r.opened_at,
                r.deadline_at,
                r.sigma_before,
                r.local_sigma,
                r.sigma_merged,
                r.sigma_after,
                r.closed_at,
                json.dumps(r.metrics) if r.metrics is not None else None,
            ),
        )

    def close_round(
        self,
        round_: int,
        state: str,
        closed_at: float,
        metrics: dict,
        sigma_merged: float | None,
        sigma_after: float | None,
    ) -> None:
        self._write(
            "UPDATE rounds SET state = ?, closed_at = ?, metrics = ?, sigma_merged = ?, sigma_after = ? "
            "WHERE round = ?",
            (state, closed_at, json.dumps(metrics), sigma_merged, sigma_after, round_),
        )

    def set_deadline(self, round_: int, deadline_at: float) -> None:
        self._write("UPDATE rounds SET deadline_at = ? WHERE round = ?", (deadline_at, round_))

    def rounds(self) -> list[RoundRow]:
        return [_round_row(r) for r in self._query(f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round")]

    def save_round_mean(self, round_: int, mean: np.ndarray) -> None:
        self._write(
            "INSERT OR REPLACE INTO round_means (round, mean) VALUES (?, ?)",
            (round_, np.asarray(mean, dtype="<f8").tobytes()),
        )

    def round_mean(self, round_: int) -> np.ndarray | None:
        rows = self._query("SELECT mean FROM round_means WHERE round = ?", (round_,))
        return np.frombuffer(rows[0][0], dtype="<f8").copy() if rows else None

    def open_round(self) -> RoundRow | None:
        rows = self._query(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE state = 'open'")
        return _round_row(rows[0]) if rows else None

    # ------------------------------------------------------------------ updates

    def update_digest(self, round_: int, client_id: str) -> str | None:
        rows = self._query("SELECT body_sha256 FROM updates WHERE round = ? AND client_id = ?", (round_, client_id))
        return rows[0][0] if rows else None

    def insert_update(self, round_: int, client_id: str, digest: str, body: str, now: float) -> None:
        self._write(
            "INSERT INTO updates (round, client_id, body_sha256, body, received_at) VALUES (?, ?, ?, ?, ?)",
            (round_, client_id, digest, body, now),
        )

    def update_count(self, round_: int) -> int:
        return self._query("SELECT COUNT(*) FROM updates WHERE round = ?", (round_,))[0][0]

    def updates(self, round_: int) -> list[tuple[str, UpdateRequest]]:
        rows = self._query("SELECT client_id, body FROM updates WHERE round = ? ORDER BY client_id", (round_,))
        return [(cid, UpdateRequest.model_validate_json(body)) for cid, body in rows]

    def update_records(self, round_: int) -> list[tuple[str, int, UpdateRequest]]:
        """(client id, the update's body size in bytes, the update) of a round's accepted updates."""
        rows = self._query("SELECT client_id, body FROM updates WHERE round = ? ORDER BY client_id", (round_,))
        return [(cid, len(body.encode()), UpdateRequest.model_validate_json(body)) for cid, body in rows]

    def reporters(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for round_, cid in self._query("SELECT round, client_id FROM updates ORDER BY round, client_id"):
            out.setdefault(round_, []).append(cid)
        return out

    # ------------------------------------------------------------------ traffic

    def add_traffic(self, round_: int, bytes_up: int, bytes_down: int) -> None:
        self._write(
            "INSERT INTO traffic (round, bytes_up, bytes_down) VALUES (?, ?, ?) ON CONFLICT (round) DO UPDATE "
            "SET bytes_up = bytes_up + excluded.bytes_up, bytes_down = bytes_down + excluded.bytes_down",
            (round_, bytes_up, bytes_down),
        )

    def traffic(self) -> dict[int, tuple[int, int]]:
        return {r: (up, down) for r, up, down in self._query("SELECT round, bytes_up, bytes_down FROM traffic")}

    # ------------------------------------------------------------------ strategy

    def save_strategy(self, blob: bytes) -> None:
        self._write("INSERT OR REPLACE INTO strategy (id, state) VALUES (1, ?)", (blob,))

    def load_strategy(self) -> bytes | None:
        rows = self._query("SELECT state FROM strategy WHERE id = 1")
        return bytes(rows[0][0]) if rows else None
