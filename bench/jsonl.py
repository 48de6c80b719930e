"""The benchmarks' rows: one JSON line each, printed as measured and appended to a results file."""

from __future__ import annotations

import json


def emit(rows: list[dict], row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def append(path: str | None, rows: list[dict]) -> None:
    """Add `rows` to the JSON-lines file `path` (nothing where no path is given): earlier runs stay beside them."""
    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
