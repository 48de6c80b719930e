"""What every engine shares around its model: dtype and kind resolution, the tokenizer and sequence layout, the
input embeddings, and the facts it reports (`ModelFacts`). vllm is never imported here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .embeddings import embedding_std, embedding_weight
from .engine import InputError, ModelFacts
from .layout import Layout, TextIds, anchor_text, make_layout, tokenize_text
from .layout import positions as sequence_positions
from .limits import Limits

_MASKED_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "distilbert"}


CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX): there bf16 runs ~3x faster than fp32;
    elsewhere it is emulated and slower."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device, cpuinfo: Path = CPUINFO) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16(cpuinfo)):
        return torch.bfloat16
    return torch.float32


def model_kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    return "masked" if config.model_type in _MASKED_TYPES else "causal"


class EngineBase:
    """Texts to token ids and ids to embeddings, the same for every backend, so that the engines differ only in
    how they run the model. A subclass sets `limits`, `dtype` and `embed` (the model's input embedding module)
    and calls `_load_tokenizer` before it uses these methods."""

    name: str
    limits: Limits
    dtype: torch.dtype
    embed: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer (fast or slow; no common typed base)
    layout: Layout

    def _load_tokenizer(self, model_path: str, kind: str, prompt_anchor: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.layout = make_layout(self.tokenizer, kind, prompt_anchor)

    def _facts(self, model_path: str, display_name: str | None) -> ModelFacts:
        vocab_size, hidden_size = embedding_weight(self.embed).shape
        kind: Literal["causal", "masked"] = "masked" if self.layout.kind == "masked" else "causal"
        return ModelFacts(
            name=display_name or Path(str(model_path).rstrip("/")).name,
            kind=kind,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            embedding_std=embedding_std(self.embed),
            dtype=str(self.dtype).removeprefix("torch."),
            engine=self.name,
            prompt_anchor=anchor_text(self.tokenizer, self.layout),
            mask_token=self.tokenizer.mask_token if kind == "masked" else None,
        )

    def label_token_ids(self, label_words: list[str]) -> list[int]:
        ids = []
        for i, word in enumerate(label_words):
            toks = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(toks)
                raise InputError(f"label_words[{i}]", f"{word!r} is {len(toks)} tokens {pieces}, must be exactly one")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise InputError("label_words", "two label words map to the same token")
        return ids

    def tokenize(self, texts: list[str]) -> list[TextIds]:
        limit = self.limits.max_text_tokens
        return [tokenize_text(self.tokenizer, self.layout, t, i, limit) for i, t in enumerate(texts)]

    def positions(self, texts: list[str], prompt_length: int) -> list[int]:
        return sequence_positions(self.layout, self.tokenize(texts), prompt_length)

    def token_embeddings(self, ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return (
                self.embed(torch.as_tensor(ids, dtype=torch.long, device=embedding_weight(self.embed).device))
                .float()
                .cpu()
                .numpy()
            )

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.embed(torch.tensor(ids, dtype=torch.long, device=embedding_weight(self.embed).device)).to(
            self.dtype
        )
