"""Load: 50 concurrent clients of small score requests against the service on loopback.

Run with `pytest -m slow -s tests/service/test_load.py` to see throughput and latency; only errors and memory
growth are asserted, never timings.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedbpt.loopback import serve_app
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.limits import Limits
from inference_service.torch_engine import TorchEngine

from .test_service import body

CLIENTS = 50
KEYS = [f"load-key-{i}" for i in range(10)]  # five clients per key, so fair turns and per-key queues both work
WARMUP_S, RUN_S = 5.0, 30.0
MAX_RSS_GROWTH_MB = 100
STATUS = Path("/proc/self/status")


def rss_mb() -> float:
    """The resident set of this process, which hosts the server (and the clients)."""
    line = next(line for line in STATUS.read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not STATUS.exists(), reason="reads VmRSS from /proc")
def test_fifty_clients_for_thirty_seconds(tiny_roberta_dir):
    limits = Limits(max_prompt_length=16, max_population=8, max_texts=16, max_text_tokens=64)
    engine = TorchEngine(str(tiny_roberta_dir), dtype="float32", limits=limits)
    payload = body(
        np.random.default_rng(0).standard_normal((2, 4, 48)).astype(np.float32) * 0.02,
        ["it was {mask} .", "a great film . {mask}"],
        [" bad", " great"],
        [0, 1],
    )
    phase = {"measuring": False, "stop": False}
    lock = threading.Lock()
    latencies: list[float] = []
    sequences = [0]
    per_key = dict.fromkeys(KEYS, 0)
    errors: list[str] = []

    def client(i: int, url: str) -> None:
        key = KEYS[i % len(KEYS)]
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
            while not phase["stop"]:
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/score", json=payload)
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                elif phase["measuring"]:
                    with lock:
                        latencies.append(elapsed)
                        sequences[0] += r.json()["usage"]["sequences"]
                        per_key[key] += 1

    keys = KeyStore(dict.fromkeys(KEYS))
    with serve_app(create_app(engine, keys, limits)) as url:
        threads = [threading.Thread(target=client, args=(i, url), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(WARMUP_S)  # thread stacks, connection pools and allocator arenas settle first
        rss_start = rss_mb()
        phase["measuring"] = True
        t0 = time.perf_counter()
        time.sleep(RUN_S)
        phase["measuring"] = False
        duration = time.perf_counter() - t0
        rss_end = rss_mb()
        phase["stop"] = True
        for t in threads:
            t.join(timeout=60)
        metrics = httpx.get(f"{url}/metrics").text

    lat = np.sort(np.asarray(latencies)) * 1e3
    print(
        f"\n{CLIENTS} clients, {len(KEYS)} keys, {duration:.1f}s measured: {len(lat)} requests, "
        f"{sequences[0] / duration:.1f} sequences/s, {len(lat) / duration:.1f} requests/s, "
        f"latency p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms, max {lat[-1]:.0f} ms; "
        f"requests per key {min(per_key.values())}..{max(per_key.values())}; "
        f"RSS {rss_start:.0f} -> {rss_end:.0f} MB"
    )
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    assert not any(t.is_alive() for t in threads)
    assert len(lat) > 0 and min(per_key.values()) > 0
    assert rss_end - rss_start < MAX_RSS_GROWTH_MB, f"RSS grew {rss_end - rss_start:.0f} MB under steady load"
    assert 'status="500"' not in metrics and 'status="429"' not in metrics
