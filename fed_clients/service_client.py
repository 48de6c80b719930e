"""The client of the black-box inference service."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbpt_wire.schemas import ModelInfo, ScoreRequest, ScoreResponse
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


class ServiceClient:
    def __init__(self, url: str, api_key: str | None = None, *, wire_dtype: str = "float32", **http_options):
        self.http = RetryingClient(url, api_key, **http_options)
        self.wire_dtype = wire_dtype
        self.costs = ServiceCosts()
        self._info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.model_validate(self.http.request("GET", "/v1/model"))
        return self._info

    def score(self, prompts: np.ndarray, texts: list[str], label_words: list[str],
              labels: list[int] | np.ndarray | None = None) -> Scores:
        request = ScoreRequest(
            prompts=encode_tensor(prompts, self.wire_dtype),
            texts=list(texts),
            label_words=list(label_words),
            labels=None if labels is None else [int(y) for y in labels],
        )
        response = ScoreResponse.model_validate(self.http.request("POST", "/v1/score", request.model_dump()))
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
