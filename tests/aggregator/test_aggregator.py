"""The aggregator over real HTTP: uvicorn on a free 127.0.0.1 port, httpx clients, real cma and SQLite."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from aggregator.app import create_app
from aggregator.cli import add_arguments, config_from_args
from aggregator.store import Store
from aggregator.strategies import FedBPTStrategy
from fedbpt.loopback import free_port, serve_app
from fedbpt_wire.federation import RunConfig
from fedbpt_wire.schemas import Tensor
from fedbpt_wire.tensors import decode_tensor, encode_tensor

ROOT = Path(__file__).resolve().parents[2]
D = 8


def config(**kw) -> RunConfig:
    return RunConfig(**{"run_id": "test", "intrinsic_dim": D, "rounds": 2, "seed": 1, "round_timeout_s": 30.0, **kw})


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll until `predicate` holds; the timeout only bounds a hang, it is no claim about speed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def live(cfg: RunConfig, db: Path, **kw):
    """The app under uvicorn on a free 127.0.0.1 port, and an httpx client to it."""
    with serve_app(create_app(cfg, str(db), **kw)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def register(http: httpx.Client, cid: str, n: int = 10, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = http.post("/v1/clients", json={"client_id": cid, "num_samples": n}, headers=headers)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def body(round_: int, mean, fitness=0.5, sigmas=(0.9, 0.8), n=10, acc=0.6, val_n=5) -> dict:
    return {
        "round": round_,
        "mean": encode_tensor(np.asarray(mean, dtype=np.float32)).model_dump(),
        "fitness": fitness,
        "sigmas": list(sigmas),
        "num_samples": n,
        "metrics": {
            "local_loss": 0.7,
            "local_accuracy": 0.5,
            "global_val_loss": 0.8,
            "global_val_accuracy": acc,
            "val_samples": val_n,
        },
        "costs": {"queries": 8, "sequences": 80, "tokens": 900, "service_bytes_up": 100, "service_bytes_down": 20},
    }


def mean_of(payload: dict) -> np.ndarray:
    return decode_tensor(Tensor(**payload))


def play(http: httpx.Client, cid: str, k: int, headers: dict) -> dict:
    """A deterministic client: its update is a function of (client, round, the mean it was handed)."""
    task = http.get("/v1/round", headers=headers).json()
    assert task["state"] == "open" and task["selected"], task
    step = np.zeros(D)
    step[(task["round"] + k) % D] = 0.1 * (k + 1)
    b = body(task["round"], mean_of(task["mean"]) + step, fitness=0.1 * (k + 1) + 0.01 * task["round"])
    r = http.post("/v1/round/update", json=b, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


class Clock:
    """The aggregator's injectable clock: time moves only when a test moves it."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class TaskLooks:
    """Records each answer the coordinator computes for one client's `GET /v1/round`, in order."""

    def __init__(self, coordinator, client_id: str):
        self.answers: queue.Queue = queue.Queue()
        task = coordinator.task

        def looked(caller):
            answer = task(caller)
            if caller.client_id == client_id:
                self.answers.put(answer)
            return answer

        coordinator.task = looked

    def drain(self) -> int:
        n = 0
        while not self.answers.empty():
            self.answers.get_nowait()
            n += 1
        return n


def test_long_poll_returns_when_the_round_moves_on_and_holds_otherwise(tmp_path):
    app = create_app(config(min_clients=2, rounds=3), str(tmp_path / "run.db"))
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        ha, hb = register(http, "a"), register(http, "b")
        play(http, "a", 0, ha)
        looks = TaskLooks(app.state.coordinator, "a")

        # Nothing changes: when the wait is over, the answer is the state as it was.
        held = http.get("/v1/round", params={"wait": 0.3}, headers=ha).json()
        assert held["round"] == 0 and held["submitted"]

        looks.drain()
        answers = {}
        waiter = threading.Thread(
            target=lambda: answers.update(task=http.get("/v1/round", params={"wait": 30}, headers=ha).json())
        )
        waiter.start()
        # The server has looked at a's task (round 0, nothing to do) before b reports: an answer given at that
        # look would say round 0. Round 1 can only come from a poll held until the round moved on.
        first_look = looks.answers.get(timeout=60)
        assert (first_look.round, first_look.submitted) == (0, True)
        play(http, "b", 1, hb)
        waiter.join(timeout=60)
        assert not waiter.is_alive()
        assert answers["task"]["round"] == 1 and answers["task"]["selected"] and not answers["task"]["submitted"]

        # Work waiting already: answered from the first look, with no hold.
        looks.drain()
        assert http.get("/v1/round", params={"wait": 30}, headers=ha).json()["round"] == 1
        assert looks.drain() == 1
        for bad in ("31", "-1", "nan", "soon"):
            r = http.get("/v1/round", params={"wait": bad}, headers=ha)
            assert r.status_code == 422 and "wait" in r.text, (bad, r.text)


