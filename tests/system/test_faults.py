"""Faults in a live federated run: servers killed and restarted, clients killed and restarted, clients that
never report. Real servers on loopback and real CMA-ES clients, over a tiny Llama built here: the faults are under
test, not the model, and a forward of it costs nothing next to a process start. Faults are real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from aggregator.app import create_app as create_aggregator
from fed_clients.aggregator_client import AggregatorClient
from fed_clients.data import client_shard, load_splits
from fed_clients.service_client import ServiceClient
from fed_clients.session import run_client
from fed_clients.tasks import get_task
from fedbpt import launch
from fedbpt.launch import spawn, wait_healthy
from fedbpt.loopback import free_port, serve_app
from fedbpt_wire.federation import RunConfig
from inference_service.app import create_app as create_service
from inference_service.auth import KeyStore
from inference_service.limits import Limits
from inference_service.torch_engine import TorchEngine

from ..aggregator.test_aggregator import Clock, body, register, wait_for

ROOT = Path(__file__).resolve().parents[2]
SVC_KEY, ENROLL = "svc-key", "enroll"
SEED = 3
# Small enough for a few seconds per round on 2 cores; every client still runs real CMA-ES over the service.
RUN = dict(
    rounds=3,
    intrinsic_dim=16,
    prompt_length=2,
    local_popsize=4,
    local_iterations=2,
    min_clients=2,
    round_timeout_s=300,
    seed=SEED,
)
AGG_FLAGS = [
    "--rounds",
    "3",
    "--intrinsic-dim",
    "16",
    "--prompt-length",
    "2",
    "--local-popsize",
    "4",
    "--local-iterations",
    "2",
    "--min-clients",
    "2",
    "--round-timeout",
    "300",
    "--seed",
    str(SEED),
    "--run-id",
    "faults",
]
BATCH = 4
# The tiny tokenizer spends a token on every few characters of a review; rotary positions have no end.
LIMITS = Limits(max_text_tokens=512)
MAX_TEXT_TOKENS = ["--max-text-tokens", str(LIMITS.max_text_tokens)]
# One-token words of the tiny vocabulary in place of the task's own.
TASK = get_task("rotten_tomatoes").with_label_words((" bad", " great"))
LABEL_WORDS = ["--label-words", " bad, great"]
# Long enough to outlast a server's restart (the service loads a model) under a loaded CI machine.
PATIENT = dict(retries=40, backoff=0.25, max_backoff=2.0, timeout=120.0)


@pytest.fixture(scope="module")
def service_url(tiny_llama_dir):
    engine = TorchEngine(str(tiny_llama_dir), dtype="float32", limits=LIMITS)
    with serve_app(create_service(engine, KeyStore({SVC_KEY: None}), LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def shards(default_data_dir):
    train = load_splits("default", get_task("rotten_tomatoes"))["train"]
    return [client_shard(train, k, 2, alpha=0.5, seed=0, per_class=6) for k in range(2)]


@contextlib.contextmanager
def process(argv: list[str], url: str, log: Path, timeout: float = 120.0):
    """A server process of this repository, up once `url`/healthz answers 200; SIGKILLed on exit if still alive."""
    proc = start_process(argv, url, log, timeout)
    try:
        yield proc
    finally:
        stop(proc)


def start_process(argv: list[str], url: str, log: Path, timeout: float = 120.0) -> subprocess.Popen:
    """`python -m argv...` of this repository, once `url`/healthz answers."""
    proc = spawn(argv[1:], log, {"PYTHONPATH": str(ROOT), "FEDBPT_API_KEYS": SVC_KEY}, module=argv[0], cwd=ROOT)
    wait_healthy(url, proc, log, timeout)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    launch.stop(proc, sig)


def status(url: str) -> dict:
    return httpx.get(f"{url}/v1/status", timeout=60).json()


def final_state(url: str) -> dict:
    g = httpx.get(f"{url}/v1/global", headers={"Authorization": f"Bearer {ENROLL}"}, timeout=60).json()
    return {"mean": g["mean"], "sigma": g["sigma"]}


def run_threads(service_url: str, agg_url: str, shards, aggregator_client=AggregatorClient, **service_http) -> list:
    """One thread per client, each the real `run_client` loop; returns their service clients."""
    errors, services = [], []

    def work(k):
        service = ServiceClient(service_url, SVC_KEY, **service_http)
        services.append(service)
        try:
            run_client(
                service,
                aggregator_client(agg_url, **PATIENT),
                f"client-{k}",
                shards[k],
                TASK,
                enroll_key=ENROLL,
                batch_size=BATCH,
                max_idle_s=300,
            )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    assert not errors, errors
    return services


HISTORY_KEYS = (
    "round",
    "state",
    "reporters",
    "sigma_before",
    "sigma_merged",
    "sigma_after",
    "local_sigma",
    "val_accuracy",
    "val_loss",
    "queries",
    "sequences",
)


def history(url: str) -> list[dict]:
    return [{k: r[k] for k in HISTORY_KEYS} for r in status(url)["history"]]


class SecondSubmitsLast(AggregatorClient):
    """From round 1 on, client-1 sends its update only once client-0's is in: a window in which the open round
    holds exactly one accepted update. `in_window(round)`, where given, runs in it. Fault injection, not behaviour."""

    def __init__(self, url: str, in_window=None, **http_options):
        super().__init__(url, **http_options)
        self.in_window = in_window

    def submit(self, update):
        if update.round >= 1 and self.http.http.headers.get("X-Who") == "client-1":

            def first_in():
                with contextlib.suppress(httpx.HTTPError, IndexError):
                    return "client-0" in status(str(self.http.http.base_url))["history"][update.round]["reporters"]

            wait_for(first_in, timeout=600, what="client-0's update")
            if self.in_window is not None:
                self.in_window(update.round)
        return super().submit(update)

    def register(self, client_id, num_samples, enroll_key=None, token=None):
        self.http.http.headers["X-Who"] = client_id
        return super().register(client_id, num_samples, enroll_key, token=token)


def test_aggregator_sigkilled_mid_round_ends_as_an_uninterrupted_run(service_url, shards, tmp_path):
    """SIGKILL with one of two updates accepted in round 1: the restarted aggregator keeps it, the other
    client's late update lands through its retries, and the run ends where an uninterrupted one ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["aggregator", "--port", str(port), "--enroll-key", ENROLL, *AGG_FLAGS]

    with process([*argv, "--db", str(tmp_path / "straight.db")], url, tmp_path / "straight.log"):
        run_threads(service_url, url, shards, SecondSubmitsLast)
        straight, straight_final = history(url), final_state(url)

    db = tmp_path / "killed.db"
    procs = [start_process([*argv, "--db", str(db)], url, tmp_path / "killed.log")]
    restarts: list[threading.Thread] = []

    def kill_in_round_1(round_: int) -> None:
        if round_ != 1:
            return
        assert status(url)["history"][1]["reporters"] == ["client-0"]
        stop(procs[0])
        # Restarted in the background: client-1's update meets a closed port first and lands through its retries.
        restarts.append(
            threading.Thread(
                target=lambda: procs.append(start_process([*argv, "--db", str(db)], url, tmp_path / "killed.log"))
            )
        )
        restarts[0].start()

    try:
        run_threads(service_url, url, shards, lambda u, **kw: SecondSubmitsLast(u, kill_in_round_1, **kw))
        for t in restarts:
            t.join(timeout=300)
        assert len(procs) == 2, "the aggregator was not killed and restarted mid-round"
        assert procs[0].returncode == -signal.SIGKILL
        restarted, restarted_final = history(url), final_state(url)
    finally:
        for p in procs:
            stop(p)

    assert [r["state"] for r in straight] == ["merged"] * 3
    assert all(r["reporters"] == ["client-0", "client-1"] for r in straight)
    assert restarted == straight
    assert restarted_final == straight_final


