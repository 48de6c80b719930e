"""Request and batch limits of the service, published in `GET /v1/model`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_prompt_length: int = 128  # L
    max_population: int = 64  # P
    max_texts: int = 256  # N
    max_text_tokens: int = 256  # tokens of one text
    max_body_bytes: int = 32 * 2**20
    # Padded positions per forward, bounding activation memory; None = 8192 on CPU, 65536 on a GPU.
    max_batch_tokens: int | None = None
