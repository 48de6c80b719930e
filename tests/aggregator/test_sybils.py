"""Identities that cost something (issue 24, finding 2): registrations are rate-limited, the default cap sits near
the federation, and ids that do not report stop crowding the others out of sampling. Real HTTP on 127.0.0.1."""

from __future__ import annotations

import argparse

import httpx
import numpy as np

from aggregator.app import create_app
from aggregator.cli import add_arguments
from aggregator.strategies import FedBPTStrategy
from fedbpt.loopback import serve_app

from .test_aggregator import Clock, advance, body, config, mean_of, register, wait_for


def test_new_ids_are_rate_limited_per_minute(tmp_path):
    clock = Clock()
    app = create_app(
        config(min_clients=50), str(tmp_path / "run.db"), operator_key="op", max_registrations_per_minute=3, clock=clock
    )
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        for k in range(3):
            register(http, f"c{k}")
        r = http.post("/v1/clients", json={"client_id": "c3", "num_samples": 1})
        assert r.status_code == 429 and "--max-registrations-per-minute" in r.json()["detail"]
        assert int(r.headers["retry-after"]) == 60
        # The operator's own registrations are not counted; a re-registration of a known id is not a new one.
        register(http, "ops-1", key="op")
        clock.now += 60.0
        register(http, "c3")


def test_the_cli_caps_registrations_near_the_federation():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.max_clients is None and args.max_registrations_per_minute == 120


def test_silent_ids_fill_only_the_places_the_others_cannot():
    ids = [f"c{i}" for i in range(10)]
    cfg = config(participation=0.3)  # 3 a round
    silent = frozenset(ids[3:])
    for r in range(5):
        assert FedBPTStrategy.select(cfg, ids, r, silent) == ids[:3]
    picked = FedBPTStrategy.select(cfg, ids, 0, frozenset(ids[2:]))
    assert picked[:2] == ids[:2] and len(picked) == 3 and picked[2] in ids[2:]
    assert FedBPTStrategy.select(cfg, ids, 0) == FedBPTStrategy.select(cfg, ids, 0, frozenset())


def test_ids_that_never_report_stop_being_sampled(tmp_path):
    """Three honest clients and seven that register and never report, participation 0.3: once an id has been
    selected and stayed silent it is not selected again while enough others are, so the run's rounds come to
    select the honest clients only (before: round 1 could select 4 silent ids and no honest one)."""
    clock = Clock()
    honest, silent = ["h0", "h1", "h2"], [f"s{i}" for i in range(7)]
    cfg = config(min_clients=10, participation=0.3, rounds=8, round_timeout_s=5.0, min_updates=1)
    app = create_app(cfg, str(tmp_path / "run.db"), clock=clock)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        heads = {cid: register(http, cid) for cid in honest + silent}
        for rnd in range(cfg.rounds):
            wait_for(lambda rnd=rnd: http.get("/v1/status").json()["round"] == rnd, what=f"round {rnd}")
            for cid in honest:
                task = http.get("/v1/round", headers=heads[cid]).json()
                if task["selected"]:
                    update = body(rnd, mean_of(task["mean"]) + 0.01)
                    assert http.post("/v1/round/update", json=update, headers=heads[cid]).status_code == 200
            if http.get("/v1/status").json()["round"] == rnd:  # a silent id was selected: the deadline closes it
                advance(app, clock, cfg.round_timeout_s)
        wait_for(lambda: http.get("/v1/status").json()["state"] == "done", what="the run to end")
        history = http.get("/v1/status").json()["history"]
    quiet: set[str] = set()
    for rec in history:
        active = len(honest) + len(silent) - len(quiet)
        if active >= 3:
            assert not quiet & set(rec["selected"]), (rec["round"], rec["selected"], quiet)
        quiet |= set(rec["selected"]) - set(rec["reporters"])
    assert history[-1]["selected"] == honest and np.all([r["state"] == "merged" for r in history[-3:]])


def test_one_time_enroll_codes_register_one_id_each(tmp_path):
    with serve_app(create_app(config(min_clients=9), str(tmp_path / "run.db"), operator_key="op")) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            # Anyone may register while the aggregator is open and has minted no code.
            register(http, "early")
            r = http.post("/v1/enroll-codes", json={"count": 2}, headers={"Authorization": "Bearer early-guess"})
            assert r.status_code == 401
            assert (
                http.post("/v1/enroll-codes", json={"count": 0}, headers={"Authorization": "Bearer op"}).status_code
                == 422
            )
            codes = http.post("/v1/enroll-codes", json={"count": 2}, headers={"Authorization": "Bearer op"}).json()[
                "codes"
            ]
            assert len(set(codes)) == 2
            # Minted codes close enrollment to whoever holds none.
            r = http.post("/v1/clients", json={"client_id": "stranger", "num_samples": 1})
            assert r.status_code == 401 and "enroll code" in r.json()["detail"]
            register(http, "a", key=codes[0])
            r = http.post(
                "/v1/clients",
                json={"client_id": "b", "num_samples": 1},
                headers={"Authorization": f"Bearer {codes[0]}"},
            )
            assert r.status_code == 401  # used: it registered "a" and nothing else
            r = http.post(
                "/v1/clients",
                json={"client_id": "a", "num_samples": 1},
                headers={"Authorization": f"Bearer {codes[1]}"},
            )
            assert r.status_code == 409  # a code takes no id over
            register(http, "b", key=codes[1])
            ids = http.get("/v1/status", headers={"Authorization": "Bearer op"}).json()["clients"]
    assert ids == ["a", "b", "early"]


def test_the_enroll_codes_command_writes_them_private(tmp_path):
    import os
    import subprocess
    import sys

    from .test_aggregator import ROOT

    with serve_app(create_app(config(), str(tmp_path / "run.db"), operator_key="op")) as url:
        done = subprocess.run(
            [sys.executable, "-m", "fedbpt.cli", "enroll-codes", "--aggregator", url, "--count", "3"]
            + ["--output", str(tmp_path / "codes.txt")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT), "FEDBPT_OPERATOR_KEY": "op"},
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        codes = (tmp_path / "codes.txt").read_text().split()
        assert len(codes) == 3 and (tmp_path / "codes.txt").stat().st_mode & 0o077 == 0
        with httpx.Client(base_url=url, timeout=30) as http:
            register(http, "owner-1", key=codes[2])
