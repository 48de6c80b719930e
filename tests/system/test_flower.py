"""FedBPT as a Flower app (fedbpt_flower): Flower's simulation engine and its deployment engine (SuperLink, three
SuperNodes, TLS and registered SuperNode keys) against a real inference service on the embedded model, and the
deployment run's global means against the native aggregator's on the same seeds and data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr", reason="FedBPT on Flower needs the flower extra: make test-flower")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from aggregator.strategies import LocalStart, make_strategy
from fed_clients.data import client_shard, load_splits
from fed_clients.tasks import get_task
from fedbpt.flower_loopback import run_deployment, run_native, run_simulation
from fedbpt_flower.records import (
    round_task,
    task_content,
    update_content,
    update_request,
)
from fedbpt_flower.settings import SettingsError, run_config_from, site_settings
from fedbpt_wire.federation import ClientCosts, ClientMetrics, UpdateRequest
from fedbpt_wire.tensors import decode_tensor, encode_tensor
from inference_service.app import create_app as create_service
from inference_service.auth import KeyStore
from inference_service.torch_engine import TorchEngine

from ..conftest import serve_app

CLIENTS = 3
BATCH = 4
# The run both engines make: small enough for two CPU cores, every client sampled every round.
RUN = {
    "run-id": "flower-e2e",
    "strategy": "fedbpt",
    "rounds": 2,
    "intrinsic-dim": 16,
    "prompt-length": 2,
    "local-popsize": 4,
    "local-iterations": 2,
    "min-clients": CLIENTS,
    "round-timeout-s": 300.0,
    "per-class": 6,
    "alpha": 0.5,
    "batch-size": BATCH,
}


@pytest.fixture(scope="module")
def service(default_model_dir):
    engine = TorchEngine(str(default_model_dir), dtype="float32")
    with serve_app(create_service(engine, KeyStore({"svc-key": None}))) as url:
        yield url


@pytest.fixture
def api_key(monkeypatch):
    # The ClientApp reads its service key from its environment, never from the run config.
    monkeypatch.setenv("FEDBPT_API_KEY", "svc-key")


def test_run_config_keys_map_onto_the_run_config():
    config = run_config_from(RUN | {"service": "http://x", "report": ""})
    assert (config.run_id, config.intrinsic_dim, config.round_timeout_s, config.min_clients) == (
        "flower-e2e",
        16,
        300.0,
        CLIENTS,
    )
    with pytest.raises(SettingsError, match="unknown key 'rouns'"):
        run_config_from({"run-id": "x", "rouns": 2})
    with pytest.raises(SettingsError, match="^run config: strategy: "):
        run_config_from({"run-id": "x", "strategy": "fedprox"})
    with pytest.raises(SettingsError, match="'service'"):
        site_settings({}, {"partition-id": 0, "num-partitions": 2}, node_id=7)
    site = site_settings({"service": "http://s"}, {"partition-id": 1, "num-partitions": 3}, node_id=7)
    assert (site.client_id, site.partition, site.alpha) == ("client-1", (1, 3), None)


def test_records_carry_a_task_and_an_update_unchanged():
    mean = np.linspace(-1, 1, 16)
    task = round_task(task_content(3, LocalStart(mean, 0.7, 0.5), "r", perturb=False))
    assert (task.round, task.sigma, task.local_sigma, task.run_id, task.perturb) == (3, 0.7, 0.5, "r", False)
    assert round_task(task_content(3, LocalStart(mean, 0.7, None), "r", perturb=True)).perturb is True
    assert decode_tensor(task.mean).tobytes() == mean.astype(np.float32).tobytes()
    update = UpdateRequest(
        round=3,
        mean=encode_tensor(mean),
        fitness=0.25,
        sigmas=[0.5, 0.4],
        num_samples=9,
        final_sigma=0.3,
        metrics=ClientMetrics(
            local_loss=0.6, local_accuracy=0.5, global_val_loss=0.7, global_val_accuracy=0.4, val_samples=3
        ),
        costs=ClientCosts(queries=4, sequences=40, tokens=400, service_bytes_up=1, service_bytes_down=2),
    )
    client_id, back = update_request(update_content("client-2", update))
    assert client_id == "client-2" and back == update


def test_a_bad_reply_is_dropped_and_the_round_fails_without_enough_updates():
    from fedbpt_flower.strategy import FedBPTFlowerStrategy

    config = run_config_from(RUN | {"min-updates": 1})
    flower = FedBPTFlowerStrategy(config)
    flower.strategy = make_strategy(config, popsize=CLIENTS)
    before = flower.strategy.mean.copy()
    bad = RecordDict(
        {
            "update": ArrayRecord({"mean": Array(np.full(5, 1.0, np.float32))}),
            "fit": ConfigRecord(
                {"client-id": "client-0", "round": 0, "fitness": 0.1, "sigmas": [0.5], "num-samples": 3}
            ),
            "metrics": MetricRecord(
                {
                    "local_loss": 0.1,
                    "local_accuracy": 1.0,
                    "costs.queries": 1,
                    "costs.sequences": 1,
                    "costs.tokens": 1,
                    "costs.service_bytes_up": 1,
                    "costs.service_bytes_down": 1,
                }
            ),
        }
    )
    # Only the SuperLink may build a Message: the reply is stood in for by what the strategy reads of one.
    reply = SimpleNamespace(metadata=SimpleNamespace(src_node_id=11), content=bad, has_error=lambda: False)
    flower._selected = [11]
    flower.aggregate_train(1, [reply])
    outcome = flower.history[-1]
    assert outcome.state == "failed" and "mean.shape must be [16]" in outcome.rejected["node-11"]
    assert np.array_equal(flower.strategy.mean, before)


def shards_for(task):
    train = load_splits("default", task)["train"]
    return [
        client_shard(train, k, CLIENTS, alpha=RUN["alpha"], seed=0, per_class=RUN["per-class"]) for k in range(CLIENTS)
    ]


def test_simulation_engine_runs_two_rounds(service, api_key, tmp_path):
    run = run_simulation(tmp_path, RUN | {"service": service}, num_supernodes=CLIENTS)
    history = run.report["history"]
    assert [h["state"] for h in history] == ["merged", "merged"]
    assert all(h["reporters"] == [f"client-{k}" for k in range(CLIENTS)] for h in history)
    assert all(np.isfinite(h["mean"]).all() and len(h["mean"]) == RUN["intrinsic-dim"] for h in history)
    print(f"\nsimulation engine: {run.wall_s:.1f} s for {RUN['rounds']} rounds of {CLIENTS} clients")


@pytest.mark.slow
def test_deployment_engine_matches_the_native_aggregator(service, api_key, tmp_path):
    """Bit-identical: both engines hand every client the same float32 mean and sigmas, each client's round is the
    same seeded code against the same deterministic service, and the server merges the same float32 updates in
    the same client-id order with the same strategy object; nothing in between rounds or reorders a float."""
    nodes = [{"partition-id": k, "num-partitions": CLIENTS, "service": service} for k in range(CLIENTS)]
    flower = run_deployment(tmp_path / "flower", RUN, nodes, secure=True)
    task = get_task("rotten_tomatoes")
    config = run_config_from(RUN)
    native = run_native(tmp_path / "native", service, "svc-key", config, shards_for(task), task, BATCH)
    history = flower.report["history"]
    assert [h["state"] for h in history] == ["merged", "merged"]
    assert [r["state"] for r in native.status["history"]] == ["merged", "merged"]
    for r, h in enumerate(history):
        got = np.asarray(h["mean"]).astype(np.float32)
        assert got.tobytes() == np.asarray(native.means[r], dtype=np.float32).tobytes(), f"round {r}"
        assert h["sigma_after"] == native.status["history"][r]["sigma_after"]
    print(f"\ndeployment engine (TLS, SuperNode auth): {flower.wall_s:.1f} s; native: {native.wall_s:.1f} s")
