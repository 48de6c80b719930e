"""Service overhead: one population batch scored in-process, over HTTP, and as a raw model forward.

    python -m bench.service_overhead [--population 20] [--texts 32] [--prompt-length 10] [--repeats 3]

Prints sequences/s and tokens/s of each path and the ratios HTTP / in-process and in-process / raw
(the ceiling: the model's own forward over the same padded sequences), for float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import httpx
import numpy as np
import torch

from fed_clients.data import load_splits
from fed_clients.tasks import get_task
from fedbpt.loopback import serve_app
from fedbpt_assets import ensure_model
from fedbpt_wire.tensors import encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.engine import ScoreBatch
from inference_service.torch_engine import TorchEngine


def _post_ok(http: httpx.Client, url: str, body: dict) -> None:
    http.post(url, json=body).raise_for_status()


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_forward(engine: TorchEngine, batch: ScoreBatch) -> callable:
    """The same padded micro-batches the engine runs, as bare `model.base_model` calls on ready tensors."""
    texts = engine.tokenize(batch.texts)
    n_pop, n_prompt, dim = batch.prompts.shape
    lengths = [len(engine.layout.prefix_ids) + n_prompt + len(t.ids) + len(engine.layout.suffix_ids) for t in texts]
    sorted_lengths = sorted(lengths[n] for n in range(len(texts)) for _ in range(n_pop))
    inputs = []
    for lo, hi in engine._micro_batches(sorted_lengths):
        width = sorted_lengths[hi - 1]
        x = torch.randn(hi - lo, width, dim).to(engine.device, engine.dtype) * 0.1
        mask = (torch.arange(width) < torch.tensor(sorted_lengths[lo:hi])[:, None]).long().to(engine.device)
        inputs.append((x, mask))

    def run():
        with torch.inference_mode():
            for x, mask in inputs:
                engine.body(inputs_embeds=x, attention_mask=mask)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    task = get_task("rotten_tomatoes")
    examples = load_splits("default", task)["validation"][: args.texts]
    texts = [task.render(ex.fields, "causal") for ex in examples]
    model_dir = ensure_model()
    print(f"P = {args.population}, N = {args.texts}, L = {args.prompt_length}, {torch.get_num_threads()} threads")
    print(f"{'dtype':<9} {'path':<11} {'seq/s':>8} {'tok/s':>9} {'ratio':>26}")
    for dtype in args.dtypes.split(","):
        engine = TorchEngine(str(model_dir), dtype=dtype)
        prompts = np.random.default_rng(0).standard_normal((args.population, args.prompt_length, 576)) * 0.1
        prompts = prompts.astype(np.float32)
        batch = ScoreBatch(prompts, texts, list(task.label_words))
        warm = engine.score(batch)
        seqs, tokens = warm.sequences, warm.tokens
        t_engine = best_of(args.repeats, functools.partial(engine.score, batch))
        t_raw = best_of(args.repeats, raw_forward(engine, batch))
        body = {"prompts": encode_tensor(prompts).model_dump(), "texts": texts, "label_words": list(task.label_words)}
        with serve_app(create_app(engine, KeyStore({}))) as url, httpx.Client(timeout=600) as http:
            post = functools.partial(_post_ok, http, f"{url}/v1/score", body)
            post()
            t_http = best_of(args.repeats, post)
        for path, t, ratio in (
            ("raw", t_raw, ""),
            ("in-process", t_engine, f"in-process/raw {t_raw / t_engine:.3f}"),
            ("http", t_http, f"http/in-process {t_engine / t_http:.3f}"),
        ):
            print(f"{dtype:<9} {path:<11} {seqs / t:8.1f} {tokens / t:9.1f} {ratio:>26}")


if __name__ == "__main__":
    main()
