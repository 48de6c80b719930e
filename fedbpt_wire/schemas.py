"""Pydantic models of the service contract (DESIGN.md section 3) and the aggregator's API.

Field names are a public API: add fields, never rename them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SLOT = "{mask}"


class Strict(BaseModel):
    # Unknown fields are rejected so a misspelt field is a 422, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class Tensor(Strict):
    dtype: str = Field(description="float32 or float16")
    shape: list[int] = Field(max_length=8)
    data: str = Field(description="base64 of the little-endian C-order bytes")


# ---------------------------------------------------------------- inference service


class ModelInfo(BaseModel):
    name: str
    kind: Literal["causal", "masked"]
    hidden_size: int
    vocab_size: int
    max_prompt_length: int
    max_texts: int
    max_population: int
    max_text_tokens: int
    embedding_std: float
    dtype: str
    engine: str
    mask_token: str | None = None


class ScoreRequest(Strict):
    prompts: Tensor = Field(description="soft prompts [P, L, D]; L may be 0 for the bare template")
    texts: list[str] = Field(min_length=1, description=f"N texts, each holding exactly one {SLOT!r}")
    label_words: list[str] = Field(min_length=2, description="C label words, each a single token")
    labels: list[int] | None = Field(default=None, description="N labels in 0..C-1; with them loss and accuracy")


class Usage(BaseModel):
    sequences: int
    tokens: int
    engine_ms: float


class ScoreResponse(BaseModel):
    logits: Tensor
    loss: list[float] | None = None
    accuracy: list[float] | None = None
    usage: Usage


class ErrorBody(BaseModel):
    detail: str
