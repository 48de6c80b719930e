"""A client's local search with and without the prefix cache, side by side in one process, per dtype.

The demo's setting: the prompt after the text (L = 5), a population of 8 candidates scored on a batch of 16 of the
client's texts per request, batches drawn from the same pool of `--pool` texts request after request, as a client's
local iterations and rounds draw them. One engine per dtype, the same requests in the same order; the cache is
switched on and off between requests of alternating repeats, so that drift on a shared machine hits both alike.
Sequences/s are over all requests of a repeat (the cache starts empty in each, so its first misses are counted).
The logits of every request must agree (the largest difference is printed). Example:

    python -m bench.prefix_cache --dtype float32 bfloat16 --requests 24 --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import time

import numpy as np

from bench.jsonl import append, emit


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pool", type=int, default=15, help="texts a client holds (the CPU demo: 15 per client)")
    ap.add_argument("--prompt-length", type=int, default=5)
    ap.add_argument("--requests", type=int, default=24, help="score requests per repeat (3 rounds of 8 iterations)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="append the rows as JSON lines here")
    args = ap.parse_args(argv)

    import torch

    from fedbpt_assets import ensure_data
    from inference_service.engine import ScoreBatch
    from inference_service.prefix_cache import PrefixCache
    from inference_service.server import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    with open(ensure_data(name="amazon_snippets") / "train.csv", newline="", encoding="utf-8") as f:
        reviews = [row["text"] for row, _ in zip(csv.DictReader(f), range(args.pool))]
    texts = [f"Review: {r}{{prompt}}\nSentiment:{{mask}}" for r in reviews]
    rows = []
    for dtype in args.dtype:
        engine = build_engine(args.model, dtype=dtype, device=args.device)
        rng = np.random.default_rng(0)  # the same requests for every dtype
        batches = []
        for _ in range(args.requests):
            picked = np.sort(rng.choice(len(texts), min(args.batch, len(texts)), replace=False))
            shape = (args.population, args.prompt_length, engine.info.hidden_size)
            prompts = (rng.standard_normal(shape) * engine.info.embedding_std).astype(np.float32)
            batches.append(ScoreBatch(prompts, [texts[i] for i in picked], [" terrible", " great"]))
        cache = engine.prefix_cache or PrefixCache(2**28)
        times: dict[bool, list[float]] = {False: [], True: []}
        logits: dict[bool, list[np.ndarray]] = {}
        tokens: dict[bool, int] = {}
        for _ in range(args.repeats):
            for cached in (False, True):
                cache.clear()
                engine.prefix_cache = cache if cached else None
                t0 = time.perf_counter()
                results = [engine.score(b) for b in batches]
                times[cached].append(time.perf_counter() - t0)
                logits[cached] = [r.logits for r in results]
                tokens[cached] = sum(r.tokens for r in results)
        sequences = sum(b.prompts.shape[0] * len(b.texts) for b in batches)
        plain, fast = min(times[False]), min(times[True])
        row = {
            "model": engine.info.name,
            "dtype": engine.info.dtype,
            "device": str(engine.device),
            "threads": torch.get_num_threads(),
            "population": args.population,
            "batch": args.batch,
            "pool": len(texts),
            "prompt_length": args.prompt_length,
            "requests": len(batches),
            "sequences_per_s_uncached": round(sequences / plain, 1),
            "sequences_per_s_cached": round(sequences / fast, 1),
            "speedup": round(plain / fast, 2),
            "tokens_uncached": tokens[False],
            "tokens_cached": tokens[True],
            "cache_bytes": cache.bytes,
            "max_abs_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(logits[True], logits[False]))),
        }
        emit(rows, row)
    append(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
