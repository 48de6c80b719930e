"""The federated loop end to end: a real service, a real aggregator and client threads over loopback HTTP."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from aggregator.app import create_app as create_aggregator
from fed_clients.aggregator_client import AggregatorClient
from fed_clients.data import load_splits
from fed_clients.runner import client_shard, run_client
from fed_clients.service_client import ServiceClient
from fed_clients.tasks import get_task
from fedbpt_wire.federation import RunConfig
from fedbpt_wire.tensors import decode_tensor
from inference_service.app import create_app as create_service
from inference_service.auth import KeyStore
from inference_service.torch_engine import TorchEngine

from .conftest import serve_app


@pytest.fixture(scope="module")
def service_url(default_model_dir):
    engine = TorchEngine(str(default_model_dir), dtype="float32")
    with serve_app(create_service(engine, KeyStore({"svc-key": None}))) as url:
        yield url


def _run_clients(service_url, agg_url, shards, batch_size):
    errors, services = [], []

    def work(k):
        service = ServiceClient(service_url, "svc-key")
        services.append(service)
        try:
            run_client(service, AggregatorClient(agg_url), f"client-{k}", shards[k], get_task("rotten_tomatoes"),
                       enroll_key="enroll", batch_size=batch_size, max_idle_s=120)
        except Exception as exc:  # surfaced to the test below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    assert not errors, errors
    return services


@pytest.mark.parametrize("strategy", ["fedbpt", "fedavg-z"])
def test_two_rounds_two_clients(service_url, default_data_dir, tmp_path, strategy):
    task = get_task("rotten_tomatoes")
    train = load_splits("default", task)["train"]
    shards = [client_shard(train, k, 2, alpha=0.5, seed=0, per_class=6) for k in range(2)]
    config = RunConfig(run_id="e2e", strategy=strategy, rounds=2, intrinsic_dim=16, prompt_length=2,
                       local_popsize=4, local_iterations=2, min_clients=2, round_timeout_s=300)
    batch = 4
    with serve_app(create_aggregator(config, str(tmp_path / "agg.db"), enroll_key="enroll")) as agg_url:
        services = _run_clients(service_url, agg_url, shards, batch)
        status = httpx.get(f"{agg_url}/v1/status").json()
        observer = AggregatorClient(agg_url)
        observer.http.set_token("enroll")
        final = observer.global_state()

    assert status["state"] == "done"
    history = status["history"]
    assert [r["state"] for r in history] == ["merged", "merged"]
    perturb = strategy == "fedbpt"
    for rec in history:
        assert sorted(rec["reporters"]) == ["client-0", "client-1"]
        # Per client and round: the global prompt on local validation, one call per local iteration, the final mean.
        assert rec["queries"] == 2 * (1 + config.local_iterations + 1)
        expected = 0
        for shard in shards:
            copies = 2 if perturb else 1
            b = min(batch, len(shard.train)) * copies
            # The final mean's fitness is measured on the whole shard (and its perturbed copy), not a batch.
            expected += len(shard.val) + config.local_iterations * config.local_popsize * b + len(shard.train) * copies
        assert rec["sequences"] == expected
        assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0 and rec["val_accuracy"] is not None
        assert 0.0 <= rec["val_accuracy"] <= 1.0
    # A round's upload is kilobytes: the mean (d floats) and a few sigmas, never a prompt or a model.
    assert all(rec["bytes_up"] < 2 * 8 * 1024 for rec in history)
    assert sum(s.costs.queries for s in services) == sum(r["queries"] for r in history)
    mean = decode_tensor(final.mean)
    assert mean.shape == (16,) and np.abs(mean).max() > 0
