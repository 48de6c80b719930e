"""What one key can do to the inference service, and no more (issue 11): bounded work, interleaving, cancellation.

Real service app under uvicorn on 127.0.0.1 with the tiny RoBERTa in float32. `Counted` wraps the engine to
count (and, where a test needs it, hold until a condition or slow down) its score calls: an instrument and a fault,
the engine itself is real. Tests wait on conditions (events, /metrics, the key's quota), never on the clock; the one
sleep left is the slow engine of the deadline test, whose subject is time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from fedbpt.loopback import serve_app
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.engine import ScoreBatch
from inference_service.limits import Limits, TokenRate, plan_slices
from inference_service.torch_engine import TorchEngine

from .test_service import body

WORDS = [" bad", " great"]
# 16 texts x (L 16 + ~8) positions per candidate: over the 64-position slices, so every text is a slice.
LIMITS = Limits(
    max_prompt_length=16,
    max_population=8,
    max_texts=16,
    max_text_tokens=48,
    max_batch_tokens=64,
    max_request_tokens=4000,
)


class Counted:
    """The real engine, its score calls counted and optionally each delayed by `delay` seconds."""

    def __init__(self, engine, delay: float = 0.0, gate: threading.Event | None = None):
        self.engine, self.delay, self.info = engine, delay, engine.info
        self.calls = 0
        self.started = threading.Event()
        self.gate = gate  # where given, every call waits for it to open

    def label_token_ids(self, words):
        return self.engine.label_token_ids(words)

    def token_embeddings(self, ids):
        return self.engine.token_embeddings(ids)

    def positions(self, texts, prompt_length):
        return self.engine.positions(texts, prompt_length)

    def score(self, batch):
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the engine's gate"
        time.sleep(self.delay)
        return self.engine.score(batch)


@pytest.fixture(scope="module")
def engine(tiny_roberta_dir):
    return TorchEngine(str(tiny_roberta_dir), dtype="float32", device="cpu", limits=LIMITS)


def big(n_pop=8, n_texts=16, n_prompt=16) -> dict:
    prompts = np.random.default_rng(0).standard_normal((n_pop, n_prompt, 48)).astype(np.float32) * 0.05
    return body(prompts, [f"review {i} : it was {{mask}} ." for i in range(n_texts)], WORDS)


def small() -> dict:
    return body(np.zeros((1, 1, 48), np.float32), ["it was {mask} ."], WORDS)


def post(url, payload, key, timeout=120.0):
    return httpx.post(f"{url}/v1/score", json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def test_plan_slices_by_hand():
    # A candidate's texts fit: whole candidates, as many as the budget holds.
    assert plan_slices(5, [3, 4], 14) == [
        (slice(0, 2), slice(0, 2)),
        (slice(2, 4), slice(0, 2)),
        (slice(4, 5), slice(0, 2)),
    ]
    # They do not: one candidate at a time, its texts in runs under the budget; an overlong text alone.
    assert plan_slices(2, [3, 4, 9, 2], 8) == [
        (slice(0, 1), slice(0, 2)),
        (slice(0, 1), slice(2, 3)),
        (slice(0, 1), slice(3, 4)),
        (slice(1, 2), slice(0, 2)),
        (slice(1, 2), slice(2, 3)),
        (slice(1, 2), slice(3, 4)),
    ]


def test_token_rate_window():
    now = [0.0]
    rate = TokenRate(100, clock=lambda: now[0])
    assert rate.charge("a", 60) is None and rate.charge("b", 100) is None
    assert rate.charge("a", 50) == pytest.approx(60.0)  # refused, not counted
    now[0] = 30.0
    assert rate.charge("a", 40) is None and rate.charge("a", 1) == pytest.approx(30.0)
    now[0] = 60.0
    assert rate.charge("a", 100) is None  # a new minute


def test_the_maximal_request_is_refused_before_any_work(engine):
    counted = Counted(engine)
    keys = KeyStore({"k": 10})
    limits = Limits(**{**LIMITS.__dict__, "max_request_tokens": 2000})
    with serve_app(create_app(counted, keys, limits)) as url:
        info = httpx.get(f"{url}/v1/model").json()
        assert info["max_request_tokens"] == 2000 and info["max_request_seconds"] == LIMITS.max_request_seconds
        # Every dimension at its published maximum at once: P 8 x N 16 x (L 16 + 1) = 2176 > 2000.
        r = post(url, big(), "k")
        assert r.status_code == 413 and "request budget of 2000" in r.json()["detail"], r.text
        # Under the per-dimension limits and that floor, but over the budget once tokenized (long texts).
        long_texts = body(np.zeros((8, 16, 48), np.float32), ["word " * 20 + "{mask}"] * 6, WORDS)
        r = post(url, long_texts, "k")
        assert r.status_code == 413 and "it takes" in r.json()["detail"], r.text
    assert counted.calls == 0 and keys.usage("k") == (2, 10)  # charged, though nothing ran


def test_a_request_at_the_limits_under_the_budget_is_scored_in_slices_as_a_whole(engine):
    counted = Counted(engine)
    payload = big(n_pop=8, n_texts=8, n_prompt=16)  # ~8 x 8 x 24 positions, under 4000
    with serve_app(create_app(counted, KeyStore({"k": None}), LIMITS)) as url:
        r = post(url, payload, "k")
    assert r.status_code == 200, r.text
    from fedbpt_wire.schemas import Tensor
    from fedbpt_wire.tensors import decode_tensor

    got = decode_tensor(Tensor(**r.json()["logits"]))
    prompts = decode_tensor(Tensor(**payload["prompts"]))
    whole = engine.score(ScoreBatch(prompts, payload["texts"], WORDS)).logits
    assert counted.calls > 1 and got.shape == (8, 8, 2)
    np.testing.assert_allclose(got, whole, rtol=1e-4, atol=1e-5)


class HeldUntilQueued(Counted):
    """The real engine, logging which request each call serves ("heavy": an 8-token prompt, "light": a 1-token one),
    and holding the heavy request from its second slice on until the light request is scored up to its first engine
    turn (its positions counted: what is left before the turn is the event loop's own work). So the light request
    waits for a turn while the heavy one has most of its slices to go, on any machine, however loaded."""

    def __init__(self, engine):
        super().__init__(engine)
        self.log: list[str] = []
        self.light_ready = threading.Event()

    def positions(self, texts, prompt_length):
        result = super().positions(texts, prompt_length)
        if prompt_length == 1:
            self.light_ready.set()
        return result

    def score(self, batch):
        kind = "light" if batch.prompts.shape[1] == 1 else "heavy"
        self.log.append(kind)
        if kind == "heavy" and len(self.log) > 1:
            assert self.light_ready.wait(60), "the light request never reached the engine's queue"
        return super().score(batch)


def test_a_long_request_does_not_starve_another_key(engine):
    held = HeldUntilQueued(engine)
    with (
        serve_app(create_app(held, KeyStore({"heavy": None, "light": None}), LIMITS)) as url,
        ThreadPoolExecutor(1) as pool,
    ):
        heavy = pool.submit(post, url, big(n_pop=8, n_texts=16, n_prompt=8), "heavy")
        assert held.started.wait(60)
        assert post(url, small(), "light").status_code == 200
        assert heavy.result().status_code == 200
    # The light request's one slice took a turn right after the heavy slice that ran when it queued (or the one after,
    # where that one had already asked for its turn): a request waits for the running slice plus one turn per other
    # active key, not for the whole of another key's request.
    first_light = held.log.index("light")
    assert held.log.count("light") == 1 and first_light <= 3, held.log[:8]
    assert held.log.count("heavy") - first_light >= 32, "the heavy request should have had most of its slices to go"


def test_a_client_that_goes_away_stops_its_request(engine):
    gate = threading.Event()
    counted = Counted(engine, gate=gate)
    slices = 8 * 16
    with serve_app(create_app(counted, KeyStore({"k": None}), LIMITS)) as url:
        # The first slice is held in the engine until the client has gone: no race with the machine's speed.
        with pytest.raises(httpx.TimeoutException):
            post(url, big(n_pop=8, n_texts=16, n_prompt=8), "k", timeout=0.5)
        assert counted.started.is_set()
        gate.set()
        # The request ends once the service sees the client gone (499), at the next slice boundary.
        end = time.monotonic() + 60
        while 'status="499"} 1.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < end, "the request did not stop after its client went away"
            time.sleep(0.05)
        assert counted.calls <= 2 < slices


def test_a_request_past_its_deadline_is_stopped_with_503(engine):
    counted = Counted(engine, delay=0.05)
    limits = Limits(**{**LIMITS.__dict__, "max_request_seconds": 0.01})
    with serve_app(create_app(counted, KeyStore({"k": None}), limits)) as url:
        r = post(url, big(n_pop=2, n_texts=16, n_prompt=8), "k")
    assert r.status_code == 503 and "deadline" in r.json()["detail"] and counted.calls < 2 * 16


def test_positions_per_minute_per_key(engine):
    limits = Limits(**{**LIMITS.__dict__, "max_key_tokens_per_minute": 500})
    with serve_app(create_app(engine, KeyStore({"a": None, "b": None}), limits)) as url:
        assert post(url, big(n_pop=2, n_texts=8, n_prompt=8), "a").status_code == 200  # ~2 x 8 x 17 positions
        r = post(url, big(n_pop=2, n_texts=8, n_prompt=8), "a")
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "per minute" in r.json()["detail"]
        assert post(url, big(n_pop=2, n_texts=8, n_prompt=8), "b").status_code == 200  # another key's own minute


def test_strangers_are_turned_away_before_their_body_is_read(engine):
    with serve_app(create_app(engine, KeyStore({"k": 1}), LIMITS)) as url:
        junk = b"{" * 2_000_000  # parsing it would be a 422; reading it, a 413 past the body limit
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(f"{url}/v1/score", content=junk, headers=headers, timeout=30)
            assert r.status_code == 401 and "API key" in r.json()["detail"]
        assert post(url, small(), "k").status_code == 200
        r = httpx.post(f"{url}/v1/score", content=junk, headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 429 and "quota" in r.json()["detail"]  # spent: refused before the body too


def test_metrics_take_the_operator_key(engine):
    with serve_app(create_app(engine, KeyStore({"k": None}), LIMITS, operator_key="op")) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k"}).status_code == 401
        assert "fedbpt_requests_total" in httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer op"}).text
    with serve_app(create_app(engine, KeyStore({"k": None}), LIMITS, operator_key="op", metrics_public=True)) as url:
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_sigterm_ends_a_long_request_and_the_server(tiny_roberta_dir, tmp_path):
    import signal

    from fedbpt.loopback import free_port

    from ..aggregator.test_aggregator import wait_for
    from ..system.test_faults import SVC_KEY, start_process

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        "fedbpt.cli",
        "serve",
        "--model",
        str(tiny_roberta_dir),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-batch-tokens",
        "32",
        "--max-request-tokens",
        str(10**7),
        "--max-texts",
        "256",
        "--shutdown-timeout",
        "1",
        # One query: the long request spends it when admitted, which a probe sees (below) without spending anything.
        "--quota",
        "1",
    ]
    proc = start_process(argv, url, tmp_path / "service.log")
    try:
        with ThreadPoolExecutor(1) as pool:
            # ~16k one-text slices: minutes of work, the kind of request that used to hold SIGTERM for its whole run
            payload = body(np.zeros((64, 16, 48), np.float32), [f"text {i} {{mask}}" for i in range(256)], WORDS)
            pending = pool.submit(post, url, payload, SVC_KEY, 600)

            def admitted() -> bool:
                # An empty body is refused (422) before the handler charges anything, until the long request has
                # spent the key's quota: from then on the gate refuses the key before reading the body (429).
                probe = httpx.post(f"{url}/v1/score", json={}, headers={"Authorization": f"Bearer {SVC_KEY}"})
                assert probe.status_code in (422, 429), probe.text
                return probe.status_code == 429

            wait_for(admitted, what="the long request to be admitted and charged")
            assert not pending.done()
            proc.send_signal(signal.SIGTERM)
            # uvicorn re-raises the signal once it has shut down, so a clean stop reads as "killed by SIGTERM".
            assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
            assert "Finished server process" in (tmp_path / "service.log").read_text()
            with pytest.raises(httpx.HTTPError):  # cancelled with the server: the connection closes unanswered
                pending.result().raise_for_status()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_every_limit_has_a_serve_flag_that_reaches_the_service():
    import argparse
    from dataclasses import fields

    from inference_service.server import add_arguments, limits_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert {f.name for f in fields(Limits)} <= {action.dest for action in parser._actions}
    assert limits_from(parser.parse_args([])) == Limits()
    argv, expected = [], {}
    for i, f in enumerate(fields(Limits)):
        value = 0.5 + i if f.name == "max_request_seconds" else 7 + i
        argv += ["--" + f.name.replace("_", "-"), str(value)]
        expected[f.name] = value
    assert limits_from(parser.parse_args(argv)) == Limits(**expected)


def test_the_service_applies_its_body_timeout_and_refuses_bodies_where_a_route_takes_none(engine):
    from tests.aggregator.test_connections import raw, response

    app = create_app(engine, KeyStore({"k": None}), body_timeout=1.0)
    with serve_app(app) as url:
        with raw(url) as sock:
            sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 31457280\r\n\r\n")
            answer = response(sock, timeout=5)
        assert b"413" in answer.split(b"\r\n")[0] and b"/healthz takes no request body" in answer
        with raw(url) as sock:
            sock.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 500\r\n\r\n{"
            )
            t0 = time.monotonic()
            answer = response(sock, timeout=30)
        assert b"408" in answer.split(b"\r\n")[0] and time.monotonic() - t0 < 10.0


def test_slice_budget_follows_the_engines_measured_speed():
    from inference_service.limits import SliceBudget

    budget = SliceBudget(Limits(max_batch_tokens=8192, max_slice_seconds=0.5))
    assert budget.tokens == 8192  # nothing measured yet: the ceiling
    budget.observe(8192, 5000.0)  # 1,638 positions/s, the two-core machine of issue 24
    assert budget.tokens == 819
    budget.observe(8192, 5.0)  # a GPU's speed: capped at the ceiling
    budget.observe(8192, 5.0)
    assert budget.tokens == 8192
    slow = SliceBudget(Limits(max_batch_tokens=8192, max_slice_seconds=0.5))
    slow.observe(100, 10_000.0)
    assert slow.tokens == SliceBudget.FLOOR
    assert SliceBudget(Limits(max_slice_seconds=0)).tokens == Limits().slice_tokens


class SlowReporting(Counted):
    """The real engine, reporting each call as if it had taken `seconds` (an injected slow machine)."""

    def __init__(self, engine, seconds: float):
        super().__init__(engine)
        self.seconds = seconds

    def score(self, batch):
        result = super().score(batch)
        return dataclasses.replace(result, engine_ms=self.seconds * 1e3)


def test_turns_shrink_where_the_engine_is_slow(engine):
    """On a slow engine a request is cut into more, shorter turns, so another key waits for less."""
    limits = Limits(**{**LIMITS.__dict__, "max_batch_tokens": 4096, "max_slice_seconds": 0.5})
    slow = SlowReporting(engine, seconds=5.0)
    with serve_app(create_app(slow, KeyStore({"k": None}), limits)) as url:
        payload = big(n_pop=8, n_texts=16, n_prompt=8)
        assert post(url, payload, "k").status_code == 200
        first = slow.calls
        assert post(url, payload, "k").status_code == 200
        second = slow.calls - first
    # The first request was planned before any measurement: whole 4,096-position turns; the second in turns of
    # the floor, since each turn "took" 5 s.
    assert first < second


class Failing(Counted):
    """The real engine, failing every call (an injected engine fault)."""

    def score(self, batch):
        super().score(batch)
        raise RuntimeError("injected engine failure")


def test_an_engine_that_fails_leaves_the_keys_usage_unchanged(engine):
    keys = KeyStore({"k": 5})
    with serve_app(create_app(Failing(engine), keys, LIMITS)) as url:
        r = post(url, small(), "k")
        assert r.status_code == 500 and "injected" not in r.text  # no internals in the answer
        assert keys.usage("k") == (0, 5)  # charged before the work, refunded when the engine failed


def test_a_trailing_slash_on_score_is_404_not_a_redirect(engine):
    headers = {"Authorization": "Bearer k", "Host": "attacker.example"}
    with serve_app(create_app(engine, KeyStore({"k": None}), LIMITS)) as url:
        posted = httpx.post(f"{url}/v1/score/", json=small(), headers=headers)
        got = httpx.get(f"{url}/v1/model/", headers=headers)
    # An unknown path takes no body (413 before reading it) and is not found (404): never a redirect that echoes Host.
    assert posted.status_code == 413 and "location" not in posted.headers
    assert got.status_code == 404 and "location" not in got.headers


def test_an_open_service_says_so_at_start(monkeypatch, caplog):
    monkeypatch.delenv("FEDBPT_API_KEYS", raising=False)
    with caplog.at_level(logging.WARNING, logger="inference_service.auth"):
        assert KeyStore.from_sources().open
    assert "NO API KEYS CONFIGURED" in caplog.text
