"""Loading labelled examples (the embedded default, local CSV/TSV/JSONL/Parquet files, or HF `datasets` online)
and a client's own part of them.

Every problem with a file is a DataError whose message names the file, the line (the record's first line) and
what is wrong, in one line: a data owner fixes the file from it, without a traceback.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .partition import few_shot, partition, train_val_split
from .tasks import HF_COLUMNS, Task

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


class DataError(ValueError):
    """A data file that cannot be used; the message is `file:line: problem`."""


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]
    label: int


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            # strict: a stray or unterminated quote is an error, not a row silently swallowing the rest of the file.
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            line = 1
            try:
                header = next(reader, None)
                if not header or not any(h.strip() for h in header):
                    raise DataError(f"{path}:1: no header line (the column names, e.g. text{delimiter}label)")
                header = [h.strip() for h in header]
                line = reader.line_num + 1
                for row in reader:
                    if row:  # a blank line is no record
                        if len(row) != len(header):
                            raise DataError(
                                f"{path}:{line}: {len(row)} fields where the header has {len(header)} "
                                f"({', '.join(header)}); quote a field that holds {delimiter!r}"
                            )
                        yield line, dict(zip(header, row))
                    line = reader.line_num + 1
            except csv.Error as exc:
                hint = "a quoted field opened here is never closed" if "end of data" in str(exc) else "bad quoting"
                raise DataError(f"{path}:{line}: {hint} ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line}: expected a JSON object per line, got {type(row).__name__}")
                yield line, row
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow (pip install 'fedbpt[parquet]'), or save the file as CSV or JSONL"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors have no common base worth naming here
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    # Parquet has no lines: the row number (1-based) stands in for one.
    yield from enumerate(table.to_pylist(), start=1)


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line, row) of a .csv, .tsv, .jsonl or .parquet file; DataError on a file that cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{path}: expected a {', '.join(DATA_SUFFIXES)} file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    return _csv_rows(path, "\t" if suffix == ".tsv" else ",")


def _text(value, path: Path, line: int, column: str) -> str:
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{path}:{line}: column {column!r} must be text, got {json.dumps(value)}")
    return str(value)


def read_inputs(path: str | Path, task: Task) -> Iterator[tuple[int, dict]]:
    """(line, row) with the task's text columns checked; labels, where present, are the caller's."""
    path = Path(path)
    for line, row in read_rows(path):
        missing = [c for c in task.fields if c not in row]
        if missing:
            raise DataError(
                f"{path}:{line}: no column {', '.join(map(repr, missing))} (the template's "
                f"{', '.join('{' + c + '}' for c in missing)}); columns: {', '.join(map(str, row))}"
            )
        for c in task.fields:
            row[c] = _text(row[c], path, line, c)
        yield line, row


def read_examples(path: str | Path, task: Task) -> list[Example]:
    """Labelled rows: the task's text columns and its label column, a label name of the spec or a class index."""
    path = Path(path)
    out = []
    for line, row in read_inputs(path, task):
        if task.label_column not in row:
            raise DataError(
                f"{path}:{line}: no label column {task.label_column!r}; columns: {', '.join(map(str, row))}"
            )
        try:
            label = task.label_index(row[task.label_column])
        except ValueError as exc:
            raise DataError(f"{path}:{line}: {exc}") from None
        out.append(Example({f: row[f] for f in task.fields}, label))
    if not out:
        raise DataError(f"{path}: no examples (a header and at least one labelled row are needed)")
    return out


def load_splits(source: str, task: Task) -> dict[str, list[Example]]:
    """`default` (the task's embedded data), a directory of split files, or `hf` for `datasets`."""
    if source in ("default", "embedded"):
        from fedbpt_assets import EMBEDDED_DATA, ensure_data

        if task.name not in EMBEDDED_DATA:
            raise ValueError(
                f"task {task.name} has no embedded data (embedded: {', '.join(sorted(EMBEDDED_DATA))}); "
                "pass a directory of files, or `hf`"
            )
        source = str(ensure_data(name=task.name))
    if source == "hf":
        return _load_hf(task)
    root = Path(source)
    if root.is_file():
        return {"train": read_examples(root, task), "validation": [], "test": []}
    if not root.is_dir():
        raise DataError(
            f"{source}: no such file or directory (--data takes a data file, a directory of "
            "train/validation/test files, 'default' or 'hf')"
        )
    splits = {}
    for split in SPLITS:
        found = [root / f"{split}{ext}" for ext in DATA_SUFFIXES if (root / f"{split}{ext}").exists()]
        splits[split] = read_examples(found[0], task) if found else []
    if not splits["train"]:
        raise DataError(f"{root}: no train file ({', '.join('train' + e for e in DATA_SUFFIXES)})")
    return splits


def _load_hf(task: Task) -> dict[str, list[Example]]:
    if task.hf_dataset is None:
        raise ValueError(f"task {task.name} has no Hugging Face dataset; pass a directory of files")
    import datasets  # online users only: never needed for the embedded default

    ds = datasets.load_dataset(*task.hf_dataset)

    def convert(rows) -> list[Example]:
        renamed = {HF_COLUMNS.get(c, c): c for c in rows.column_names}
        return [Example({f: row[renamed[f]] for f in task.fields}, int(row["label"])) for row in rows]

    # GLUE hides test labels: its validation split serves as the held-out test set, as in BBT.
    train = convert(ds["train"])
    return {"train": train, "validation": [], "test": convert(ds[task.hf_test_split])}


@dataclass(frozen=True)
class ClientData:
    """One client's examples: what it searches on and what it validates on."""

    train: list[Example]
    val: list[Example]


def client_shard(
    examples: list[Example],
    index: int,
    n_clients: int,
    alpha: float | None,
    seed: int,
    per_class: int | None = None,
    val_fraction: float = 0.25,
) -> ClientData:
    """Client `index`'s part of a shared pool: few-shot sample, IID or Dirichlet split, local train/val.

    Every client computes the same partition from the same seed, so no one hands out data.
    """
    labels = np.array([ex.label for ex in examples])
    pool = few_shot(labels, per_class, seed) if per_class else np.arange(len(examples))
    parts = partition(labels[pool], n_clients, alpha, seed)
    mine = pool[parts[index]]
    train_idx, val_idx = train_val_split(mine, val_fraction, seed + index)
    return ClientData([examples[i] for i in train_idx], [examples[i] for i in val_idx])


def check_data(client_id: str, data: ClientData, source: str, batch_size: int) -> None:
    """Refuses a client with nothing to train on; warns where its updates will be noise."""
    n = len(data.train) + len(data.val)
    if not data.train or not data.val:
        raise DataError(
            f"{source}: client {client_id} has {n} example(s); at least 2 are needed, one to train on and one "
            "to validate (better: one batch or more)"
        )
    # A shard just under one batch is scored whole each iteration, which is no worse: the demo's clients hold 15
    # examples for batches of 16. Under half a batch, the search fits a handful of examples.
    if len(data.train) < batch_size / 2:
        log.warning(
            "%s: only %d training examples, under half a batch (--batch-size %d): its updates will be "
            "noisy and it weighs little in the merge",
            client_id,
            len(data.train),
            batch_size,
        )
