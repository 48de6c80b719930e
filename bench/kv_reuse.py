"""Scoring a population with and without key/value reuse of the shared prefix, side by side in one process.

The same engine, batch and prompts; only `engine.kv_reuse` differs. Each configuration is timed
`--repeats` times, alternating the two paths so that drift on a shared machine hits both alike, and the
best of each is compared. The logits must agree (the largest difference is printed). Example:

    python -m bench.kv_reuse --population 10 --texts 32 --prompt-length 5
"""

from __future__ import annotations

import argparse
import csv
import time

import numpy as np

from bench.jsonl import append, emit


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model name or directory")
    ap.add_argument(
        "--random-model",
        choices=["same", "1b"],
        default=None,
        help="random weights: --model's own shape ('same') or a ~1B Llama, with --model's tokenizer (speed only)",
    )
    ap.add_argument("--work", default="/tmp/fedbpt-bench-models")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--population", type=int, default=10)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--prompt-length", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", default=None, help="append the rows as JSON lines here")
    args = ap.parse_args(argv)

    import torch

    from fedbpt_assets import ensure_data
    from inference_service.engine import ScoreBatch
    from inference_service.server import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if args.random_model:
        from pathlib import Path

        from bench.engine_throughput import random_model
        from fedbpt_assets import model_dir

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # A directory holding only the config and tokenizer will do: that is all a host without the weights gets.
        source = Path(args.model) if Path(args.model).is_dir() else model_dir(name=args.model)
        model = str(
            random_model(args.random_model, str(source), Path(args.work) / f"{source.name}-{args.random_model}", device)
        )
    engine = build_engine(model, dtype=args.dtype, device=args.device)
    with open(ensure_data() / "train.csv", newline="", encoding="utf-8") as f:
        reviews = [row["text"] for row, _ in zip(csv.DictReader(f), range(args.texts))]
    placements = {
        "ahead": [f"Review: {r}\nSentiment:{{mask}}" for r in reviews],
        "after-text": [f"Review: {r}{{prompt}}\nSentiment:{{mask}}" for r in reviews],
    }
    rows = []
    rng = np.random.default_rng(0)
    for length in args.prompt_length:
        prompts = (
            rng.standard_normal((args.population, length, engine.info.hidden_size)) * engine.info.embedding_std
        ).astype(np.float32)
        for placement, texts in placements.items():
            batch = ScoreBatch(prompts, texts, [" negative", " positive"])
            times: dict[bool, list[float]] = {False: [], True: []}
            results = {}
            for _ in range(args.repeats):
                for reuse in (False, True):
                    engine.kv_reuse = reuse
                    t0 = time.perf_counter()
                    results[reuse] = engine.score(batch)
                    times[reuse].append(time.perf_counter() - t0)
            whole, reused = min(times[False]), min(times[True])
            row = {
                "model": engine.info.name,
                "dtype": engine.info.dtype,
                "device": str(engine.device),
                "placement": placement,
                "prompt_length": length,
                "population": args.population,
                "texts": len(texts),
                "whole_s": round(whole, 3),
                "reuse_s": round(reused, 3),
                "speedup": round(whole / reused, 2),
                "tokens_whole": results[False].tokens,
                "tokens_reuse": results[True].tokens,
                "max_abs_logit_diff": float(np.abs(results[True].logits - results[False].logits).max()),
            }
            emit(rows, row)
    append(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
