"""Engine throughput: sequences/s and tokens/s against population size P and texts per call N.

    python bench/engine_throughput.py [--engine torch|vllm] [--dtype bfloat16] [--device cuda]
        [--populations 5,20,64] [--texts 8,32,128] [--batch-tokens 8192,32768] [--peak-tflops 989]

Model FLOPs utilisation = 2 x non-embedding params x tokens / time / peak (the forward's matmul work;
attention's own FLOPs are left out, small at these lengths). Without --peak-tflops, MFU is not printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fed_clients.data import load_splits  # noqa: E402
from fed_clients.tasks import get_task  # noqa: E402
from fedbpt.assets import ensure_model  # noqa: E402
from inference_service.engine import ScoreBatch  # noqa: E402
from inference_service.limits import Limits  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--populations", type=ints, default=[5, 20])
    parser.add_argument("--texts", type=ints, default=[8, 32])
    parser.add_argument("--batch-tokens", type=ints, default=[8192])
    parser.add_argument("--prompt-length", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for this dtype")
    args = parser.parse_args()

    model = args.model or str(ensure_model())
    task = get_task("rotten_tomatoes")
    examples = load_splits("default", task)["validation"]
    print(f"engine {args.engine}, {args.dtype}, L = {args.prompt_length}, model {model}")
    print(f"{'batch_tok':>9} {'P':>4} {'N':>5} {'seqs':>6} {'seq/s':>9} {'tok/s':>10} {'ms/call':>9}"
          + (f" {'MFU':>7}" if args.peak_tflops else ""))
    for budget in args.batch_tokens:
        limits = Limits(max_batch_tokens=budget, max_population=max(args.populations),
                        max_texts=max(args.texts), max_prompt_length=args.prompt_length)
        if args.engine == "vllm":
            from inference_service.vllm_engine import VllmEngine

            engine = VllmEngine(model, dtype=args.dtype, limits=limits)
            params = None
        else:
            from inference_service.torch_engine import TorchEngine

            engine = TorchEngine(model, dtype=args.dtype, device=args.device, limits=limits)
            params = sum(p.numel() for p in engine.body.parameters()) - engine.embed.weight.numel()
        rng = np.random.default_rng(0)
        for n_pop in args.populations:
            for n_texts in args.texts:
                texts = [task.render(ex.fields, engine.info.kind) for ex in examples[:n_texts]]
                prompts = (rng.standard_normal((n_pop, args.prompt_length, engine.info.hidden_size))
                           * engine.info.embedding_std).astype(np.float32)
                batch = ScoreBatch(prompts, texts, list(task.label_words))
                result = engine.score(batch)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    engine.score(batch)
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times)
                line = (f"{budget:>9} {n_pop:>4} {n_texts:>5} {result.sequences:>6} {result.sequences / t:>9.1f} "
                        f"{result.tokens / t:>10.0f} {t * 1e3:>9.1f}")
                if args.peak_tflops and params:
                    line += f" {2 * params * result.tokens / t / (args.peak_tflops * 1e12):>7.2%}"
                print(line, flush=True)
        del engine


if __name__ == "__main__":
    main()
