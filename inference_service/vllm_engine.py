"""vLLM engine for causal LMs: soft prompts enter as prompt embeddings, the whole population batched by vLLM.

Pinned to vllm==0.26.0, the newest release built on torch 2.11. Each sequence asks for one greedy token and
the logits of exactly the C label words through `SamplingParams.logprob_token_ids` (no vocabulary-wide mask);
with `logprobs_mode="processed_logits"` and greedy sampling those values are the model's raw logits. A task
with more label words than vLLM gathers that way falls back to masking with `allowed_token_ids` and asking
for the top C, which the mask makes exactly the label words. docs/vllm.md gives the reasoning.

vllm is imported inside the class, so importing this module never needs it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .embeddings import embedding_weight
from .engine import ScoreBatch, ScoreResult
from .engine_base import EngineBase, model_kind, resolve_dtype
from .layout import sequence
from .limits import Limits

log = logging.getLogger(__name__)

VLLM_VERSION = "0.26.0"
# vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS in 0.26.0; more label words take the masked path.
_MAX_LOGPROB_TOKEN_IDS = 128

# Every queued request's embeddings live in host memory until the call returns, so a large population is
# sent in several generate calls of at most this many bytes of embeddings. Even for a 7B model a call holds
# thousands of sequences, more than one scheduler step runs.
_MAX_CALL_BYTES = 2 * 2**30


def _check_config(model_path: str, config) -> None:
    """RuntimeError for a model this engine cannot serve; a warning for a config this transformers misreads."""
    import transformers
    from packaging.version import Version

    written = getattr(config, "transformers_version", None)
    if written and Version(written).major > Version(transformers.__version__).major:
        # An older transformers reads fields renamed since as absent and falls back to defaults without a
        # word: SmolLM2's rope_parameters.rope_theta 100000 becomes 4.x's 10000.
        log.warning(
            "%s was saved by transformers %s but %s is installed: fields it does not know are silently "
            "defaulted; re-create the directory with this transformers (re-saving a loaded copy keeps the "
            "wrong defaults)",
            model_path,
            written,
            transformers.__version__,
        )
    if model_kind(config) != "causal":
        raise RuntimeError(f"{model_path} is a masked LM; the vllm engine serves causal LMs only (--engine torch)")


class VllmEngine(EngineBase):
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        limits: Limits | None = None,
        display_name: str | None = None,
        gpu_memory_utilization: float = 0.85,
        prompt_anchor: str = "none",
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool = False,
    ):
        import os

        # The engine core in this process: embeddings are handed over by reference, not serialised to a
        # second process (which also doubled their host memory). Read when the LLM is built, not at import.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(
                f"the vllm engine needs vllm=={VLLM_VERSION} on a CUDA host (pip install 'fedbpt[service,vllm]')"
            ) from e
        from transformers import AutoConfig

        self.limits = limits or Limits()
        config = AutoConfig.from_pretrained(model_path)
        _check_config(model_path, config)
        # Resolved as the torch engine resolves it on a GPU, so both engines run the same precision.
        self.dtype = resolve_dtype(dtype, torch.device("cuda"))
        self._load_tokenizer(model_path, "causal", prompt_anchor)
        t0 = time.perf_counter()
        self.embed = _input_embeddings(model_path, config, self.dtype)
        weight = embedding_weight(self.embed).detach()
        width = getattr(config, "hidden_size", weight.shape[1])
        if weight.shape[1] != width:
            # vLLM's prompt_embeds buffer is hidden_size wide; a projected embedding (OPT-350m) cannot enter it.
            raise RuntimeError(f"{model_path}: input embeddings are {weight.shape[1]} wide but hidden_size is {width}")
        max_len = (
            len(self.layout.prefix_ids)
            + len(self.layout.anchor_ids)
            + self.limits.max_prompt_length
            + self.limits.max_text_tokens
            + 1
        )
        step_tokens = max(max_num_batched_tokens or self.limits.max_batch_tokens or 65536, max_len)
        self.llm = LLM(
            model=str(model_path),
            dtype=str(self.dtype).removeprefix("torch."),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_len,
            enable_prompt_embeds=True,
            # Blocks of [prefix + soft prompt] shared by a candidate's N texts are computed once where a
            # population spans several scheduler steps; embedding prompts are hashed by content since 0.22.
            enable_prefix_caching=True,
            logprobs_mode="processed_logits",
            # The masked path asks for the top C; the default cap of 20 would refuse a 21-class task.
            max_logprobs=-1,
            # Every request is one prefill and one sampled token: the step's token budget, not decode
            # latency, sets throughput (the default 16384 splits a P = 64, N = 128 population into ~50 steps).
            # It is also what bounds activation memory, as max_batch_tokens does on the torch engine: the
            # float32 path (FlexAttention) asked for 42 GiB at 65536 tokens a step on a tiny model.
            max_num_batched_tokens=step_tokens,
            max_num_seqs=min(1024, step_tokens),
            # CUDA graphs replay decode steps, and this workload never decodes: capturing them only costs
            # start-up time and memory.
            compilation_config={"cudagraph_mode": "NONE"},
            enforce_eager=enforce_eager,
        )
        log.info("loaded %s into vllm (%s) in %.1fs", model_path, self.dtype, time.perf_counter() - t0)
        self.info = self._facts(model_path, display_name)
        # LLM.generate is not re-entrant: concurrent requests would interleave inside one engine loop.
        self._lock = threading.Lock()

    def score(self, batch: ScoreBatch) -> ScoreResult:
        from vllm import SamplingParams

        texts = self.tokenize(batch.texts)
        label_ids = self.label_token_ids(batch.label_words)
        n_pop, n_prompt, dim = batch.prompts.shape
        params = _sampling_params(SamplingParams, label_ids)
        out = np.empty((n_pop, len(texts), len(label_ids)), dtype=np.float32)
        # vLLM sends each embedding tensor through .numpy(), which refuses a tensor that requires grad.
        with self._lock, torch.no_grad():
            t0 = time.perf_counter()
            prompts = torch.from_numpy(batch.prompts).to(self.dtype)
            seqs_ids = [sequence(self.layout, t, n_prompt) for t in texts]
            lengths = [len(s.lead) + n_prompt + len(s.tail) for s in seqs_ids]
            for chunk in self._chunks(lengths, n_pop * dim * prompts.element_size()):
                seqs: list[dict[str, torch.Tensor]] = []
                for n in chunk:
                    # All P sequences of a text in one block; each row is a contiguous view vLLM sends as is.
                    lead, tail = seqs_ids[n].lead, seqs_ids[n].tail
                    block = torch.empty(n_pop, lengths[n], dim, dtype=self.dtype)
                    block[:, : len(lead)] = self._embed_ids(lead)
                    block[:, len(lead) : len(lead) + n_prompt] = prompts
                    block[:, len(lead) + n_prompt :] = self._embed_ids(tail)
                    seqs.extend({"prompt_embeds": block[p]} for p in range(n_pop))
                results = self.llm.generate(seqs, params, use_tqdm=False)
                for i, result in enumerate(results):
                    out[i % n_pop, chunk[i // n_pop]] = _label_values(result, label_ids)
            ms = (time.perf_counter() - t0) * 1e3
        return ScoreResult(logits=out, sequences=n_pop * len(texts), tokens=n_pop * sum(lengths), engine_ms=ms)

    @staticmethod
    def _chunks(lengths: list[int], bytes_per_token: int) -> list[list[int]]:
        """Text indices grouped so that each group's embeddings stay under _MAX_CALL_BYTES."""
        chunks: list[list[int]] = [[]]
        size = 0
        for n, length in enumerate(lengths):
            need = length * bytes_per_token
            if chunks[-1] and size + need > _MAX_CALL_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(n)
            size += need
        return chunks


