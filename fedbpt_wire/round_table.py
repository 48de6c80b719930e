"""A run's rounds as table rows: one definition of every per-round column, which each report picks from
(`fedbpt report`'s CSV, the demo's and compose's report.json, the bench's runs)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .federation import RoundRecord


def _seconds(r: RoundRecord) -> float | None:
    return None if r.closed_at is None else round(r.closed_at - r.opened_at, 3)


def _both_links(r: RoundRecord) -> int:
    return r.service_bytes_up + r.service_bytes_down + r.bytes_up + r.bytes_down


COLUMNS: dict[str, Callable[[RoundRecord], Any]] = {
    "round": lambda r: r.round,
    "state": lambda r: r.state,
    "selected": lambda r: len(r.selected),
    "reported": lambda r: len(r.reporters),
    "clients": lambda r: len(r.reporters),
    "val_accuracy": lambda r: r.val_accuracy,
    "val_loss": lambda r: r.val_loss,
    "sigma_before": lambda r: r.sigma_before,
    "sigma_after": lambda r: r.sigma_after,
    "queries": lambda r: r.queries,
    "sequences": lambda r: r.sequences,
    "tokens": lambda r: r.tokens,
    "service_bytes": lambda r: r.service_bytes,
    "service_bytes_up": lambda r: r.service_bytes_up,
    "service_bytes_down": lambda r: r.service_bytes_down,
    "bytes_up": lambda r: r.bytes_up,
    "bytes_down": lambda r: r.bytes_down,
    "clipped": lambda r: r.clipped,
    "seconds": _seconds,
}
# Running totals over the rounds so far: service queries, and bytes on both links (client <-> service and
# client <-> aggregator).
CUMULATIVE: dict[str, Callable[[RoundRecord], int]] = {
    "cumulative_queries": lambda r: r.queries,
    "cumulative_bytes": _both_links,
}

# What a finished run's report shows per round (the demo's and compose's report.json and rounds.csv).
SUMMARY = (
    "round",
    "state",
    "val_accuracy",
    "val_loss",
    "queries",
    "sequences",
    "tokens",
    "service_bytes",
    "bytes_up",
    "bytes_down",
    "clients",
    "seconds",
)


def round_table(history: Iterable[RoundRecord | dict], columns: Sequence[str] = SUMMARY) -> list[dict]:
    """One row per round with `columns` (names of COLUMNS or CUMULATIVE), in that order."""
    unknown = [c for c in columns if c not in COLUMNS and c not in CUMULATIVE]
    if unknown:
        raise ValueError(f"unknown round columns {unknown}; known: {[*COLUMNS, *CUMULATIVE]}")
    totals = dict.fromkeys(CUMULATIVE, 0)
    rows = []
    for rec in history:
        r = rec if isinstance(rec, RoundRecord) else RoundRecord.model_validate(rec)
        for name, value in CUMULATIVE.items():
            totals[name] += value(r)
        rows.append({c: totals[c] if c in CUMULATIVE else COLUMNS[c](r) for c in columns})
    return rows