def test_round_lifecycle_and_idempotent_resubmission(tmp_path):
    with live(config(min_clients=2), tmp_path / "run.db") as http:
        ha = register(http, "a", n=10)
        assert http.get("/v1/round", headers=ha).json()["state"] == "waiting"
        hb = register(http, "b", n=30)
        task = http.get("/v1/round", headers=ha).json()
        assert (task["state"], task["round"], task["selected"], task["submitted"]) == ("open", 0, True, False)
        assert mean_of(task["mean"]).tolist() == [0.0] * D
        assert task["sigma"] == task["local_sigma"] == 1.0 and 0 < task["deadline_s"] <= 30

        first = body(0, np.full(D, 0.1), fitness=0.2, acc=0.5, val_n=10)
        assert http.post("/v1/round/update", json=first, headers=ha).json() == {
            "accepted": True,
            "duplicate": False,
            "round": 0,
        }
        assert http.post("/v1/round/update", json=first, headers=ha).json() == {
            "accepted": True,
            "duplicate": True,
            "round": 0,
        }
        changed = http.post("/v1/round/update", json={**first, "fitness": 0.3}, headers=ha)
        assert changed.status_code == 409 and "round" in changed.json()["detail"]
        assert http.get("/v1/round", headers=ha).json()["submitted"] is True

        http.post("/v1/round/update", json=body(0, np.full(D, -0.1), fitness=0.8, acc=0.8, val_n=30), headers=hb)
        task = http.get("/v1/round", headers=hb).json()
        assert task["round"] == 1 and task["state"] == "open"
        merged = mean_of(task["mean"])
        assert merged[0] > 0  # toward a, the better fitness
        glob = http.get("/v1/global", headers=ha).json()
        np.testing.assert_array_equal(mean_of(glob["mean"]), merged)
        assert glob["client_means"] is None and glob["state"] == "running"
        # resubmitting after the round closed is still answered as the duplicate it is
        assert http.post("/v1/round/update", json=first, headers=ha).json()["duplicate"] is True

        for h in (ha, hb):
            http.post("/v1/round/update", json=body(1, merged), headers=h)
        done = http.get("/v1/round", headers=ha).json()
        assert (done["state"], done["round"], done["selected"]) == ("done", 2, False)
        status = http.get("/v1/status").json()
        assert status["state"] == "done" and status["clients"] == ["a", "b"]
        r0 = status["history"][0]
        assert r0["state"] == "merged" and r0["reporters"] == ["a", "b"] and r0["selected"] == ["a", "b"]
        assert r0["val_accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.8) / 40)
        assert (r0["queries"], r0["tokens"], r0["service_bytes"]) == (16, 1800, 240)
        assert r0["sigma_before"] == 1.0 and r0["sigma_merged"] == pytest.approx(np.sqrt((0.81 + 0.64) * 2 / 2 / 2))
        assert r0["bytes_up"] > 0 and r0["bytes_down"] > 0 and r0["closed_at"] >= r0["opened_at"]
        assert http.get("/healthz").json()["state"] == "done"


def test_auth_and_conflicts(tmp_path):
    # participation 0.5 of 2 clients: one is sampled per round
    with live(config(min_clients=2, participation=0.5), tmp_path / "run.db", enroll_key="sesame") as http:
        assert http.post("/v1/clients", json={"client_id": "a", "num_samples": 1}).status_code == 401
        wrong = http.post(
            "/v1/clients", json={"client_id": "a", "num_samples": 1}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401 and "enroll key" in wrong.json()["detail"]
        heads = {cid: register(http, cid, key="sesame") for cid in ("a", "b")}
        for h in ({}, {"Authorization": "Bearer forged"}, {"Authorization": "Basic eA=="}):
            r = http.get("/v1/round", headers=h)
            assert r.status_code == 401 and r.json()["detail"].startswith("Authorization")
            assert http.get("/v1/global", headers=h).status_code == 401
            assert http.post("/v1/round/update", json=body(0, np.zeros(D)), headers=h).status_code == 401
        # the enroll key is not a client token
        assert http.get("/v1/round", headers={"Authorization": "Bearer sesame"}).status_code == 401

        tasks = {cid: http.get("/v1/round", headers=h).json() for cid, h in heads.items()}
        (chosen,) = [cid for cid, t in tasks.items() if t["selected"]]
        other = "b" if chosen == "a" else "a"
        assert tasks[other]["mean"] is None and tasks[other]["state"] == "open"
        r = http.post("/v1/round/update", json=body(0, np.zeros(D)), headers=heads[other])
        assert r.status_code == 409 and f"client {other} is not selected" in r.json()["detail"]
        # a token acts only as its own client: there is no field to name another one
        r = http.post("/v1/round/update", json={**body(0, np.zeros(D)), "client_id": chosen}, headers=heads[other])
        assert r.status_code == 422 and "client_id" in r.json()["detail"]
        r = http.post("/v1/round/update", json=body(1, np.zeros(D)), headers=heads[chosen])
        assert r.status_code == 409 and "not the open round" in r.json()["detail"]

        # An impostor cannot take the id: not with the enroll key every client holds, nor with another's token.
        for impostor in ("sesame", heads[other]["Authorization"].split()[1]):
            r = http.post(
                "/v1/clients",
                json={"client_id": chosen, "num_samples": 10**9},
                headers={"Authorization": f"Bearer {impostor}"},
            )
            assert r.status_code == 409 and "already registered" in r.json()["detail"], r.text
        assert http.get("/v1/round", headers=heads[chosen]).json()["selected"]
        # re-registering with its own token (a restarted client) issues a new token and retires the old one
        fresh = register(http, chosen, key=heads[chosen]["Authorization"].split()[1])
        assert http.get("/v1/round", headers=heads[chosen]).status_code == 401
        assert http.post("/v1/round/update", json=body(0, np.zeros(D)), headers=fresh).status_code == 200


def test_bad_input_is_a_4xx_naming_the_field(tmp_path):
    with live(config(), tmp_path / "run.db") as http:
        h = register(http, "a")
        good = body(0, np.zeros(D))

        def post(payload):
            return http.post("/v1/round/update", json=payload, headers=h)

        cases = {
            "mean.shape": {**good, "mean": encode_tensor(np.zeros(D + 1, np.float32)).model_dump()},
            "mean.shape must be": {**good, "mean": encode_tensor(np.zeros((1, D), np.float32)).model_dump()},
            "mean.data holds NaN": {**good, "mean": encode_tensor(np.full(D, np.nan, np.float32)).model_dump()},
            "mean.data is not valid base64": {**good, "mean": {**good["mean"], "data": "@@@"}},
            "mean.dtype": {**good, "mean": {**good["mean"], "dtype": "int8"}},
            "sigmas[1]": {**good, "sigmas": [0.5, -1.0]},
            "sigmas": {**good, "sigmas": []},
            "sigmas[0] must be positive and at most 1e+06": {**good, "sigmas": [1e7]},
            "num_samples must be at most": {**good, "num_samples": 10**30},
            "fitness": {**good, "fitness": "low"},
            "metrics.val_samples": {**good, "metrics": {**good["metrics"], "val_samples": -1}},
            "costs.queries": {**good, "costs": {k: v for k, v in good["costs"].items() if k != "queries"}},
        }
        for field, payload in cases.items():
            r = post(payload)
            assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
        r = http.post("/v1/round/update", content=b"{not json", headers={**h, "content-type": "application/json"})
        assert r.status_code == 422
        r = http.post(
            "/v1/round/update",
            content=json.dumps({**good, "fitness": float("nan")}),
            headers={**h, "content-type": "application/json"},
        )
        assert r.status_code == 422 and "fitness" in r.json()["detail"], r.text
        r = http.post("/v1/round/update", content=b"x" * (2 * 1024 * 1024), headers=h)
        assert r.status_code == 413
        r = http.post("/v1/clients", json={"client_id": "bad id!", "num_samples": 1})
        assert r.status_code == 422 and "client_id" in r.json()["detail"]
        r = http.post("/v1/clients", json={"client_id": "big", "num_samples": 10**30})
        assert r.status_code == 422 and "num_samples" in r.json()["detail"]
        assert post({**good, "round": 10**30}).status_code == 409
        assert post(good).status_code == 200


def stored_states(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [state for (state,) in conn.execute("SELECT state FROM rounds ORDER BY round")]


def advance(app, clock: Clock, seconds: float) -> None:
    """Move the logical clock and tell the app: its deadline task sleeps by the real clock, which stood still."""
    clock.now += seconds
    app.state.events.wake()


def test_silent_client_round_closes_at_its_deadline(tmp_path):
    cfg = config(min_clients=2, min_updates=1, round_timeout_s=10.0, rounds=3)
    db, clock = tmp_path / "run.db", Clock()
    app = create_app(cfg, str(db), clock=clock)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        ha = register(http, "a")
        register(http, "b")  # never reports
        play(http, "a", 0, ha)
        # No request does the closing here: the deadline task must, once the clock reaches the deadline and
        # not before. Watch the database.
        assert stored_states(db) == ["open"]
        advance(app, clock, 9.5)
        assert http.get("/v1/status").json()["history"][0]["state"] == "open"
        advance(app, clock, 0.5)
        wait_for(lambda: stored_states(db)[0] != "open", what="round 0 to close")
        advance(app, clock, 10.0)
        wait_for(lambda: stored_states(db)[1:2] == ["failed"], what="round 1 to fail")
        status = http.get("/v1/status").json()
        r0, r1, r2 = status["history"]
        assert r0["state"] == "merged" and r0["reporters"] == ["a"] and r0["selected"] == ["a", "b"]
        assert (r0["opened_at"], r0["closed_at"], r1["closed_at"]) == (1000.0, 1010.0, 1020.0)
        # round 1: nobody reported, fewer than min_updates: failed, round 2 opened from the same state
        assert r1["state"] == "failed" and r1["sigma_after"] is None and r2["state"] == "open"
        assert r2["sigma_before"] == r1["sigma_before"] == r0["sigma_after"]
        assert r2["local_sigma"] == r1["local_sigma"]
        late = http.post("/v1/round/update", json=body(1, np.zeros(D)), headers=ha)
        assert late.status_code == 409
        advance(app, clock, 10.0)
        wait_for(lambda: http.get("/v1/status").json()["state"] == "done", what="the run to end")


def test_reads_never_close_a_round_and_the_deadline_task_does(tmp_path):
    # A long timeout: the deadline task's real-time sleep cannot end while the reads below run, so only a read
    # could close the round before the wake.
    cfg = config(min_clients=2, round_timeout_s=3600.0)
    db, clock = tmp_path / "run.db", Clock()
    app = create_app(cfg, str(db), clock=clock, enroll_key="enroll", operator_key="op")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        ha = register(http, "a", key="enroll")
        register(http, "b", key="enroll")
        play(http, "a", 0, ha)
        clock.now += 3600.5  # past the deadline, and nothing told
        op = {"Authorization": "Bearer op"}
        assert http.get("/v1/status", headers=op).json()["history"][0]["state"] == "open"
        task = http.get("/v1/round", headers=ha).json()
        assert (task["round"], task["state"], task["deadline_s"]) == (0, "open", 0.0)
        assert http.get("/v1/global", headers=op).json()["round"] == 0
        assert http.get("/v1/round", params={"wait": 0.2}, headers=ha).json()["round"] == 0
        assert stored_states(db) == ["open"]
        app.state.events.wake()
        wait_for(lambda: stored_states(db)[0] == "merged", what="the deadline task to close round 0")
        assert http.get("/v1/status", headers=op).json()["history"][0]["closed_at"] == 1000.0 + 3600.5


def test_a_task_carries_the_strategys_perturbation_rule(tmp_path):
    for strategy, perturb in (("fedbpt", True), ("fedavg-z", False), ("fedbpt-noperturb", False)):
        with live(config(strategy=strategy), tmp_path / f"{strategy}.db") as http:
            task = http.get("/v1/round", headers=register(http, "a")).json()
            assert task["perturb"] is perturb, strategy


def test_a_merge_that_raises_fails_its_round_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(self, updates):
        raise FloatingPointError("injected fault")

    with live(config(), tmp_path / "run.db") as http:
        h = register(http, "a")
        monkeypatch.setattr(FedBPTStrategy, "merge", broken)
        play(http, "a", 0, h)  # accepted: the fault is the aggregator's, not the client's
        monkeypatch.undo()
        task = http.get("/v1/round", headers=h).json()
        assert task["round"] == 1 and mean_of(task["mean"]).tolist() == [0.0] * D and task["sigma"] == 1.0
        play(http, "a", 0, h)
        assert [r["state"] for r in http.get("/v1/status").json()["history"]] == ["failed", "merged"]


CLIENTS = ("a", "b", "c")


def run_to_end(http: httpx.Client, heads: dict) -> dict:
    for _ in range(10):
        status = http.get("/v1/status").json()
        if status["state"] == "done":
            return status | {"global": http.get("/v1/global", headers=heads["a"]).json()}
        for k, cid in enumerate(CLIENTS):
            if not http.get("/v1/round", headers=heads[cid]).json()["submitted"]:
                play(http, cid, k, heads[cid])
    raise AssertionError("the run did not end")


def test_restart_mid_round_matches_an_uninterrupted_run(tmp_path):
    cfg = config(min_clients=3, rounds=3)
    with live(cfg, tmp_path / "straight.db") as http:
        heads = {cid: register(http, cid) for cid in CLIENTS}
        straight = run_to_end(http, heads)

    db = tmp_path / "restarted.db"
    with live(cfg, db) as http:
        heads = {cid: register(http, cid) for cid in CLIENTS}
        for k, cid in enumerate(CLIENTS):
            play(http, cid, k, heads[cid])
        accepted = play(http, "a", 0, heads["a"])  # round 1, one of three
        assert accepted["round"] == 1
        task = http.get("/v1/round", headers=heads["a"]).json()
        resend = body(1, mean_of(task["mean"]) + np.eye(D)[1] * 0.1, fitness=0.11)
    with live(cfg, db) as http:  # a new process's worth of state: everything comes from the database
        assert http.post("/v1/round/update", json=resend, headers=heads["a"]).json()["duplicate"] is True
        status = http.get("/v1/status").json()
        assert status["history"][1]["reporters"] == ["a"] and status["state"] == "running"
        restarted = run_to_end(http, heads)

    assert restarted["global"]["mean"] == straight["global"]["mean"]
    assert restarted["global"]["sigma"] == straight["global"]["sigma"]
    keys = ("state", "reporters", "sigma_before", "sigma_merged", "sigma_after", "local_sigma", "val_accuracy")
    assert [{k: r[k] for k in keys} for r in restarted["history"]] == [
        {k: r[k] for k in keys} for r in straight["history"]
    ]


def test_sigkill_loses_no_accepted_update(tmp_path):
    db = tmp_path / "run.db"

    def start() -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aggregator",
                "--db",
                str(db),
                "--port",
                str(port),
                "--intrinsic-dim",
                str(D),
                "--min-clients",
                "2",
                "--rounds",
                "2",
                "--seed",
                "1",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"

        def up():
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200

        wait_for(up, what="the aggregator process to start")
        return proc, url

    proc, url = start()
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            heads = {cid: register(http, cid) for cid in ("a", "b")}
            play(http, "a", 0, heads["a"])
            sent = body(0, np.eye(D)[0] * 0.1, fitness=0.1)  # what `play` sent for a in round 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    proc, url = start()
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/v1/status").json()["history"][0]["reporters"] == ["a"]
            assert http.post("/v1/round/update", json=sent, headers=heads["a"]).json()["duplicate"] is True
            play(http, "b", 1, heads["b"])
            assert http.get("/v1/round", headers=heads["a"]).json()["round"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_bytes_up_and_down_are_the_client_bodies(tmp_path):
    with live(config(rounds=1), tmp_path / "run.db", enroll_key="op", operator_key="boss") as http:
        sent = received = 0

        def count(r: httpx.Response) -> httpx.Response:
            nonlocal sent, received
            sent += len(r.request.content)
            received += len(r.content)
            return r

        r = count(
            http.post("/v1/clients", json={"client_id": "a", "num_samples": 3}, headers={"Authorization": "Bearer op"})
        )
        h = {"Authorization": f"Bearer {r.json()['token']}"}
        for _ in range(3):  # the operator watching the run: not the federation's traffic
            assert http.get("/v1/global", headers={"Authorization": "Bearer boss"}).status_code == 200
        for junk in ({}, {"Authorization": "Bearer forged"}):  # unauthenticated: turned away before the body
            assert http.post("/v1/round/update", content=b"x" * 5000, headers=junk).status_code == 401
            assert http.post("/v1/clients", content=b"x" * 5000, headers=junk).status_code == 401
        count(http.get("/v1/round", headers=h))
        count(http.post("/v1/round/update", json=body(0, np.zeros(D)), headers=h))
        count(http.post("/v1/round/update", json={"round": 0}, headers=h))  # a 422 crosses the link too
        count(http.get("/v1/global", headers=h))
        (r0,) = http.get("/v1/status", headers={"Authorization": "Bearer boss"}).json()["history"]
        assert (r0["bytes_up"], r0["bytes_down"]) == (sent, received)


@pytest.mark.parametrize("strategy", ["local-only", "fedavg-z", "centralized"])
def test_baselines_run_over_http(tmp_path, strategy):
    n_clients = 1 if strategy == "centralized" else 2
    with live(config(strategy=strategy, min_clients=n_clients), tmp_path / "run.db") as http:
        heads = {cid: register(http, cid) for cid in CLIENTS[:n_clients]}
        for _ in range(2):
            for k, cid in enumerate(heads):
                play(http, cid, k, heads[cid])
        glob = http.get("/v1/global", headers=heads["a"]).json()
        assert glob["state"] == "done"
        mean = mean_of(glob["mean"])
        if strategy == "local-only":
            assert mean.tolist() == [0.0] * D and sorted(glob["client_means"]) == ["a"]
            assert mean_of(glob["client_means"]["a"])[[0, 1]] == pytest.approx([0.1, 0.1])
        elif strategy == "fedavg-z":
            expected = np.zeros(D)
            for t in range(2):  # every update counts 10 samples: equal weights
                expected = expected + (0.1 * np.eye(D)[t] + 0.2 * np.eye(D)[(t + 1) % D]) / 2
            np.testing.assert_allclose(mean, expected, atol=1e-6)
            assert glob["sigma"] == pytest.approx(0.8)
        else:
            np.testing.assert_allclose(mean, [0.1, 0.1] + [0.0] * (D - 2), atol=1e-6)


def test_cli_flags_build_the_config_and_a_stored_run_wins(tmp_path, caplog):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    db = tmp_path / "sst2.db"
    args = parser.parse_args(
        [
            "--db",
            str(db),
            "--strategy",
            "fedbpt-noperturb",
            "--rounds",
            "3",
            "--round-timeout",
            "5",
            "--sigma-rule",
            "paper-eq6",
            "--participation",
            "0.5",
        ]
    )
    cfg = config_from_args(args)
    assert (
        cfg.run_id,
        cfg.strategy,
        cfg.perturb,
        cfg.rounds,
        cfg.round_timeout_s,
        cfg.sigma_rule,
        cfg.participation,
    ) == ("sst2", "fedbpt-noperturb", False, 3, 5.0, "paper-eq6", 0.5)
    assert (args.host, args.port) == ("127.0.0.1", 8100)
    store = Store(str(db))
    store.save_config(cfg)
    store.close()
    with caplog.at_level(logging.WARNING, logger="aggregator"):
        assert config_from_args(parser.parse_args(["--db", str(db), "--rounds", "7"])) == cfg
    assert "rounds=7" in caplog.text