class KillsTheServiceInRound1(AggregatorClient):
    """client-0, handed its round-1 task, SIGKILLs the service and restarts it in the background before it
    starts the round's work: the round's scoring meets a dead service first. Fault injection, not behaviour."""

    def __init__(self, url: str, kill, **http_options):
        super().__init__(url, **http_options)
        self.kill = kill

    def round(self, wait: float = 0.0):
        task = super().round(wait)
        if (
            task.round == 1
            and task.selected
            and not task.submitted
            and self.http.http.headers.get("X-Who") == "client-0"
        ):
            self.kill()
        return task

    def register(self, client_id, num_samples, enroll_key=None, token=None):
        self.http.http.headers["X-Who"] = client_id
        return super().register(client_id, num_samples, enroll_key, token=token)


def test_service_killed_and_restarted_mid_run_clients_resume_through_retries(tiny_llama_dir, shards, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        "fedbpt.cli",
        "serve",
        "--model",
        str(tiny_llama_dir),
        "--dtype",
        "float32",
        "--port",
        str(port),
        *MAX_TEXT_TOKENS,
        "--metrics-public",
    ]
    cfg = RunConfig(run_id="service-restart", **RUN)
    procs = [start_process(argv, url, tmp_path / "service.log")]
    restarts: list[threading.Thread] = []
    lock = threading.Lock()

    def kill() -> None:
        with lock:
            if restarts:
                return
            stop(procs[0])
            restarts.append(
                threading.Thread(target=lambda: procs.append(start_process(argv, url, tmp_path / "service.log")))
            )
            restarts[0].start()

    with serve_app(create_aggregator(cfg, str(tmp_path / "agg.db"), enroll_key=ENROLL)) as agg_url:
        try:
            services = run_threads(
                url, agg_url, shards, lambda u, **kw: KillsTheServiceInRound1(u, kill, **kw), **PATIENT
            )
            for t in restarts:
                t.join(timeout=300)
            final = status(agg_url)
            served_after = httpx.get(f"{url}/metrics", timeout=60).text
        finally:
            for p in procs:
                stop(p)

    assert len(procs) == 2 and procs[0].returncode == -signal.SIGKILL
    assert final["state"] == "done"
    assert [r["state"] for r in final["history"]] == ["merged"] * 3
    assert all(r["reporters"] == ["client-0", "client-1"] for r in final["history"])
    # The new process answered score requests: the clients carried on against it, not around it.
    score_200 = [
        line
        for line in served_after.splitlines()
        if line.startswith("fedbpt_requests_total") and 'endpoint="/v1/score"' in line and 'status="200"' in line
    ]
    assert score_200 and float(score_200[0].split()[-1]) > 0, served_after[:2000]
    # Each client's query count is what the aggregator metered, retries included only where a body came back.
    assert sum(s.costs.queries for s in services) == sum(r["queries"] for r in final["history"])


