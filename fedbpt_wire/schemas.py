"""Pydantic models of the service contract (docs/design.md, section 3) and the aggregator's API.

Field names are a public API: add fields, never rename them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SLOT = "{mask}"
# Optional in a text: where the soft prompt goes (default: ahead of the text).
PROMPT_SLOT = "{prompt}"


class Strict(BaseModel):
    # Unknown fields are rejected so a misspelt field is a 422, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class Tensor(Strict):
    dtype: str = Field(description="float32 or float16")
    shape: list[int] = Field(max_length=8)
    data: str = Field(description="base64 of the little-endian C-order bytes")


# ---------------------------------------------------------------- inference service


# The `max_*` fields are the service's limits, each described where it is set (inference_service/limits.py, which
# also puts the descriptions into the service's OpenAPI schema).
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
    prompt_anchor: str | None = Field(
        default=None,
        description="the token placed ahead of a soft prompt (L > 0) at position 0, where the "
        "tokenizer adds no BOS of its own; absent: none",
    )
    # Absent from a service that predates them.
    max_projection_values: int | None = None
    max_request_tokens: int | None = None
    max_request_seconds: float | None = None


class ProjectionSpec(Strict):
    """The shared projection P = P0 + A z, named by its seed; the service draws A and P0 as clients do."""

    seed: int = Field(ge=0, lt=2**63, description="projection seed (RunConfig.projection_seed)")
    prompt_length: int = Field(ge=1, description="L soft tokens")
    sigma0: float = Field(gt=0, allow_inf_nan=False, description="the CMA-ES step size A is scaled for")
    init: Literal["tokens", "random", "zeros"] = Field(
        default="random",
        description="P0: 'tokens' (embeddings of L vocabulary ids drawn from the seed, as BBT; "
        "only the service can expand it), 'random' or 'zeros'",
    )
    basis: Literal["embeddings"] | None = Field(
        default=None,
        description="A's rows: absent, normal draws; 'embeddings', centred embeddings of vocabulary ids drawn from "
        "the seed (RunConfig.projection_basis; only the service can expand it)",
    )


class ProjectedPrompts(Strict):
    """Soft prompts in the compact form: z [P, d] and the projection that maps z to [P, L, D]."""

    z: Tensor = Field(description="[P, d] points of the intrinsic space")
    projection: ProjectionSpec


class ScoreRequest(Strict):
    prompts: Tensor | None = Field(
        default=None,
        description="soft prompts [P, L, D]; L may be 0 for the bare template. "
        "Exactly one of `prompts` and `projected` is given",
    )
    projected: ProjectedPrompts | None = Field(
        default=None,
        description="the population as seed + z, expanded by the service with the shared "
        "projection: d floats per prompt on the wire instead of L x D",
    )
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
