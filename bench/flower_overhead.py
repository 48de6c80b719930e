"""Native aggregator vs FedBPT on Flower's deployment engine, side by side in one run on one inference service.

    python -m bench.flower_overhead [--rounds 3] [--clients 3] [--dim 500]

Both engines run the same run (seeds, data, strategy) against the same service, one after the other. Every byte
between the clients and their server goes through a counting TCP relay (fedbpt.flower_loopback.ByteCounter):
HTTP framing included, whole run (registration, polling, heartbeats, Flower's app download) divided by
rounds x clients. A round's time is from its tasks going out to its merge, as each server recorded it. Both links
are plain HTTP here so that the bytes compare like for like (TLS adds the same handshake to either).
Prints a Markdown table (bench/RESULTS.md keeps one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from fed_clients.data import client_shard, load_splits
from fed_clients.tasks import get_task
from fedbpt.flower_loopback import run_deployment, run_native
from fedbpt.loopback import serve_app
from fedbpt_assets import ensure_model
from fedbpt_flower.settings import run_config_from
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.torch_engine import TorchEngine

BATCH = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--dim", type=int, default=500, help="intrinsic dimension d: the mean on the wire is d floats")
    args = ap.parse_args()
    run = {
        "run-id": "bench-flower",
        "strategy": "fedbpt",
        "rounds": args.rounds,
        "intrinsic-dim": args.dim,
        "prompt-length": 2,
        "local-popsize": 4,
        "local-iterations": 2,
        "min-clients": args.clients,
        "round-timeout-s": 600.0,
        "per-class": 6,
        "alpha": 0.5,
        "batch-size": BATCH,
    }
    task = get_task("rotten_tomatoes")
    train = load_splits("default", task)["train"]
    shards = [client_shard(train, k, args.clients, alpha=0.5, seed=0, per_class=6) for k in range(args.clients)]
    os.environ["FEDBPT_API_KEY"] = "bench-key"  # the ClientApps' service key, as a SuperNode host would set it
    engine = TorchEngine(str(ensure_model()), dtype="float32")
    with serve_app(create_app(engine, KeyStore({"bench-key": None}))) as service, tempfile.TemporaryDirectory() as tmp:
        native = run_native(
            Path(tmp) / "native", service, "bench-key", run_config_from(run), shards, task, BATCH, count_bytes=True
        )
        nodes = [{"partition-id": k, "num-partitions": args.clients, "service": service} for k in range(args.clients)]
        flower = run_deployment(Path(tmp) / "flower", run, nodes, secure=False, count_bytes=True)
    same = all(
        np.asarray(h["mean"], np.float32).tobytes() == np.asarray(m, np.float32).tobytes()
        for h, m in zip(flower.report["history"], native.means)
    )
    client_rounds = args.rounds * args.clients
    native_round = statistics.mean(r["closed_at"] - r["opened_at"] for r in native.status["history"])
    flower_round = statistics.mean(h["closed_at"] - h["opened_at"] for h in flower.report["history"])
    rows = [
        ("bytes up per client-round", native.link_bytes_up / client_rounds, flower.link_bytes_up / client_rounds),
        ("bytes down per client-round", native.link_bytes_down / client_rounds, flower.link_bytes_down / client_rounds),
        ("seconds per round (tasks out -> merge)", native_round, flower_round),
        ("seconds, whole run (first request -> end)", native.wall_s, flower.wall_s),
    ]
    print(f"{args.clients} clients x {args.rounds} rounds, d = {args.dim}; global means bit-identical: {same}\n")
    print("| measure | native aggregator | Flower deployment | Flower / native |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        fmt = "{:,.0f}" if "bytes" in name else "{:.2f}"
        print(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |")
    print(f"\nper-round overhead of Flower: {flower_round - native_round:+.2f} s")


if __name__ == "__main__":
    main()
