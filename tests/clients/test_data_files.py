"""Data files as a data owner brings them, read by the client: Parquet here (CSV, TSV and JSONL, and the
one-line errors of each, are exercised through the CLI in tests/system/test_cli_errors.py)."""

from __future__ import annotations

import pytest

from fed_clients.data import DataError, read_examples, read_rows
from fed_clients.tasks import task_from_spec

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TASK = task_from_spec(
    {
        "name": "tweets",
        "template": "Tweet: {text}\nSentiment:{mask}",
        "label_words": {"negative": " negative", "neutral": " neutral", "positive": " positive"},
        "label_column": "verdict",
    },
    "tweets.json",
)


def write(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_parquet_rows_with_label_names_and_indices(tmp_path):
    path = write(
        tmp_path / "own.parquet",
        {"text": ["loved it", "meh", "awful"], "verdict": ["positive", "neutral", "negative"]},
    )
    examples = read_examples(path, TASK)
    assert [(ex.fields["text"], ex.label) for ex in examples] == [("loved it", 2), ("meh", 1), ("awful", 0)]
    # Class indices in an integer column mean the same classes.
    indexed = write(tmp_path / "idx.parquet", {"text": ["loved it", "awful"], "verdict": [2, 0]})
    assert [ex.label for ex in read_examples(indexed, TASK)] == [2, 0]
    assert list(read_rows(path))[1] == (2, {"text": "meh", "verdict": "neutral"})


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"text": ["fine", "odd"], "verdict": ["positive", "ecstatic"]}, r"own\.parquet:2: .*ecstatic"),
        ({"text": ["fine"], "label": ["positive"]}, r"own\.parquet:1: no label column 'verdict'"),
        ({"text": [], "verdict": []}, r"own\.parquet: no examples"),
    ],
    ids=["label-not-in-spec", "missing-label-column", "empty"],
)
def test_parquet_errors_name_the_file_and_row(tmp_path, columns, message):
    path = write(tmp_path / "own.parquet", {k: pa.array(v, pa.string()) for k, v in columns.items()})
    with pytest.raises(DataError, match=message):
        read_examples(path, TASK)


def test_a_file_that_is_not_parquet_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"text,verdict\nfine,positive\n")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        read_examples(path, TASK)
