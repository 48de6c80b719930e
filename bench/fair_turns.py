"""Another key's small request while one key floods the service: its latency with turns cut to the engine's speed
(`--max-slice-seconds`) and without (turns of `max_batch_tokens` positions), side by side in one process.

Key "flood" keeps `--inflight` requests of P x N in flight; key "small" sends one-text requests one after another.
The same engine serves both configurations, one after the other, each for `--seconds`. Example:

    python -m bench.fair_turns --seconds 40
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from bench.jsonl import append, emit


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--inflight", type=int, default=2, help="the flooding key's requests in flight")
    ap.add_argument("--seconds", type=float, default=40.0, help="per configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import httpx

    from fedbpt.loopback import serve_app
    from fedbpt_wire.tensors import encode_tensor
    from inference_service.app import create_app
    from inference_service.auth import KeyStore
    from inference_service.limits import Limits
    from inference_service.server import build_engine

    engine = build_engine(args.model, dtype=args.dtype)
    rng = np.random.default_rng(0)
    hidden, std = engine.info.hidden_size, engine.info.embedding_std
    review = "Review: the battery lasts for days and the screen is bright and sharp{prompt}\nSentiment:{mask}"
    flood_body = {
        "prompts": encode_tensor(
            (rng.standard_normal((args.population, 5, hidden)) * std).astype(np.float32)
        ).model_dump(),
        "texts": [review] * args.texts,
        "label_words": [" terrible", " great"],
    }
    small_body = {**flood_body, "prompts": encode_tensor(np.zeros((1, 0, hidden), np.float32)).model_dump()}
    small_body["texts"] = ["Review: fine\nSentiment:{mask}"]
    rows = []
    for seconds in (0.0, Limits().max_slice_seconds):
        limits = Limits(max_slice_seconds=seconds, max_inflight_per_key=args.inflight)
        app = create_app(engine, KeyStore({"flood": None, "small": None}), limits)
        stop = threading.Event()
        with serve_app(app) as url:

            def flood(url=url, stop=stop):
                with httpx.Client(timeout=600) as http:
                    while not stop.is_set():
                        http.post(f"{url}/v1/score", json=flood_body, headers={"Authorization": "Bearer flood"})

            threads = [threading.Thread(target=flood, daemon=True) for _ in range(args.inflight)]
            for t in threads:
                t.start()
            time.sleep(2.0)  # the flood is under way (and the engine's speed measured)
            waits = []
            end = time.monotonic() + args.seconds
            with httpx.Client(timeout=600) as http:
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    r = http.post(f"{url}/v1/score", json=small_body, headers={"Authorization": "Bearer small"})
                    assert r.status_code == 200, r.text
                    waits.append(time.perf_counter() - t0)
            stop.set()
            for t in threads:
                t.join(600)
        row = {
            "model": engine.info.name,
            "dtype": engine.info.dtype,
            "max_slice_seconds": seconds,
            "flood": f"{args.inflight} x {args.population} x {args.texts}",
            "small_requests": len(waits),
            "small_median_s": round(statistics.median(waits), 3),
            "small_p90_s": round(sorted(waits)[int(0.9 * (len(waits) - 1))], 3),
        }
        emit(rows, row)
    append(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
