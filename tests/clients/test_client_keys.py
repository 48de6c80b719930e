"""A client with a wrong service API key or a wrong enroll key, as a library and through `fedbpt client`: refused
at once (a 401 is never retried), and on the command line one line saying which key, with a non-zero exit."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from aggregator.app import create_app as create_aggregator
from fed_clients.aggregator_client import AggregatorClient
from fed_clients.data import ClientData, Example
from fed_clients.http import RequestFailed
from fed_clients.service_client import ServiceClient
from fed_clients.session import run_client
from fed_clients.tasks import get_task
from fedbpt.loopback import serve_app
from fedbpt_wire.federation import RunConfig
from inference_service.app import create_app as create_service
from inference_service.auth import KeyStore
from inference_service.torch_engine import TorchEngine

from ..conftest import TINY_CORPUS

ROOT = Path(__file__).resolve().parents[2]
SVC_KEY, ENROLL = "svc-key", "enroll-key"
TASK = get_task("sst2")  # label words " bad" and " great": single tokens of the tiny vocabulary
EXAMPLES = [Example({"text": t}, int("great" in t)) for t in TINY_CORPUS]


@pytest.fixture(scope="module")
def service_url(tiny_roberta_dir):
    engine = TorchEngine(str(tiny_roberta_dir), dtype="float32")
    with serve_app(create_service(engine, KeyStore({SVC_KEY: None}))) as url:
        yield url


@pytest.fixture
def aggregator_url(tmp_path):
    cfg = RunConfig(
        run_id="keys", intrinsic_dim=4, prompt_length=1, rounds=1, local_popsize=2, local_iterations=1, min_clients=1
    )
    with serve_app(create_aggregator(cfg, str(tmp_path / "agg.db"), enroll_key=ENROLL)) as url:
        yield url


def score_401s(service_url: str) -> float:
    text = httpx.get(f"{service_url}/metrics", timeout=60).text
    line = [x for x in text.splitlines() if x.startswith('fedbpt_requests_total{endpoint="/v1/score",status="401"}')]
    return float(line[0].split()[-1]) if line else 0.0


def test_a_wrong_api_key_is_refused_once_not_retried(service_url):
    before = score_401s(service_url)
    client = ServiceClient(service_url, "not-the-key", retries=5, backoff=0.0)
    try:
        with pytest.raises(RequestFailed) as err:
            client.score(np.zeros((1, 1, 48), np.float32), ["it was {mask} ."], [" bad", " great"])
    finally:
        client.close()
    assert err.value.status == 401 and "API key" in err.value.detail
    assert score_401s(service_url) == before + 1 and client.costs.queries == 0


def test_a_wrong_enroll_key_is_refused_and_registers_nothing(aggregator_url):
    client = AggregatorClient(aggregator_url, retries=5, backoff=0.0)
    try:
        with pytest.raises(RequestFailed) as err:
            client.register("c1", 5, enroll_key="not-the-key")
        assert err.value.status == 401 and "enroll key" in err.value.detail
        assert client.http.wire.requests == 1
    finally:
        client.close()
    assert httpx.get(f"{aggregator_url}/v1/status", timeout=60).json()["clients"] == []


def test_a_client_run_with_a_wrong_api_key_stops_at_its_first_score(service_url, aggregator_url):
    service = ServiceClient(service_url, "not-the-key", retries=5, backoff=0.0)
    aggregator = AggregatorClient(aggregator_url, retries=5, backoff=0.0)
    data = ClientData(EXAMPLES[:5], EXAMPLES[5:])
    try:
        with pytest.raises(RequestFailed) as err:
            run_client(service, aggregator, "c1", data, TASK, enroll_key=ENROLL, max_idle_s=60)
    finally:
        service.close()
        aggregator.close()
    assert err.value.status == 401 and "API key" in err.value.detail
    # Registered with the right enroll key, it reported nothing: the round it was handed stays open.
    status = httpx.get(f"{aggregator_url}/v1/status", timeout=60).json()
    assert status["clients"] == ["c1"] and status["history"][0]["state"] == "open"
    assert status["history"][0]["reporters"] == []


@pytest.mark.parametrize("which", ["api-key", "enroll-key"])
def test_the_cli_says_which_key_in_one_line(service_url, aggregator_url, tmp_path, which):
    data = tmp_path / "mine.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *((ex.fields["text"], ex.label) for ex in EXAMPLES)])
    keys = {"api-key": SVC_KEY, "enroll-key": ENROLL, which: "not-the-key"}
    argv = [
        sys.executable,
        "-m",
        "fedbpt.cli",
        "client",
        "--service",
        service_url,
        "--aggregator",
        aggregator_url,
        "--api-key",
        keys["api-key"],
        "--enroll-key",
        keys["enroll-key"],
        "--task",
        "sst2",
        "--data",
        str(data),
        "--client-id",
        "c1",
        "--timeout",
        "60",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # The last line says it, naming the key that was refused.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fedbpt client") and ("API key" if which == "api-key" else "enroll key") in last, (
        result.stderr[-3000:]
    )
