"""FedBPT's perturbed copy of a batch: each word of an input replaced at random with probability r.

The random words come from the client's own corpus: a black-box client has no model vocabulary.
"""

from __future__ import annotations

import numpy as np

from .data import Example


def corpus_words(examples: list[Example]) -> list[str]:
    words = sorted({w for ex in examples for v in ex.fields.values() for w in v.split()})
    return words or ["the"]


def perturb_examples(examples: list[Example], rate: float, words: list[str], seed) -> list[Example]:
    """Same labels, each whitespace word swapped for a random corpus word with probability `rate`."""
    rng = np.random.default_rng(seed)
    out = []
    for ex in examples:
        fields = {}
        for name, value in ex.fields.items():
            tokens = value.split()
            swap = rng.random(len(tokens)) < rate
            picks = rng.integers(0, len(words), size=len(tokens))
            fields[name] = " ".join(words[j] if s else t for t, s, j in zip(tokens, swap, picks))
        out.append(Example(fields, ex.label))
    return out
