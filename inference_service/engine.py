"""The `Engine` protocol every backend implements, and the batch it scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np


class InputError(ValueError):
    """Input the engine cannot score; `field` names the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelFacts:
    """What only the loaded model can tell; the app adds the service's limits to publish it as ModelInfo."""

    name: str
    kind: Literal["causal", "masked"]
    hidden_size: int
    vocab_size: int
    embedding_std: float  # of the input embeddings' output, the scale soft prompts must match
    dtype: str
    engine: str
    prompt_anchor: str | None  # the token placed ahead of a soft prompt, if any
    mask_token: str | None  # a masked LM's


@dataclass(frozen=True)
class ScoreBatch:
    prompts: np.ndarray  # [P, L, D] float32
    texts: list[str]  # N texts, each with one slot
    label_words: list[str]  # C words
    # Requests share cached state only under the same salt (the API key's id): no key learns, by timing, what
    # another key sent.
    cache_salt: str = ""


@dataclass(frozen=True)
class ScoreResult:
    logits: np.ndarray  # [P, N, C] float32
    sequences: int
    tokens: int  # real (unpadded) positions run through the model
    engine_ms: float


class Engine(Protocol):
    info: ModelFacts

    def label_token_ids(self, label_words: list[str]) -> list[int]:
        """One vocabulary id per word; InputError naming `label_words` if a word is not a single token."""
        ...

    def token_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), D] float32: the input embeddings of vocabulary ids, as the model applies them (P0 of init
        'tokens'; never published, only added to prompts inside the service)."""
        ...

    def positions(self, texts: list[str], prompt_length: int) -> list[int]:
        """Each text's sequence length with a soft prompt of `prompt_length` (the work of scoring it);
        InputError naming `texts[i]` for a bad text."""
        ...

    def score(self, batch: ScoreBatch) -> ScoreResult:
        """Label-word logits of every (prompt, text) pair; InputError naming `texts[i]` for a bad text."""
        ...
