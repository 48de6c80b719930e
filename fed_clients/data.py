"""Loading labelled examples: the embedded default, local CSV/TSV/JSONL files, or HF `datasets` online."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .tasks import HF_COLUMNS, Task

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]
    label: int


def read_examples(path: str | Path, task: Task) -> list[Example]:
    """Rows with the task's fields (`text`, `text2`) and an integer `label` from .csv, .tsv or .jsonl."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: expected a .csv, .tsv or .jsonl file")
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in (*task.fields, "label") if c not in row]
        if missing:
            raise ValueError(f"{path} row {i + 1}: missing column(s) {missing}")
        label = int(row["label"])
        if not 0 <= label < task.num_classes:
            raise ValueError(f"{path} row {i + 1}: label {label} not in 0..{task.num_classes - 1}")
        out.append(Example({f: str(row[f]) for f in task.fields}, label))
    return out


def load_splits(source: str, task: Task) -> dict[str, list[Example]]:
    """`default` (the task's embedded data), a directory of split files, or `hf` for `datasets`."""
    if source in ("default", "embedded"):
        from fedbpt.assets import EMBEDDED_DATA, ensure_data

        if task.name not in EMBEDDED_DATA:
            raise ValueError(f"task {task.name} has no embedded data (embedded: {', '.join(sorted(EMBEDDED_DATA))}); "
                             "pass a directory of files, or `hf`")
        source = str(ensure_data(name=task.name))
    if source == "hf":
        return _load_hf(task)
    root = Path(source)
    if root.is_file():
        return {"train": read_examples(root, task), "validation": [], "test": []}
    if not root.is_dir():
        raise FileNotFoundError(f"no data at {source}")
    splits = {}
    for split in SPLITS:
        found = [root / f"{split}{ext}" for ext in (".csv", ".tsv", ".jsonl") if (root / f"{split}{ext}").exists()]
        splits[split] = read_examples(found[0], task) if found else []
    if not splits["train"]:
        raise FileNotFoundError(f"{root}: no train.csv, train.tsv or train.jsonl")
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
