"""The client of the black-box inference service."""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np

from fedbpt_wire.projection import Projection
from fedbpt_wire.schemas import ModelInfo, ProjectedPrompts, ProjectionSpec, ScoreRequest, ScoreResponse
from fedbpt_wire.tensors import decode_tensor, encode_tensor

from .http import RetryingClient


@dataclass(frozen=True)
class Scores:
    logits: np.ndarray  # [P, N, C]
    loss: np.ndarray | None  # [P]
    accuracy: np.ndarray | None  # [P]


@dataclass
class ServiceCosts:
    queries: int = 0
    sequences: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Usage:
    """What a service client has spent so far, service-counted and on the wire; differences give a round's cost."""

    queries: int = 0
    sequences: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(a - b for a, b in zip(astuple(self), astuple(other))))


PROMPT_WIRE_FORMS = ("float32", "float16", "seed")
# Positions of a sequence beyond its text's tokens and the soft prompt: specials, an anchor, a prefix space.
SEQUENCE_MARGIN = 8


def request_chunks(
    texts: list[str], population: int, prompt_length: int, info: ModelInfo, max_texts: int | None = None
) -> list[list[str]]:
    """The texts in consecutive requests within the service's limits: `max_texts` each, and a work budget
    (`max_request_tokens`: P x the sequences' lengths) estimated from above with one token per UTF-8 byte,
    as byte-level tokenizers never make more; the client has no tokenizer to count exactly."""
    cap = min(max_texts or info.max_texts, info.max_texts)
    budget = info.max_request_tokens
    chunks: list[list[str]] = []
    current: list[str] = []
    used = 0
    for text in texts:
        cost = population * (len(text.encode("utf-8")) + prompt_length + SEQUENCE_MARGIN)
        if current and (len(current) >= cap or (budget is not None and used + cost > budget)):
            chunks.append(current)
            current, used = [], 0
        current.append(text)
        used += cost
    if current:
        chunks.append(current)
    return chunks


class ServiceClient:
    """`prompt_wire` is how a population of projected prompts travels: dense [P, L, D] in float32 or
    float16, or as `seed`: z [P, d] in float32 plus the projection's seed, expanded by the service."""

    def __init__(self, url: str, api_key: str | None = None, *, prompt_wire: str = "float32", **http_options):
        if prompt_wire not in PROMPT_WIRE_FORMS:
            raise ValueError(f"prompt_wire must be one of {PROMPT_WIRE_FORMS}, got {prompt_wire!r}")
        self.http = RetryingClient(url, api_key, **http_options)
        # Dense prompts (and the seed form's z-less calls) travel as float16 only where asked.
        self.wire_dtype = "float16" if prompt_wire == "float16" else "float32"
        self.prompt_wire = prompt_wire
        self.costs = ServiceCosts()
        self._info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.model_validate(self.http.request("GET", "/v1/model"))
        return self._info

    def score(
        self,
        prompts: np.ndarray,
        texts: list[str],
        label_words: list[str],
        labels: list[int] | np.ndarray | None = None,
    ) -> Scores:
        """Dense prompts [P, L, D]."""
        return self._score(
            ScoreRequest(
                prompts=encode_tensor(prompts, self.wire_dtype),
                texts=list(texts),
                label_words=list(label_words),
                labels=None if labels is None else [int(y) for y in labels],
            )
        )

    def score_projected(
        self,
        z: np.ndarray,
        projection: ProjectionSpec,
        texts: list[str],
        label_words: list[str],
        labels: list[int] | np.ndarray | None = None,
    ) -> Scores:
        """z [P, d] with the projection's spec: d floats per prompt on the wire instead of L x D.

        z goes as float32, the precision the projection itself works in, so the service's prompts
        are bit for bit the client's own."""
        if self.model_info().max_projection_values is None:
            raise RuntimeError("this service does not take prompts as seed + z; use the float32 or float16 prompt wire")
        projected = ProjectedPrompts(z=encode_tensor(np.atleast_2d(z), "float32"), projection=projection)
        return self._score(
            ScoreRequest(
                projected=projected,
                texts=list(texts),
                label_words=list(label_words),
                labels=None if labels is None else [int(y) for y in labels],
            )
        )

    def score_population(
        self, z: np.ndarray, projection: Projection, texts: list[str], label_words: list[str]
    ) -> Scores:
        """z [P, d] through `projection`, in this client's prompt wire form. Init 'tokens' and basis 'embeddings'
        draw on the model's embeddings, which only the service holds: such prompts always travel as seed + z."""
        if self.prompt_wire == "seed" or projection.service_only:
            return self.score_projected(z, projection.spec, texts, label_words)
        return self.score(projection(z), texts, label_words)

    def usage(self) -> Usage:
        c, w = self.costs, self.http.wire
        return Usage(c.queries, c.sequences, c.tokens, w.bytes_up, w.bytes_down)

    def _score(self, request: ScoreRequest) -> Scores:
        response = ScoreResponse.model_validate(
            self.http.request("POST", "/v1/score", request.model_dump(exclude_none=True))
        )
        self.costs.queries += 1
        self.costs.sequences += response.usage.sequences
        self.costs.tokens += response.usage.tokens
        return Scores(
            logits=decode_tensor(response.logits, "logits"),
            loss=None if response.loss is None else np.asarray(response.loss),
            accuracy=None if response.accuracy is None else np.asarray(response.accuracy),
        )

    def close(self) -> None:
        self.http.close()
