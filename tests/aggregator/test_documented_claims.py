"""Claims docs/design.md makes about the aggregator and the CLI, each a loopback test that fails when the behaviour
goes (issue 28, item 4). Real uvicorn on 127.0.0.1, real SQLite."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys

import httpx

from aggregator.app import create_app
from aggregator.store import Store
from fed_clients.aggregator_client import AggregatorClient
from fedbpt.loopback import serve_app
from fedbpt_wire.asgi import harden

from .test_aggregator import ROOT, config, register


def test_a_disallowed_host_gets_400_and_an_allowed_one_is_served(tmp_path):
    app = create_app(config(), str(tmp_path / "run.db"))
    harden(app, "fedbpt.example.org,127.0.0.1")
    with serve_app(app) as url:
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        r = httpx.get(f"{url}/healthz", headers={"Host": "evil.example.com"}, timeout=10)
        assert r.status_code == 400 and "evil" not in r.text


def test_a_trailing_slash_is_404_not_a_redirect(tmp_path):
    with serve_app(create_app(config(), str(tmp_path / "run.db"))) as url:
        r = httpx.get(f"{url}/v1/status/", headers={"Host": "attacker.example"}, timeout=10, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_the_operator_key_rebinds_a_client_id(tmp_path):
    with serve_app(create_app(config(), str(tmp_path / "run.db"), enroll_key="join", operator_key="op")) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            old = register(http, "a", key="join")
            assert http.get("/v1/round", headers=old).status_code == 200
            again = http.post(
                "/v1/clients", json={"client_id": "a", "num_samples": 5}, headers={"Authorization": "Bearer join"}
            )
            assert again.status_code == 409
            new = register(http, "a", key="op")  # the operator re-binds it; the old token is retired
            assert http.get("/v1/round", headers=old).status_code == 401
            assert http.get("/v1/round", headers=new).status_code == 200


def test_an_unknown_client_token_falls_back_to_the_enroll_key(tmp_path):
    with serve_app(create_app(config(), str(tmp_path / "run.db"), enroll_key="join")) as url:
        client = AggregatorClient(url)
        # A token from another run (another database): refused as a token, then the enroll key registers the id.
        reg = client.register("a", 10, "join", token="a-token-from-an-earlier-run")
        assert reg.client_id == "a" and client.round().selected
        client.close()


def test_sqlite_runs_in_wal_mode_with_synchronous_full(tmp_path):
    store = Store(str(tmp_path / "run.db"))
    try:
        assert store._query("PRAGMA synchronous")[0][0] == 2  # FULL
        assert store._query("PRAGMA journal_mode")[0][0] == "wal"
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "run.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file


def test_the_start_up_warnings_of_an_open_aggregator_appear(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aggregator.app"):
        with serve_app(create_app(config(), str(tmp_path / "run.db"))):
            pass
    text = caplog.text
    assert "enrollment is OPEN" in text and "no operator key: /v1/status shows client ids" in text


def test_verbose_shows_the_traceback_and_plain_one_line(tmp_path):
    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedbpt.cli", *flags, "predict", "--prompt", "missing.json"]
            + ["--service", "http://127.0.0.1:9", "--input", "x.csv"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    plain, verbose = run(), run("--verbose")
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and "missing.json" in plain.stderr
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


def test_example_keys_from_env_example_are_warned_about_loudly(tmp_path, caplog, monkeypatch):
    from inference_service.auth import KeyStore

    with caplog.at_level(logging.WARNING):
        create_app(config(), str(tmp_path / "run.db"), enroll_key="example-enroll-key-change-me", operator_key="x")
        monkeypatch.setenv("FEDBPT_API_KEYS", "fresh-key,example-service-key-change-me")
        KeyStore.from_sources()
    assert "FEDBPT_ENROLL_KEY is the EXAMPLE key" in caplog.text and "FEDBPT_OPERATOR_KEY" not in caplog.text
    assert "API key 2 of FEDBPT_API_KEYS is the EXAMPLE key" in caplog.text and "API key 1" not in caplog.text
    assert "change-me" not in caplog.text.replace("EXAMPLE key", "")  # the key itself is never logged
