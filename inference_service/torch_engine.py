"""PyTorch/transformers engine: causal and masked LMs, on CPU or GPU."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fedbpt_wire.schemas import ModelInfo

from .embeddings import embedding_std
from .engine import ScoreBatch, ScoreResult
from .layout import Layout, TextIds, label_token_ids, make_layout, tokenize_text
from .limits import Limits

log = logging.getLogger(__name__)

_MASKED_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "distilbert"}


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32


def model_kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    return "masked" if config.model_type in _MASKED_TYPES else "causal"


def _masked_head(model):
    for name in ("lm_head", "cls"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise RuntimeError(f"{type(model).__name__}: no masked-LM head (lm_head or cls) found")


class TorchEngine:
    name = "torch"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        limits: Limits | None = None,
        display_name: str | None = None,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        self.limits = limits or Limits()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        config = AutoConfig.from_pretrained(model_path)
        self.kind = model_kind(config)
        cls = AutoModelForMaskedLM if self.kind == "masked" else AutoModelForCausalLM
        t0 = time.perf_counter()
        self.model = cls.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        log.info("loaded %s (%s LM, %s, %s) in %.1fs", model_path, self.kind, self.dtype, self.device, time.perf_counter() - t0)
        self.layout: Layout = make_layout(self.tokenizer, self.kind)
        self.embed = self.model.get_input_embeddings()
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings() if self.kind == "causal" else _masked_head(self.model)
        weight = self.embed.weight.detach().float()
        self.info = ModelInfo(
            name=display_name or Path(str(model_path).rstrip("/")).name,
            kind=self.kind,
            hidden_size=weight.shape[1],
            vocab_size=weight.shape[0],
            max_prompt_length=self.limits.max_prompt_length,
            max_texts=self.limits.max_texts,
            max_population=self.limits.max_population,
            max_text_tokens=self.limits.max_text_tokens,
            embedding_std=embedding_std(self.embed),
            dtype=str(self.dtype).removeprefix("torch."),
            engine=self.name,
            mask_token=self.tokenizer.mask_token if self.kind == "masked" else None,
        )
        # A GPU amortises launches over far larger batches than a CPU's caches favour.
        self.max_batch_tokens = self.limits.max_batch_tokens or (65536 if self.device.type == "cuda" else 8192)
        # One forward at a time: concurrent forwards only fight over the same cores or GPU memory.
        self._lock = threading.Lock()

    def label_token_ids(self, label_words: list[str]) -> list[int]:
        return label_token_ids(self.tokenizer, label_words)

    def tokenize(self, texts: list[str]) -> list[TextIds]:
        return [tokenize_text(self.tokenizer, self.layout, t, i, self.limits.max_text_tokens) for i, t in enumerate(texts)]

    def score(self, batch: ScoreBatch) -> ScoreResult:
        texts = self.tokenize(batch.texts)
        label_ids = torch.tensor(self.label_token_ids(batch.label_words), device=self.device)
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            logits, tokens = self._score(torch.from_numpy(batch.prompts), texts, label_ids)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        return ScoreResult(logits=logits, sequences=logits.shape[0] * logits.shape[1], tokens=tokens, engine_ms=ms)

    def _score(self, prompts: torch.Tensor, texts: list[TextIds], label_ids: torch.Tensor) -> tuple[np.ndarray, int]:
        n_pop, n_prompt, dim = prompts.shape
        prompts = prompts.to(self.device, self.dtype)
        pre = self.layout.prefix_ids
        head = len(pre) + n_prompt  # every sequence: prefix, prompt, then its text's tail
        tails = [t.ids + self.layout.suffix_ids for t in texts]
        tail_len = torch.tensor([len(t) for t in tails], device=self.device)
        # All tails' embeddings in one padded table, so a micro-batch is assembled by indexing, not a loop.
        width = max(len(t) for t in tails)
        tail_ids = torch.zeros(len(tails), width, dtype=torch.long, device=self.device)
        for n, ids in enumerate(tails):
            tail_ids[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        tail_emb = self.embed(tail_ids).to(self.dtype)
        pre_emb = self._embed_ids(pre)
        slots = torch.tensor([t.slot for t in texts], device=self.device) + head
        lengths = [head + len(t) for t in tails]
        # Group equal-length texts so padding stays small; every prompt of a text shares its length.
        order = sorted(range(len(texts)), key=lambda n: lengths[n])
        items = np.array([(p, n) for n in order for p in range(n_pop)], dtype=np.int64)
        out = np.empty((n_pop, len(texts), len(label_ids)), dtype=np.float32)
        tokens = 0
        for lo, hi in self._micro_batches([lengths[n] for n in items[:, 1]]):
            p_idx = torch.from_numpy(items[lo:hi, 0]).to(self.device)
            n_idx = torch.from_numpy(items[lo:hi, 1]).to(self.device)
            seq_width = head + int(tail_len[n_idx].max())
            x = torch.cat([pre_emb.expand(hi - lo, -1, -1), prompts[p_idx],
                           tail_emb[n_idx, : seq_width - head]], dim=1)
            mask = (torch.arange(seq_width, device=self.device) < (head + tail_len[n_idx])[:, None]).long()
            hidden = self.body(inputs_embeds=x, attention_mask=mask).last_hidden_state
            picked = hidden[torch.arange(hi - lo, device=self.device), slots[n_idx]]
            out[items[lo:hi, 0], items[lo:hi, 1]] = self._label_logits(picked, label_ids).float().cpu().numpy()
            tokens += int(mask.sum())
        return out, tokens

    def _label_logits(self, picked: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal" and isinstance(self.head, torch.nn.Linear):
            # Only the C label rows of the output matrix: the full-vocabulary product is never needed.
            bias = self.head.bias[label_ids] if self.head.bias is not None else None
            return torch.nn.functional.linear(picked, self.head.weight[label_ids], bias)
        return self.head(picked)[:, label_ids]

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.embed(torch.tensor(ids, dtype=torch.long, device=self.device)).to(self.dtype)

    def _micro_batches(self, lengths: list[int]):
        """[lo, hi) ranges over length-sorted sequences whose padded size stays within the token budget."""
        budget = self.max_batch_tokens
        lo = 0
        while lo < len(lengths):
            hi = lo + 1
            while hi < len(lengths) and lengths[hi] * (hi - lo + 1) <= budget:
                hi += 1
            yield lo, hi
            lo = hi
