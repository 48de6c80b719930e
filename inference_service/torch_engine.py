"""PyTorch/transformers engine: causal and masked LMs, on CPU or GPU."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fedbpt_wire.schemas import ModelInfo

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
            embedding_std=float(weight.std()),
            dtype=str(self.dtype).removeprefix("torch."),
            engine=self.name,
            mask_token=self.tokenizer.mask_token if self.kind == "masked" else None,
        )
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
        n_pop, n_prompt, _ = prompts.shape
        prompts = prompts.to(self.device, self.dtype)
        pre, suf = self.layout.prefix_ids, self.layout.suffix_ids
        pre_emb = self._embed_ids(pre)
        suf_emb = self._embed_ids(suf)
        text_emb = [self._embed_ids(t.ids) for t in texts]
        lengths = [len(pre) + n_prompt + len(t.ids) + len(suf) for t in texts]
        # Group equal-length texts so padding stays small; every prompt of a text shares its length.
        order = sorted(range(len(texts)), key=lambda n: lengths[n])
        items = [(p, n) for n in order for p in range(n_pop)]
        out = torch.empty(n_pop, len(texts), len(label_ids), dtype=torch.float32)
        tokens = 0
        for chunk in self._micro_batches(items, lengths):
            width = max(lengths[n] for _, n in chunk)
            x = torch.zeros(len(chunk), width, prompts.shape[2], dtype=self.dtype, device=self.device)
            mask = torch.zeros(len(chunk), width, dtype=torch.long, device=self.device)
            slot = torch.empty(len(chunk), dtype=torch.long, device=self.device)
            for i, (p, n) in enumerate(chunk):
                pieces = [pre_emb, prompts[p], text_emb[n], suf_emb]
                torch.cat(pieces, out=x[i, : lengths[n]])
                mask[i, : lengths[n]] = 1
                slot[i] = len(pre) + n_prompt + texts[n].slot
            hidden = self.body(inputs_embeds=x, attention_mask=mask).last_hidden_state
            picked = hidden[torch.arange(len(chunk), device=self.device), slot]
            scores = self._label_logits(picked, label_ids).float().cpu()
            for i, (p, n) in enumerate(chunk):
                out[p, n] = scores[i]
            tokens += int(mask.sum())
        return out.numpy(), tokens

    def _label_logits(self, picked: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal" and isinstance(self.head, torch.nn.Linear):
            # Only the C label rows of the output matrix: the full-vocabulary product is never needed.
            bias = self.head.bias[label_ids] if self.head.bias is not None else None
            return torch.nn.functional.linear(picked, self.head.weight[label_ids], bias)
        return self.head(picked)[:, label_ids]

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.embed(torch.tensor(ids, dtype=torch.long, device=self.device)).to(self.dtype)

    def _micro_batches(self, items: list[tuple[int, int]], lengths: list[int]):
        budget = self.limits.max_batch_tokens
        chunk: list[tuple[int, int]] = []
        width = 0
        for item in items:
            w = max(width, lengths[item[1]])
            if chunk and w * (len(chunk) + 1) > budget:
                yield chunk
                chunk, w = [], lengths[item[1]]
            chunk.append(item)
            width = w
        if chunk:
            yield chunk
