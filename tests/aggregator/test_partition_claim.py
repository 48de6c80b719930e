"""`--partition auto/N`: the aggregator hands out partition indices, over real HTTP and real SQLite."""

from __future__ import annotations

import argparse
import contextlib
import csv
import sqlite3
from pathlib import Path

import httpx
import pytest

from aggregator.app import create_app
from fed_clients.aggregator_client import AggregatorClient
from fed_clients.data import client_shard, load_splits
from fed_clients.http import RequestFailed
from fed_clients.runner import _client_data, add_arguments, parse_partition
from fed_clients.tasks import get_task
from fedbpt.loopback import serve_app
from fedbpt_wire.federation import RunConfig

KEY = "sesame"


def config() -> RunConfig:
    return RunConfig(run_id="claims", intrinsic_dim=4, rounds=1, min_clients=3, round_timeout_s=30.0)


@contextlib.contextmanager
def live(db: Path, enroll_key: str | None = KEY):
    with (
        serve_app(create_app(config(), str(db), enroll_key=enroll_key)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        yield http


def claim(http: httpx.Client, instance: str, parts: int, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http.post("/v1/partitions/claim", json={"instance": instance, "parts": parts}, headers=headers)


def index(http: httpx.Client, instance: str, parts: int) -> int:
    r = claim(http, instance, parts)
    assert r.status_code == 200, r.text
    assert r.json()["parts"] == parts
    return r.json()["index"]


def test_lowest_free_index_same_instance_same_index_and_409_when_full(tmp_path):
    with live(tmp_path / "run.db") as http:
        assert [index(http, name, 3) for name in ("c1", "c2")] == [0, 1]
        assert index(http, "c1", 3) == 0 and index(http, "c2", 3) == 1  # idempotent
        assert index(http, "c3", 3) == 2
        full = claim(http, "c4", 3)
        assert full.status_code == 409 and "parts" in full.json()["detail"], full.text
        # a full table still answers its own members
        assert [index(http, name, 3) for name in ("c3", "c2", "c1")] == [2, 1, 0]


def test_parts_must_match_the_stored_claims(tmp_path):
    with live(tmp_path / "run.db") as http:
        assert index(http, "c1", 2) == 0
        for name in ("c1", "c2"):
            r = claim(http, name, 3)
            assert r.status_code == 422 and "parts" in r.json()["detail"], r.text
        assert index(http, "c2", 2) == 1


def test_bad_claims_are_a_422_naming_the_field(tmp_path):
    with live(tmp_path / "run.db") as http:
        cases = {
            "instance": {"instance": "not a host!", "parts": 2},
            "parts": {"instance": "c1", "parts": 0},
            "parts must be at most": {"instance": "c1", "parts": 10**30},
            "client_id": {"instance": "c1", "parts": 2, "client_id": "c1"},
        }
        for field, payload in cases.items():
            r = http.post("/v1/partitions/claim", json=payload, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)


def test_claims_need_the_enroll_key_where_one_is_set(tmp_path):
    with live(tmp_path / "run.db") as http:
        for key in (None, "nope"):
            r = claim(http, "c1", 2, key=key)
            assert r.status_code == 401 and r.json()["detail"].startswith("Authorization"), r.text
            assert r.headers["WWW-Authenticate"] == "Bearer"
        # a client token is not the enroll key either
        token = http.post(
            "/v1/clients", json={"client_id": "a", "num_samples": 1}, headers={"Authorization": f"Bearer {KEY}"}
        ).json()["token"]
        assert claim(http, "c1", 2, key=token).status_code == 401
        assert index(http, "c1", 2) == 0
    with live(tmp_path / "open.db", enroll_key=None) as http:
        r = claim(http, "c1", 2, key=None)
        assert r.status_code == 200 and r.json() == {"index": 0, "parts": 2}


def test_claims_survive_an_aggregator_restart(tmp_path):
    db = tmp_path / "run.db"
    with live(db) as http:
        assert [index(http, name, 3) for name in ("c1", "c2")] == [0, 1]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert sorted(conn.execute("SELECT instance, idx, parts FROM partition_claims")) == [("c1", 0, 3), ("c2", 1, 3)]
    with live(db) as http:
        assert index(http, "c2", 3) == 1 and index(http, "c1", 3) == 0
        assert claim(http, "c1", 4).status_code == 422
        assert index(http, "c3", 3) == 2
        assert claim(http, "c4", 3).status_code == 409


def test_the_client_claims_with_the_enroll_key_and_keeps_its_token(tmp_path):
    with serve_app(create_app(config(), str(tmp_path / "run.db"), enroll_key=KEY)) as url:
        agg = AggregatorClient(url, timeout=60)
        try:
            with pytest.raises(RequestFailed) as refused:
                agg.claim_partition("c1", 2)
            assert refused.value.status == 401
            assert agg.claim_partition("c1", 2, KEY).index == 0
            agg.register("client-0", 5, KEY)
            assert agg.round().state == "waiting"
            # claimed again after registering: the client token is still the one sent afterwards
            assert agg.claim_partition("c1", 2, KEY).index == 0
            assert agg.round().state == "waiting"
        finally:
            agg.close()


def client_args(data: Path, url: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        [
            "--service",
            "http://127.0.0.1:9",
            "--aggregator",
            url,
            "--enroll-key",
            KEY,
            "--data",
            str(data),
            "--per-class",
            "4",
            *extra,
        ]
    )


def test_the_runner_takes_the_claimed_part(tmp_path, monkeypatch):
    data = tmp_path / "pool.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([f"review {i}", i % 2] for i in range(40))
    monkeypatch.setattr("os.uname", lambda: argparse.Namespace(nodename="this-host"))
    with serve_app(create_app(config(), str(tmp_path / "run.db"), enroll_key=KEY)) as url:
        agg = AggregatorClient(url, timeout=60)
        try:
            assert agg.claim_partition("other-host", 2, KEY).index == 0
            client_id, mine = _client_data(client_args(data, url, "--partition", "auto/2"), agg)
            assert client_id == "client-1"
            assert agg.claim_partition("this-host", 2, KEY).index == 1  # keyed by the host name
            pool = load_splits(str(data), get_task("rotten_tomatoes"))["train"]
            assert mine == client_shard(pool, 1, 2, None, 0, 4)
            # a restarted container: the same host name, the same part
            assert _client_data(client_args(data, url, "--partition", "auto/2"), agg) == ("client-1", mine)
            # --client-id names the instance too, and a third instance finds no free part of two
            with pytest.raises(RequestFailed) as full:
                _client_data(client_args(data, url, "--partition", "auto/2", "--client-id", "c9"), agg)
            assert full.value.status == 409
            # K/N needs no aggregator
            assert _client_data(client_args(data, "http://127.0.0.1:9", "--partition", "0/2"), None)[0] == "client-0"
        finally:
            agg.close()


@pytest.mark.parametrize(
    "spec, expected", [("auto/4", (None, 4)), ("auto/1", (None, 1)), ("0/4", (0, 4)), ("3/4", (3, 4))]
)
def test_parse_partition(spec, expected):
    assert parse_partition(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("4", "K/N or auto/N"),
        ("auto", "K/N or auto/N"),
        ("auto/x", "K/N or auto/N"),
        ("x/4", "K/N or auto/N"),
        ("1/2/3", "K/N or auto/N"),
        ("", "K/N or auto/N"),
        ("auto/0", "N >= 1"),
        ("4/4", "0 <= K < N"),
        ("-1/4", "0 <= K < N"),
    ],
)
def test_parse_partition_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_partition(spec)
