"""Engine throughput side by side: the PyTorch and vLLM engines on one machine, one model, the same populations.

    python -m bench.engine_throughput [--engines torch,vllm] [--model DIR | --random-model 1b]
        [--dtype bfloat16] [--device cuda] [--populations 20,64] [--texts 32,128] [--prompt-lengths 5,50]
        [--batch-tokens 65536] [--peak-tflops 989] [--latency] [--out rows.jsonl]

For every engine (built in turn in this process, the first freed before the next) and every (L, P, N):
sequences/s, tokens/s and ms per call over the median of `--repeats` calls after a warm-up, and model FLOPs
utilisation = 2 x non-embedding params x tokens / time / peak (the forward's matmul work; attention's own
FLOPs are left out, small at these lengths; without --peak-tflops, MFU is not printed). All engines score
the very same prompts and texts; the largest logit difference against the first engine is printed, so a
fast engine that computes something else shows. `--latency` also serves each engine over HTTP on loopback
and times one request end to end (client send to response parsed) against the engine's own time.

`--random-model 1b` writes a ~1B-parameter Llama (SmolLM2's tokenizer and shape family, random bf16
weights) to show how MFU grows with model size: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from fed_clients.data import load_splits
from fed_clients.tasks import get_task
from inference_service.engine import ScoreBatch
from inference_service.limits import Limits

# "same": the tokenizer directory's own architecture with random weights (for a host the model files cannot reach);
# "1b": a Llama of SmolLM2's family at ~1B parameters (0.97B outside the embedding), SmolLM2's vocabulary.
RANDOM_MODELS: dict[str, dict[str, int]] = {
    "same": {},
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def random_model(size: str, tokenizer_dir: str, out: Path, device: str) -> Path:
    """A random-weight causal LM of `size` beside `tokenizer_dir`'s tokenizer, written once to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(tokenizer_dir)
    for key, value in RANDOM_MODELS[size].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    del model
    return out


