"""Text heads' keys and values kept across requests (torch engine, causal LM, the prompt after the text): the same
logits as the uncached path, fewer positions run, per-key separation, a byte bound, and /metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inference_service.engine import ScoreBatch
from inference_service.prefix_cache import PrefixCache, kv_bytes

from .test_engine_contract import LIMITS
from .test_prompt_layout import PIECES, WORDS, engine_for, llama_dir  # noqa: F401  (the fixture)

TEXTS = [f"{before}{{prompt}}{after}{{mask}}" for before, after in PIECES * 2]


def limits(**kw):
    return dataclasses.replace(LIMITS, **kw)


def prompts(seed: int, population: int = 4) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((population, 3, 64)) * 0.05).astype(np.float32)


def test_a_repeated_text_costs_only_the_prompt_and_the_cue(llama_dir):  # noqa: F811
    cached = engine_for(llama_dir)
    plain = engine_for(llama_dir, limits=limits(max_prefix_cache_bytes=0))
    assert cached.prefix_cache is not None and plain.prefix_cache is None
    first = cached.score(ScoreBatch(prompts(0), TEXTS, WORDS, cache_salt="k1"))
    reference = plain.score(ScoreBatch(prompts(0), TEXTS, WORDS))
    np.testing.assert_allclose(first.logits, reference.logits, rtol=1e-4, atol=1e-4 * np.abs(reference.logits).max())
    # PIECES twice: each distinct head ran once, in the first request.
    assert len(cached.prefix_cache) == len(PIECES) and cached.prefix_cache.misses == len(TEXTS)
    assert first.tokens < reference.tokens
    # A later request (another round's candidates) on the same texts: every head from the cache, same logits as the
    # uncached path, and only the prompts and cues run.
    again = cached.score(ScoreBatch(prompts(1), TEXTS, WORDS, cache_salt="k1"))
    fresh = plain.score(ScoreBatch(prompts(1), TEXTS, WORDS))
    np.testing.assert_allclose(again.logits, fresh.logits, rtol=1e-4, atol=1e-4 * np.abs(fresh.logits).max())
    heads = sum(len(s.lead) for s in (cached_seq(cached, t) for t in TEXTS))
    assert again.tokens == fresh.tokens - heads and cached.prefix_cache.hits == len(TEXTS)


def cached_seq(engine, text):
    from inference_service.layout import sequence

    return sequence(engine.layout, engine.tokenize([text])[0], 3)


def test_keys_do_not_share_cached_heads(llama_dir):  # noqa: F811
    engine = engine_for(llama_dir)
    engine.score(ScoreBatch(prompts(0), TEXTS, WORDS, cache_salt="k1"))
    other = engine.score(ScoreBatch(prompts(0), TEXTS, WORDS, cache_salt="k2"))
    assert engine.prefix_cache.hits == 0 and len(engine.prefix_cache) == 2 * len(PIECES)
    assert other.tokens == engine.score(ScoreBatch(prompts(0), TEXTS, WORDS, cache_salt="k3")).tokens


def test_the_cache_stays_within_its_bytes_evicting_least_recently_used():
    entry = [(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4))]  # 2 x 40 float32 = 320 bytes
    size = kv_bytes(entry)
    cache = PrefixCache(max_bytes=3 * size)
    for i in range(3):
        cache.put("", (i,), entry)
    assert cache.get("", (0,)) is not None  # 0 is now the most recently used
    cache.put("", (3,), entry)
    assert cache.get("", (1,)) is None and cache.get("", (0,)) is not None and cache.bytes == 3 * size
    assert cache.evictions == 1 and len(cache) == 3
    cache.put("", (9,), [(torch.zeros(2, 50, 4), torch.zeros(2, 50, 4))])  # larger than the whole cache: not kept
    assert cache.get("", (9,)) is None and cache.bytes == 3 * size
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1)


def test_the_service_salts_by_key_and_publishes_the_cache(llama_dir):  # noqa: F811
    import httpx

    from fedbpt.loopback import serve_app
    from fedbpt_wire.tensors import encode_tensor
    from inference_service.app import create_app
    from inference_service.auth import KeyStore

    engine = engine_for(llama_dir)
    with serve_app(create_app(engine, KeyStore({"alice": None, "bob": None}), LIMITS)) as url:

        def score(key: str, seed: int) -> dict:
            body = {"prompts": encode_tensor(prompts(seed)).model_dump(), "texts": TEXTS, "label_words": WORDS}
            r = httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["usage"]

        first, again, other = score("alice", 0), score("alice", 1), score("bob", 1)
        assert again["tokens"] < first["tokens"] and other["tokens"] == first["tokens"]
        text = httpx.get(f"{url}/metrics").text
    held = engine.prefix_cache.bytes
    assert held > 0 and f'fedbpt_prefix_cache{{what="bytes"}} {float(held)}' in text
    assert f'fedbpt_prefix_cache{{what="hits"}} {float(len(TEXTS))}' in text
    assert f'fedbpt_prefix_cache{{what="entries"}} {float(2 * len(PIECES))}' in text
