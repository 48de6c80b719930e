"""PyTorch/transformers engine: causal and masked LMs, on CPU or GPU."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from .engine import InputError, ScoreBatch, ScoreResult
from .engine_base import EngineBase, model_kind, resolve_dtype
from .layout import Sequence, TextIds, sequence
from .limits import Limits
from .prefix_cache import LayerKV, PrefixCache

log = logging.getLogger(__name__)


def _learned_positions(body) -> int | None:
    """How many positions a model with a learned position table (BERT, RoBERTa, GPT-2) can read; None where
    positions are computed (rotary: Llama, Gemma). RoBERTa-style tables start after padding_idx."""
    table = getattr(getattr(body, "embeddings", None), "position_embeddings", None) or getattr(body, "wpe", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    return table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)


def _masked_head(model):
    for name in ("lm_head", "cls"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise RuntimeError(f"{type(model).__name__}: no masked-LM head (lm_head or cls) found")


class TorchEngine(EngineBase):
    name = "torch"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        limits: Limits | None = None,
        display_name: str | None = None,
        prompt_anchor: str = "none",
        kv_reuse: bool = True,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

        self.limits = limits or Limits()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        config = AutoConfig.from_pretrained(model_path)
        self.kind = model_kind(config)
        cls = AutoModelForMaskedLM if self.kind == "masked" else AutoModelForCausalLM
        t0 = time.perf_counter()
        model: Any = cls.from_pretrained(model_path, dtype=self.dtype)  # transformers types .to() too narrowly
        self.model = model.to(self.device).eval()
        self._load_tokenizer(model_path, self.kind, prompt_anchor)
        log.info(
            "loaded %s (%s LM, %s, %s) in %.1fs",
            model_path,
            self.kind,
            self.dtype,
            self.device,
            time.perf_counter() - t0,
        )
        # Causal LMs reuse the keys and values of a shared prefix (see reuse_plan); off, every sequence runs whole.
        self.kv_reuse = kv_reuse
        self.embed = self.model.get_input_embeddings()
        self.body = self.model.base_model
        # transformers renamed `past_key_values` to `cache` in 5.2x; the engine runs with either.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        self.head = self.model.get_output_embeddings() if self.kind == "causal" else _masked_head(self.model)
        self.max_positions = _learned_positions(self.body)
        self.info = self._facts(model_path, display_name)
        # A GPU amortises launches over far larger batches than a CPU's caches favour.
        self.max_batch_tokens = self.limits.max_batch_tokens or (65536 if self.device.type == "cuda" else 8192)
        # Text heads' keys and values across requests, where the prompt follows the text (see prefix_cache.py).
        cache_bytes = self.limits.max_prefix_cache_bytes
        if cache_bytes is None:
            cache_bytes = 2**32 if self.device.type == "cuda" else 2**28
        use_cache = kv_reuse and self.kind == "causal" and cache_bytes > 0
        self.prefix_cache = PrefixCache(cache_bytes) if use_cache else None
        # One forward at a time: concurrent forwards only fight over the same cores or GPU memory.
        self._lock = threading.Lock()

    def score(self, batch: ScoreBatch) -> ScoreResult:
        texts = self.tokenize(batch.texts)
        label_ids = torch.tensor(self.label_token_ids(batch.label_words), device=self.device)
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            logits, tokens = self._score(torch.from_numpy(batch.prompts), texts, label_ids, batch.cache_salt)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        return ScoreResult(logits=logits, sequences=logits.shape[0] * logits.shape[1], tokens=tokens, engine_ms=ms)

    def _score(
        self, prompts: torch.Tensor, texts: list[TextIds], label_ids: torch.Tensor, salt: str = ""
    ) -> tuple[np.ndarray, int]:
        n_pop, n_prompt, _ = prompts.shape
        prompts = prompts.to(self.device, self.dtype)
        seqs = [sequence(self.layout, t, n_prompt) for t in texts]
        for i, length in enumerate(len(s.lead) + n_prompt + len(s.tail) for s in seqs):
            if self.max_positions is not None and length > self.max_positions:
                raise InputError(
                    f"texts[{i}]",
                    f"with a prompt of L = {n_prompt} it takes {length} positions, "
                    f"more than the model's {self.max_positions}",
                )
        out = np.empty((n_pop, len(texts), len(label_ids)), dtype=np.float32)
        plan = self.reuse_plan(seqs, n_prompt) if self.kv_reuse else "none"
        if plan == "prompt":
            tokens = self._score_shared_prompt(prompts, seqs, label_ids, out)
        elif plan == "text":
            tokens = self._score_shared_text(prompts, seqs, label_ids, out, salt)
        else:
            tokens = self._score_full(prompts, seqs, label_ids, out)
        return out, tokens

    def reuse_plan(self, seqs: list[Sequence], n_prompt: int) -> str:
        """Which shared prefix a causal LM computes once and reuses through its key/value cache.

        `prompt`: every text starts after the prompt, so (lead + prompt) is run once per candidate and each
        text continues from it; `text`: every text has its own non-empty lead ahead of the prompt, run once per
        text, each candidate's (prompt + tail) continuing from it; `none`: a masked LM (it attends both ways,
        so no position's state is fixed by what precedes it) or a mix of the two.
        """
        if self.kind != "causal":
            return "none"
        leads = {tuple(s.lead) for s in seqs}
        if len(leads) == 1 and len(seqs[0].lead) + n_prompt > 0:
            return "prompt"
        if n_prompt > 0 and all(s.lead for s in seqs):
            return "text"
        return "none"

    def _padded_ids(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [K, W, D] of right-padded id rows, and their lengths [K]."""
        width = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for k, row in enumerate(rows):
            ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
        return self.embed(ids).to(self.dtype), torch.tensor([len(r) for r in rows], device=self.device)

    def _score_full(self, prompts: torch.Tensor, seqs: list[Sequence], label_ids: torch.Tensor, out: np.ndarray) -> int:
        """Every (prompt, text) sequence run whole: the reference path, and the only one for masked LMs."""
        n_pop, n_prompt, _ = prompts.shape
        # Each text's ids with room for the prompt, embedded once; a micro-batch gathers rows and writes the
        # candidates' prompts into their slots by indexing, with no per-sequence loop.
        rows = [s.lead + [0] * n_prompt + s.tail for s in seqs]
        table, lengths = self._padded_ids(rows)
        lead_len = torch.tensor([len(s.lead) for s in seqs], device=self.device)
        slots = torch.tensor([len(s.lead) + n_prompt + s.slot for s in seqs], device=self.device)
        order = sorted(range(len(seqs)), key=lambda n: len(rows[n]))
        items = np.array([(p, n) for n in order for p in range(n_pop)], dtype=np.int64)
        tokens = 0
        for lo, hi in self._micro_batches([len(rows[n]) for n in items[:, 1]]):
            p_idx = torch.from_numpy(items[lo:hi, 0]).to(self.device)
            n_idx = torch.from_numpy(items[lo:hi, 1]).to(self.device)
            width = int(lengths[n_idx].max())
            x = table[n_idx, :width].clone()
            if n_prompt:
                at = lead_len[n_idx][:, None] + torch.arange(n_prompt, device=self.device)
                x[torch.arange(hi - lo, device=self.device)[:, None], at] = prompts[p_idx]
            mask = (torch.arange(width, device=self.device) < lengths[n_idx][:, None]).long()
            hidden = self.body(inputs_embeds=x, attention_mask=mask).last_hidden_state
            picked = hidden[torch.arange(hi - lo, device=self.device), slots[n_idx]]
            out[items[lo:hi, 0], items[lo:hi, 1]] = self._label_logits(picked, label_ids).float().cpu().numpy()
            tokens += int(mask.sum())
        return tokens

    def _score_shared_prompt(
        self, prompts: torch.Tensor, seqs: list[Sequence], label_ids: torch.Tensor, out: np.ndarray
    ) -> int:
        n_pop = prompts.shape[0]
        lead = self._embed_ids(seqs[0].lead)
        prefix = torch.cat([lead.expand(n_pop, -1, -1), prompts], dim=1)
        prefix_len = torch.full((n_pop,), prefix.shape[1], device=self.device)
        tails, tail_len = self._padded_ids([s.tail for s in seqs])
        cells = np.array([(p, n) for n in range(len(seqs)) for p in range(n_pop)], dtype=np.int64)
        kv, prefix_mask = self._prefix_kv(prefix, prefix_len)
        return int(prefix_len.sum()) + self._continue_from(
            kv,
            prefix_mask,
            prefix_len,
            cells,
            cache_rows=cells[:, 0],
            cont_rows=cells[:, 1],
            continuation=lambda p_idx, n_idx, width: tails[n_idx, :width],
            cont_len=tail_len.cpu().numpy()[cells[:, 1]],
            slots=torch.tensor([s.slot for s in seqs], device=self.device),
            label_ids=label_ids,
            out=out,
        )

    def _score_shared_text(
        self, prompts: torch.Tensor, seqs: list[Sequence], label_ids: torch.Tensor, out: np.ndarray, salt: str
    ) -> int:
        n_pop, n_prompt, _ = prompts.shape
        tokens = 0
        for chunk in self._lead_chunks(seqs):
            if self.prefix_cache is None:
                prefix, prefix_len = self._padded_ids([seqs[n].lead for n in chunk])
                kv, prefix_mask = self._prefix_kv(prefix, prefix_len)
                tokens += int(prefix_len.sum())
            else:
                kv, prefix_mask, prefix_len, run = self._cached_heads_kv([seqs[n].lead for n in chunk], salt)
                tokens += run
            tails, tail_len = self._padded_ids([seqs[n].tail for n in chunk])
            local = np.array([(p, k) for k in range(len(chunk)) for p in range(n_pop)], dtype=np.int64)
            cells = np.stack([local[:, 0], np.asarray(chunk)[local[:, 1]]], axis=1)

            def continuation(p_idx, k_idx, width, tails=tails):
                return torch.cat([prompts[p_idx], tails[k_idx]], dim=1)[:, :width]

            tokens += self._continue_from(
                kv,
                prefix_mask,
                prefix_len,
                cells,
                cache_rows=local[:, 1],
                cont_rows=local[:, 1],
                continuation=continuation,
                cont_len=n_prompt + tail_len.cpu().numpy()[local[:, 1]],
                slots=torch.tensor([n_prompt + seqs[n].slot for n in chunk], device=self.device),
                label_ids=label_ids,
                out=out,
            )
        return tokens

    def _cached_heads_kv(
        self, leads: list[list[int]], salt: str
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, int]:
        """Right-padded keys and values [K, heads, W, head_dim] per layer of the text heads `leads`, the missing
        ones run (and kept) and the others taken from the cache; their mask, lengths and the positions run."""
        assert self.prefix_cache is not None
        found: list[LayerKV | None] = [self.prefix_cache.get(salt, tuple(lead)) for lead in leads]
        # A head sent twice in one request runs once.
        missing = list(dict.fromkeys(tuple(leads[k]) for k, entry in enumerate(found) if entry is None))
        if missing:
            prefix, prefix_len = self._padded_ids([list(ids) for ids in missing])
            batch_kv, _ = self._prefix_kv(prefix, prefix_len)
            computed = {}
            for j, ids in enumerate(missing):
                n = len(ids)
                computed[ids] = [(keys[j, :, :n].clone(), values[j, :, :n].clone()) for keys, values in batch_kv]
                self.prefix_cache.put(salt, ids, computed[ids])
            found = [entry if entry is not None else computed[tuple(lead)] for entry, lead in zip(found, leads)]
        entries = [e for e in found if e is not None]
        lengths = torch.tensor([len(lead) for lead in leads], device=self.device)
        width = int(lengths.max())
        kv = []
        for layer in range(len(entries[0])):
            keys0, values0 = entries[0][layer]
            keys = keys0.new_zeros((len(entries), keys0.shape[0], width, keys0.shape[2]))
            values = values0.new_zeros((len(entries), values0.shape[0], width, values0.shape[2]))
            for k, entry in enumerate(entries):
                n = entry[layer][0].shape[1]
                keys[k, :, :n] = entry[layer][0]
                values[k, :, :n] = entry[layer][1]
            kv.append((keys, values))
        mask = (torch.arange(width, device=self.device) < lengths[:, None]).long()
        return kv, mask, lengths, sum(len(ids) for ids in missing)

    def _lead_chunks(self, seqs: list[Sequence]):
        """Texts grouped so that one group's cached leads (keys and values of every layer) stay bounded."""
        order = sorted(range(len(seqs)), key=lambda n: len(seqs[n].lead))
        chunk: list[int] = []
        for n in order:
            if chunk and len(seqs[n].lead) * (len(chunk) + 1) > self.max_batch_tokens:
                yield chunk
                chunk = []
            chunk.append(n)
        if chunk:
            yield chunk

    def _prefix_kv(
        self, prefix: torch.Tensor, prefix_len: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Keys and values per layer [K, heads, W, head_dim] of K right-padded prefixes, and their mask."""
        prefix_mask = (torch.arange(prefix.shape[1], device=self.device) < prefix_len[:, None]).long()
        parts = []
        for lo, hi in self._micro_batches([prefix.shape[1]] * len(prefix)):
            result = self.body(inputs_embeds=prefix[lo:hi], attention_mask=prefix_mask[lo:hi], use_cache=True)
            cache = getattr(result, self._cache_arg)
            parts.append([(layer.keys, layer.values) for layer in cache.layers])
        kv = [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]
        return kv, prefix_mask

    def _continue_from(
        self,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_mask: torch.Tensor,
        prefix_len: torch.Tensor,
        cells: np.ndarray,
        *,
        cache_rows: np.ndarray,
        cont_rows: np.ndarray,
        continuation,
        cont_len: np.ndarray,
        slots: torch.Tensor,
        label_ids: torch.Tensor,
        out: np.ndarray,
    ) -> int:
        """Each cell's continuation from its prefix's cached keys/values (`kv`, right-padded, `prefix_mask`).

        `cells` [B, 2] are the (candidate, text) entries of `out`; `cache_rows` [B] the prefix each one continues;
        `continuation(p_idx, cont_idx, width)` its embeddings [b, width, D], `cont_len` [B] their lengths and
        `slots[cont_idx]` the continuation position read out. Padded prefix positions are masked out, and
        positions continue from each prefix's own length, so a cell computes what its whole sequence would.
        Continuations are batched in length order under the token budget, cached positions included.
        """
        from transformers import DynamicCache

        width_prefix = prefix_mask.shape[1]
        tokens = 0
        order = np.argsort(cont_len, kind="stable")
        # The cached positions count in full: each item gathers its prefix's keys and values for every layer.
        cost = (cont_len[order] + width_prefix).tolist()
        for lo, hi in self._micro_batches(cost):
            sel = order[lo:hi]
            c_idx = torch.from_numpy(cache_rows[sel]).to(self.device)
            r_idx = torch.from_numpy(cont_rows[sel]).to(self.device)
            p_idx = torch.from_numpy(cells[sel, 0]).to(self.device)
            lens = torch.from_numpy(cont_len[sel]).to(self.device)
            width = int(lens.max())
            mask = torch.cat(
                [prefix_mask[c_idx], (torch.arange(width, device=self.device) < lens[:, None]).long()], dim=1
            )
            positions = prefix_len[c_idx][:, None] + torch.arange(width, device=self.device)
            cache = DynamicCache(ddp_cache_data=[(k[c_idx], v[c_idx]) for k, v in kv], config=self.model.config)
            hidden = self.body(
                inputs_embeds=continuation(p_idx, r_idx, width),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: cache},
            ).last_hidden_state
            picked = hidden[torch.arange(len(sel), device=self.device), slots[r_idx]]
            out[cells[sel, 0], cells[sel, 1]] = self._label_logits(picked, label_ids).float().cpu().numpy()
            tokens += int(lens.sum())
        return tokens

    def _label_logits(self, picked: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal" and isinstance(self.head, torch.nn.Linear):
            # Only the C label rows of the output matrix: the full-vocabulary product is never needed.
            bias = self.head.bias[label_ids] if self.head.bias is not None else None
            return torch.nn.functional.linear(picked, self.head.weight[label_ids], bias)
        return self.head(picked)[:, label_ids]

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