def non_embedding_params(model: str) -> int:
    """Parameters outside the input embedding, counted on a meta-device skeleton (nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(p.numel() for p in skeleton.parameters()) - skeleton.get_input_embeddings().weight.numel()


def build(name: str, model: str, args, limits: Limits):
    if name == "vllm":
        from inference_service.vllm_engine import VllmEngine

        return VllmEngine(model, dtype=args.dtype, limits=limits, max_num_batched_tokens=max(args.batch_tokens))
    from inference_service.torch_engine import TorchEngine

    return TorchEngine(model, dtype=args.dtype, device=args.device, limits=limits)


def release(engine) -> None:
    import torch

    llm = getattr(engine, "llm", None)
    if llm is not None:
        # vLLM's in-process engine core holds the KV cache until it is shut down explicitly.
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def latency(engine, body: dict, repeats: int) -> tuple[float, float]:
    """Median seconds of one /v1/score request over HTTP on loopback, and the engine's own ms within it."""
    import httpx

    from fedbpt.loopback import serve_app
    from inference_service.app import create_app
    from inference_service.auth import KeyStore

    with serve_app(create_app(engine, KeyStore({}))) as url, httpx.Client(timeout=600) as http:
        http.post(f"{url}/v1/score", json=body).raise_for_status()
        times, engine_ms = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reply = http.post(f"{url}/v1/score", json=body)
            reply.raise_for_status()
            reply.json()
            times.append(time.perf_counter() - t0)
            engine_ms.append(float(reply.json()["usage"]["engine_ms"]))
    return statistics.median(times), statistics.median(engine_ms)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", "--engine", default="torch", help="comma-separated: torch, vllm")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument(
        "--random-model",
        choices=sorted(RANDOM_MODELS),
        default=None,
        help="a random-weight model of this size with --model's tokenizer, written under --work",
    )
    parser.add_argument("--work", default="/tmp/fedbpt-bench-models")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None, help="torch engine's device (default: cuda if present)")
    parser.add_argument("--populations", type=ints, default=[5, 20])
    parser.add_argument("--texts", type=ints, default=[8, 32])
    parser.add_argument("--prompt-lengths", "--prompt-length", type=ints, default=[50])
    parser.add_argument(
        "--batch-tokens",
        type=ints,
        default=[8192],
        help="torch: padded tokens per forward; vllm: tokens per scheduler step (largest used)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for this dtype")
    parser.add_argument("--latency", action="store_true", help="also time one HTTP request per engine")
    parser.add_argument("--out", default=None, help="append the rows as JSON lines here")
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - {"torch", "vllm"})
    if unknown:
        parser.error(f"--engines: unknown engine(s) {', '.join(unknown)}; choose from torch, vllm")

    from fedbpt_assets import ensure_model

    model = args.model or str(ensure_model())
    if args.random_model:
        device = args.device or ("cuda" if _has_cuda() else "cpu")
        model = str(random_model(args.random_model, model, Path(args.work) / f"llama-{args.random_model}", device))
    params = non_embedding_params(model)
    task = get_task("rotten_tomatoes")
    examples = load_splits("default", task)["validation"]
    words = list(task.label_words)
    limits = Limits(
        max_batch_tokens=max(args.batch_tokens),
        max_population=max(args.populations),
        max_texts=max(args.texts),
        max_prompt_length=max(args.prompt_lengths),
    )
    print(
        f"model {model} ({params / 1e6:.0f}M non-embedding params), {args.dtype}, engines {', '.join(engines)}",
        flush=True,
    )
    print(
        f"{'engine':>6} {'L':>3} {'P':>4} {'N':>5} {'seqs':>6} {'seq/s':>9} {'tok/s':>10} {'ms/call':>9} "
        f"{'max|dlogit|':>11}" + (f" {'MFU':>7}" if args.peak_tflops else ""),
        flush=True,
    )
    rows, first_logits = [], {}
    for name in engines:
        t0 = time.perf_counter()
        engine = build(name, model, args, limits)
        print(f"{name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        rng = np.random.default_rng(0)
        for n_prompt in args.prompt_lengths:
            for n_pop in args.populations:
                prompts = (
                    rng.standard_normal((n_pop, n_prompt, engine.info.hidden_size)) * engine.info.embedding_std
                ).astype(np.float32)
                for n_texts in args.texts:
                    texts = [task.render(ex.fields, engine.info.kind) for ex in examples[:n_texts]]
                    batch = ScoreBatch(prompts, texts, words)
                    result = engine.score(batch)
                    if not np.isfinite(result.logits).all():
                        raise SystemExit(f"{name}: non-finite logits at L={n_prompt} P={n_pop} N={n_texts}")
                    key = (n_prompt, n_pop, n_texts)
                    ref = first_logits.setdefault(key, result.logits)
                    diff = float(np.abs(result.logits - ref).max())
                    times = []
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        engine.score(batch)
                        times.append(time.perf_counter() - t)
                    t = statistics.median(times)
                    row = {
                        "engine": name,
                        "model": Path(model).name,
                        "params": params,
                        "dtype": args.dtype,
                        "L": n_prompt,
                        "P": n_pop,
                        "N": n_texts,
                        "sequences": result.sequences,
                        "tokens": result.tokens,
                        "seq_per_s": result.sequences / t,
                        "tok_per_s": result.tokens / t,
                        "ms_per_call": t * 1e3,
                        "max_abs_dlogit": diff,
                    }
                    line = (
                        f"{name:>6} {n_prompt:>3} {n_pop:>4} {n_texts:>5} {result.sequences:>6} "
                        f"{row['seq_per_s']:>9.1f} {row['tok_per_s']:>10.0f} {t * 1e3:>9.1f} {diff:>11.3g}"
                    )
                    if args.peak_tflops:
                        row["mfu"] = 2 * params * result.tokens / t / (args.peak_tflops * 1e12)
                        line += f" {row['mfu']:>7.2%}"
                    print(line, flush=True)
                    rows.append(row)
        if args.latency:
            from fedbpt_wire.tensors import encode_tensor

            n_prompt, n_pop, n_texts = min(args.prompt_lengths), min(args.populations), min(args.texts)
            prompts = (
                np.random.default_rng(1).standard_normal((n_pop, n_prompt, engine.info.hidden_size))
                * engine.info.embedding_std
            ).astype(np.float32)
            body = {
                "prompts": encode_tensor(prompts).model_dump(),
                "label_words": words,
                "texts": [task.render(ex.fields, engine.info.kind) for ex in examples[:n_texts]],
            }
            seconds, engine_ms = latency(engine, body, args.repeats)
            row = {
                "engine": name,
                "model": Path(model).name,
                "latency": True,
                "L": n_prompt,
                "P": n_pop,
                "N": n_texts,
                "request_ms": seconds * 1e3,
                "engine_ms": engine_ms,
            }
            print(
                f"{name}: one HTTP request L={n_prompt} P={n_pop} N={n_texts}: {seconds * 1e3:.1f} ms end to end, "
                f"{engine_ms:.1f} ms in the engine",
                flush=True,
            )
            rows.append(row)
        release(engine)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