def hold_updates_from_round(app, round_: int) -> threading.Event:
    """Updates for `round_` and later wait at the aggregator until the returned event is set, so that round
    stays open however fast the clients are. Fault injection timing, not behaviour."""
    coordinator, release = app.state.coordinator, threading.Event()
    submit = coordinator.submit

    def held(authorization, req):
        if req.round >= round_:
            assert release.wait(timeout=600), "updates held for good"
        return submit(authorization, req)

    coordinator.submit = held
    return release


def test_killed_client_restarts_and_rejoins(service_url, tmp_path):
    cfg = RunConfig(run_id="client-restart", **RUN)
    app = create_aggregator(cfg, str(tmp_path / "agg.db"), enroll_key=ENROLL)
    release = hold_updates_from_round(app, 1)
    with serve_app(app) as agg_url:

        def client(k: int, log: Path) -> subprocess.Popen:
            argv = [
                sys.executable,
                "-m",
                "fedbpt.cli",
                "client",
                "--service",
                service_url,
                "--api-key",
                SVC_KEY,
                "--aggregator",
                agg_url,
                "--enroll-key",
                ENROLL,
                "--partition",
                f"{k}/2",
                "--alpha",
                "0.5",
                "--per-class",
                "6",
                "--batch-size",
                str(BATCH),
                *LABEL_WORDS,
            ]
            with open(log, "ab") as out:
                return subprocess.Popen(
                    argv,
                    cwd=tmp_path,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )

        logs = [tmp_path / "client-0.log", tmp_path / "client-1.log"]
        procs = [client(0, logs[0]), client(1, logs[1])]
        try:
            wait_for(lambda: len(status(agg_url)["history"]) > 1, timeout=600, what="round 1 to open")
            stop(procs[1])  # round 1 cannot close before the release: the kill lands mid-run
            rejoined = client(1, logs[1])
            procs.append(rejoined)
            release.set()
            for p in (procs[0], rejoined):
                assert p.wait(600) == 0, (
                    f"client exited with {p.returncode}: {logs[0].read_text()[-1500:]}{logs[1].read_text()[-1500:]}"
                )
            final = status(agg_url)
        finally:
            release.set()
            for p in procs:
                stop(p)

    assert procs[1].returncode == -signal.SIGKILL
    assert final["state"] == "done"
    assert [r["state"] for r in final["history"]] == ["merged"] * 3
    # The restarted client re-registered under its id and took its place in the rounds after the kill.
    assert all(r["reporters"] == ["client-0", "client-1"] for r in final["history"])


def test_thirty_percent_silent_clients_every_round_closes_at_its_deadline(tmp_path):
    """10 clients sampled each round, 3 never report: each round stays open with the 7 updates in, and closes
    with them when the (logical) clock reaches its deadline."""
    timeout, clock = 1.5, Clock()
    cfg = RunConfig(
        run_id="silent",
        intrinsic_dim=8,
        rounds=3,
        seed=1,
        min_clients=10,
        min_updates=5,
        participation=1.0,
        round_timeout_s=timeout,
    )
    ids = [f"c{i}" for i in range(10)]
    silent = set(ids[7:])
    with (
        serve_app(create_aggregator(cfg, str(tmp_path / "agg.db"), clock=clock)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        heads = {cid: register(http, cid) for cid in ids}
        for rnd in range(cfg.rounds):
            task = wait_for(
                lambda rnd=rnd: (t := http.get("/v1/round", headers=heads["c0"]).json())["round"] == rnd and t,
                what=f"round {rnd} to open",
            )
            assert task["selected"]
            mean = np.zeros(8)
            for k, cid in enumerate(ids):
                if cid not in silent:
                    r = http.post(
                        "/v1/round/update",
                        headers=heads[cid],
                        json=body(rnd, mean + 0.01 * (k + 1), fitness=0.5 - 0.01 * k),
                    )
                    assert r.status_code == 200, r.text
            assert http.get("/v1/status").json()["history"][rnd]["state"] == "open"
            clock.now += timeout
        wait_for(lambda: http.get("/v1/status").json()["state"] == "done", what="the run to end")
        final = http.get("/v1/status").json()

    for rnd, rec in enumerate(final["history"]):
        assert rec["state"] == "merged"
        assert rec["selected"] == ids and rec["reporters"] == ids[:7]
        # Closed by its deadline, which only the clock could bring: nothing else could close it.
        assert (rec["opened_at"], rec["closed_at"]) == (1000.0 + rnd * timeout, 1000.0 + (rnd + 1) * timeout)