def _sampling_params(cls, label_ids: list[int]):
    """One greedy token with the label words' logits: gathered by id, or for very many labels through a mask.

    Greedy keeps the sampler on its all-greedy path, where processed logits have no temperature applied. On
    the masked path the mask leaves exactly the C label words finite, so the top C are all of them whatever
    their rank in the full vocabulary.
    """
    if len(label_ids) <= _MAX_LOGPROB_TOKEN_IDS:
        return cls(max_tokens=1, temperature=0.0, logprob_token_ids=list(label_ids), detokenize=False)
    return cls(
        max_tokens=1, temperature=0.0, logprobs=len(label_ids), allowed_token_ids=list(label_ids), detokenize=False
    )


def _label_values(result, label_ids: list[int]) -> list[float]:
    values = result.outputs[0].logprobs[0]
    missing = [t for t in label_ids if t not in values]
    if missing:
        raise RuntimeError(f"vllm returned no logit for label token ids {missing}; got {sorted(values)}")
    return [values[t].logprob for t in label_ids]


def _input_embeddings(model_path: str, config, dtype):
    """The HF model's input embedding module on CPU, as the torch engine would apply it.

    A plain embedding is read straight from the safetensors checkpoint, so the full model is never loaded
    beside vLLM's copy. An embedding subclass (Gemma 3 scales its output) or a .bin checkpoint needs the
    real module: the model is then loaded once on CPU and all but its embedding dropped.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    module = skeleton.get_input_embeddings()
    if type(module) is torch.nn.Embedding:
        name = next(n for n, m in skeleton.named_modules() if m is module)
        weight = _checkpoint_tensor(model_path, f"{name}.weight")
        if weight is not None:
            return torch.nn.Embedding.from_pretrained(weight.to(dtype), freeze=True)
    log.info("%s: loading the model on CPU once to take its input embeddings", model_path)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).get_input_embeddings()


def _checkpoint_tensor(model_path: str, name: str):
    """One tensor of a safetensors checkpoint (local directory or hub id), or None where there is none.

    Checkpoints may store keys without the base-model prefix (GPT-2's `wte.weight` for
    `transformer.wte.weight`), so a key matches the name exactly or as its dotted suffix.
    """
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        return cached_file(model_path, filename, _raise_exceptions_for_missing_entries=False)

    index = fetch("model.safetensors.index.json")
    if index:
        shard_of = json.loads(Path(index).read_text())["weight_map"]
    else:
        single = fetch("model.safetensors")
        if not single:
            return None
        with safe_open(single, "pt") as f:
            shard_of = dict.fromkeys(f.keys(), "model.safetensors")
    matches = [k for k in shard_of if k == name or name.endswith("." + k)]
    if not matches:
        return None
    key = max(matches, key=len)
    with safe_open(fetch(shard_of[key]), "pt") as f:
        return f.get_tensor(key)
