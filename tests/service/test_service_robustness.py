"""The inference service under hostile payloads, key revocation, one key flooding, and racing quotas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx
import numpy as np
import pytest

from fedbpt.loopback import serve_app
from fedbpt_wire.tensors import encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyRevoked, KeyStore
from inference_service.limits import Busy, FairScheduler, Limits
from inference_service.server import reload_keys_on_sighup
from inference_service.torch_engine import TorchEngine

from .test_service import KEY, LIMITS, body, post

WORDS = [" bad", " great"]


def good() -> dict:
    return body(np.zeros((2, 2, 48), np.float32), ["it was {mask} .", "a great film . {mask}"], WORDS, [0, 1])


def small() -> dict:
    return body(np.zeros((1, 1, 48), np.float32), ["it was {mask} ."], WORDS)


def post_raw(url: str, content: bytes, key: str = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{url}/v1/score", content=content, headers=headers, timeout=60)


def assert_4xx_with_detail(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


@pytest.fixture(scope="module")
def engine(tiny_roberta_dir):
    return TorchEngine(str(tiny_roberta_dir), dtype="float32", limits=LIMITS)


@pytest.fixture(scope="module")
def url(engine):
    with serve_app(create_app(engine, KeyStore({KEY: None}), LIMITS)) as url:
        yield url


# ------------------------------------------------------------------ hostile payloads


def _shape(shape, data: bytes = b"\0" * 16) -> bytes:
    payload = good()
    payload["prompts"]["shape"] = "SHAPE"
    payload["prompts"]["data"] = encode_tensor(np.frombuffer(data, np.float32)).data
    return json.dumps(payload).replace('"SHAPE"', shape if isinstance(shape, str) else json.dumps(shape)).encode()


# A declared shape is judged before a byte of it is allocated: 16 bytes of data against 10^12 sequences
# must be a quick 413/422, never a MemoryError (500) or a server grinding through the allocation.
HUGE_SHAPES = {
    "huge-P": ([10**12, 2, 48], 413, "P = "),
    "huge-L": ([2, 10**12, 48], 422, "L = "),
    "huge-D": ([2, 2, 10**12], 422, "hidden size"),
    "all-2^63": ([2**63] * 3, 413, "P = "),
    "past-int64": ([1, 10**400, 48], 422, "L = "),
    "negative-L": ([1, -(10**12), 48], 422, "non-negative"),
    "rank-4": ([1, 1, 48, 10**9], 422, "prompts.shape"),
    "rank-8": ([10**6] * 8, 422, "prompts.shape"),
    "digits-past-python-limit": ("[1, 1" + "0" * 5000 + ", 48]", None, None),
}


@pytest.mark.parametrize("case", sorted(HUGE_SHAPES))
def test_huge_declared_shapes_are_rejected_without_allocating(url, case):
    shape, status, needle = HUGE_SHAPES[case]
    r = post_raw(url, _shape(shape))
    # Any attempt to allocate these shapes would fail (MemoryError, a 500) or never end (the run's timeout).
    detail = assert_4xx_with_detail(r)
    if status is not None:
        assert r.status_code == status and needle in detail, detail
    assert post(url, good()).status_code == 200


def _replace(field: str, value) -> bytes:
    payload = good()
    payload[field] = value
    return json.dumps(payload).encode()  # ensure_ascii: lone surrogates travel as \udXXX escapes


HOSTILE = {
    "surrogate-in-text": (_replace("texts", ["it was {mask} .", "a \ud800 film {mask}"]), 422, "texts[1]"),
    "surrogate-in-label-word": (_replace("label_words", ["\udfff", " great"]), 422, "label_words[0]"),
    "invalid-utf8-bytes-in-text": (
        _replace("texts", ["X", "ok {mask}"]).replace(b'"X"', b'"\xff\xfe{mask}"'),
        None,
        None,
    ),
    "cesu8-surrogate-bytes": (
        _replace("texts", ["X", "ok {mask}"]).replace(b'"X"', b'"\xed\xa0\x80{mask}"'),
        None,
        None,
    ),
    # Over the token limit by its length in characters alone: refused before the tokenizer sees it.
    "text-of-many-characters": (
        _replace("texts", ["ab" * 5000 + "{mask}", "ok {mask}"]),
        422,
        "texts[0]: is 10006 characters",
    ),
    "label-word-of-many-characters": (_replace("label_words", [" bad", "g" * 200]), 422, "label_words[1]"),
    "too-many-label-words": (
        _replace("label_words", [f" w{i}" for i in range(LIMITS.max_label_words + 1)]),
        413,
        "label_words",
    ),
    "too-many-texts": (_replace("texts", ["{mask}"] * 30_000), 413, "texts"),
    "huge-label-list": (_replace("labels", [0] * 100_000), 422, "labels"),
    "many-unknown-fields": (json.dumps({**good(), **{f"f{i}": i for i in range(5_000)}}).encode(), 422, "f0"),
    "deeply-nested-list": (b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, None),
    "deeply-nested-objects": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, None, None),
    "nested-inside-a-field": (_replace("labels", "X").replace(b'"X"', b"[" * 50_000 + b"]" * 50_000), None, None),
    "prompts-beyond-the-model's-range": (
        _replace("prompts", encode_tensor(np.full((1, 2, 48), 3e38, np.float32)).model_dump()),
        422,
        "not finite",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payloads_are_4xx_and_the_server_carries_on(url, case):
    content, status, needle = HOSTILE[case]
    assert len(content) < LIMITS.max_body_bytes, "under the body limit, or the BodyLimit 413 would be all it tests"
    r = post_raw(url, content)
    detail = assert_4xx_with_detail(r)
    if status is not None:
        assert r.status_code == status and needle in detail, (r.status_code, detail)
    assert post(url, good()).status_code == 200


def test_unknown_paths_share_one_metrics_label(url):
    for i in range(5):
        assert httpx.get(f"{url}/scan-{i}").status_code == 404
    text = httpx.get(f"{url}/metrics").text
    assert "scan-" not in text and 'endpoint="unmatched",status="404"} 5.0' in text


# ------------------------------------------------------------------ revocation


def test_revoked_key_gets_401_while_others_carry_on(engine, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBPT_API_KEYS", raising=False)
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha 3\nbeta\n")
    keys = KeyStore.from_sources(str(keys_file), recheck_s=0)
    with serve_app(create_app(engine, keys, LIMITS)) as url:
        assert post(url, small(), key="alpha").status_code == 200
        assert post(url, small(), key="beta").status_code == 200

        keys_file.write_text("beta\n")
        r = post(url, small(), key="alpha")
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        assert post(url, small(), key="beta").status_code == 200

        keys_file.write_text("beta\nalpha-broken five\n")  # a half-edited file: the keys in force stay
        assert post(url, small(), key="beta").status_code == 200
        assert post(url, small(), key="alpha").status_code == 401

        keys_file.write_text("alpha 3\nbeta\ngamma\n")  # re-added: its usage was kept, not reset
        assert post(url, small(), key="gamma").status_code == 200
        assert keys.usage("alpha") == (1, 3)

        keys_file.write_text("")  # emptied: no one gets in, rather than everyone
        assert post(url, small(), key="beta").status_code == 401
        assert post(url, small(), key=None).status_code == 401


def test_sighup_forces_a_reload(engine, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBPT_API_KEYS", raising=False)
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha\nbeta\n")
    keys = KeyStore.from_sources(str(keys_file), recheck_s=3600)  # the mtime check alone would not see edits
    previous = signal.getsignal(signal.SIGHUP)
    reload_keys_on_sighup(keys)
    try:
        with serve_app(create_app(engine, keys, LIMITS)) as url:
            assert post(url, small(), key="alpha").status_code == 200
            keys_file.write_text("beta\n")
            assert post(url, small(), key="alpha").status_code == 200
            os.kill(os.getpid(), signal.SIGHUP)
            assert post(url, small(), key="alpha").status_code == 401
            assert post(url, small(), key="beta").status_code == 200
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_key_revoked_between_check_and_count_is_refused(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha\n")
    keys = KeyStore({}, keys_file)
    assert keys.known("alpha")
    keys_file.write_text("beta\n")
    keys.reload()
    with pytest.raises(KeyRevoked):
        keys.reserve("alpha")


# ------------------------------------------------------------------ fairness


def test_scheduler_turns_round_robin_across_keys_fifo_within():
    async def main() -> list[str]:
        sched = FairScheduler(max_inflight=10, max_queued=10)
        order: list[str] = []
        release = asyncio.Event()

        async def job(key: str, tag: str):
            async with sched.turn(key):
                order.append(tag)
                await release.wait()

        # One yield runs each new task up to its first wait (asyncio's ready queue is FIFO); the asserts say it did.
        first = asyncio.create_task(job("a", "a0"))
        await asyncio.sleep(0)
        assert order == ["a0"]
        tasks = [
            asyncio.create_task(job(k, f"{k}{i}")) for k, n in (("a", 4), ("b", 2), ("c", 1)) for i in range(1, n + 1)
        ]
        await asyncio.sleep(0)
        assert order == ["a0"] and not any(t.done() for t in tasks)
        tasks[1].cancel()  # a2 gives up while waiting: its turn goes to the next in line
        release.set()
        await asyncio.gather(first, *tasks, return_exceptions=True)
        return order

    assert asyncio.run(main()) == ["a0", "a1", "b1", "c1", "a3", "b2", "a4"]


def test_scheduler_admits_k_per_key_queues_the_rest_and_refuses_past_the_queue():
    async def main():
        sched = FairScheduler(max_inflight=2, max_queued=2)
        inside = {"a": 0, "b": 0}
        peak = {"a": 0, "b": 0}
        gate = asyncio.Event()

        async def job(key: str):
            async with sched.admit(key):
                inside[key] += 1
                peak[key] = max(peak[key], inside[key])
                await gate.wait()
                inside[key] -= 1

        tasks = [asyncio.create_task(job("a")) for _ in range(4)] + [asyncio.create_task(job("b"))]
        await asyncio.sleep(0)  # each task runs up to its first wait: two of a's and b's inside, a's others queued
        assert inside == {"a": 2, "b": 1}
        with pytest.raises(Busy):
            async with sched.admit("a"):
                pass
        gate.set()
        await asyncio.gather(*tasks)
        assert peak == {"a": 2, "b": 1}
        assert not sched._admitted and not sched._gates  # everything handed back

    asyncio.run(main())


class GatedEngine:
    """The tiny RoBERTa behind a gate the test opens: batches queue up at the service for as long as the test
    likes, and the order they reach the engine in is recorded (by the first text's first word, the sender's tag)."""

    def __init__(self, engine):
        self.engine = engine
        self.gate = threading.Event()
        self.order: list[str] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def positions(self, texts, prompt_length):
        return self.engine.positions(texts, prompt_length)

    def score(self, batch):
        self.order.append(batch.texts[0].split()[0])
        assert self.gate.wait(timeout=120), "the test never opened the gate"
        return self.engine.score(batch)


class TurnsAsked:
    """Counts, per key, the requests that asked the scheduler for a turn at the engine. The count is taken in the
    same step of the event loop in which the request takes its place in line, so once the test sees it, any batch
    the engine finishes afterwards is handed on with that request already in line."""

    def __init__(self, monkeypatch):
        self.asked: dict[str, int] = {}
        self.changed = threading.Condition()
        turn = FairScheduler.turn

        @contextlib.asynccontextmanager
        async def counted_turn(scheduler, key):
            with self.changed:
                self.asked[key] = self.asked.get(key, 0) + 1
                self.changed.notify_all()
            async with turn(scheduler, key):
                yield

        monkeypatch.setattr(FairScheduler, "turn", counted_turn)

    def wait(self, key: str, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.asked.get(key, 0) >= n, timeout=120), (key, self.asked)


def tagged(tag: str) -> dict:
    return body(np.zeros((1, 1, 48), np.float32), [f"{tag} it was {{mask}} ."], WORDS)


def until_done(futures, n: int) -> list:
    """The first `n` futures to finish (bounded: a hang fails the test instead of stalling it)."""
    done = []
    for f in as_completed(futures, timeout=120):
        done.append(f)
        if len(done) == n:
            return done
    raise AssertionError(f"only {len(done)} of {n} answers came")


# "turns": all of the flood admitted at once, in line for the engine, where the round-robin over keys must
# let the other key in; "admission": two in flight and the rest queued at the key's own gate.
@pytest.mark.parametrize("inflight", [16, 2], ids=["turns", "admission"])
def test_one_key_flooding_does_not_starve_another(engine, inflight, monkeypatch):
    flood = 16
    # Past the flood's in-flight and queued places a 17th is refused: then all of the flood has arrived.
    limits = Limits(**{**LIMITS.__dict__, "max_inflight_per_key": inflight, "max_queued_per_key": flood - inflight})
    gated = GatedEngine(engine)
    turns = TurnsAsked(monkeypatch)
    with (
        serve_app(create_app(gated, KeyStore({"flood": None, "polite": None}), limits)) as url,
        ThreadPoolExecutor(flood + 2) as pool,
    ):
        floods = [pool.submit(post, url, tagged("flood"), "flood") for _ in range(flood + 1)]
        (refused,) = until_done(floods, 1)
        assert refused.result().status_code == 429
        turns.wait("flood", inflight)  # every admitted flood request is in line for the engine
        polite = pool.submit(post, url, tagged("polite"), "polite")
        turns.wait("polite", 1)
        gated.gate.set()
        assert polite.result(timeout=120).status_code == 200
        assert sorted(f.result(timeout=120).status_code for f in floods) == [200] * flood + [429]
    # The polite request waits for the batch running and at most one more of the flood's.
    assert gated.order.count("flood") == flood and gated.order.index("polite") <= 2, gated.order


def test_past_the_queue_a_key_gets_429_with_retry_after_and_is_not_charged(engine):
    limits = Limits(**{**LIMITS.__dict__, "max_inflight_per_key": 1, "max_queued_per_key": 1})
    keys = KeyStore({"flood": 100, "polite": None})
    gated = GatedEngine(engine)
    with serve_app(create_app(gated, keys, limits)) as url, ThreadPoolExecutor(6) as pool:
        # The engine holds the first; one waits in the queue; the other four can only be refused.
        futures = [pool.submit(post, url, tagged("flood"), "flood") for _ in range(6)]
        busy = [f.result() for f in until_done(futures, 4)]
        assert all(r.status_code == 429 for r in busy)
        assert all(r.headers["Retry-After"] == "1" and "retry" in r.json()["detail"] for r in busy)
        gated.gate.set()
        assert sorted(f.result(timeout=120).status_code for f in futures) == [200, 200, 429, 429, 429, 429]
        assert keys.usage("flood") == (2, 100)
        assert post(url, small(), key="polite").status_code == 200


# ------------------------------------------------------------------ quotas under concurrency


def test_quotas_hold_exactly_for_several_keys_under_concurrent_requests(engine):
    quotas = {"metered-a": 25, "metered-b": 7, "metered-c": 0}
    threads_per_key, per_thread = 4, 10
    keys = KeyStore({**quotas, "unmetered": None})
    limits = Limits(**{**LIMITS.__dict__, "max_queued_per_key": threads_per_key})
    senders = [k for k in (*quotas, "unmetered") for _ in range(threads_per_key)]
    with serve_app(create_app(engine, keys, limits)) as url:
        barrier = threading.Barrier(len(senders))

        def client(key):
            with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
                barrier.wait(timeout=60)
                return key, [http.post(f"{url}/v1/score", json=small()).status_code for _ in range(per_thread)]

        with ThreadPoolExecutor(len(senders)) as pool:
            results = list(pool.map(client, senders))
        text = httpx.get(f"{url}/metrics").text
    statuses = {k: [s for key, batch in results if key == k for s in batch] for k in (*quotas, "unmetered")}
    sent = threads_per_key * per_thread
    for key, quota in quotas.items():
        assert statuses[key].count(200) == quota and statuses[key].count(429) == sent - quota, key
        assert keys.usage(key) == (quota, quota)
    assert statuses["unmetered"] == [200] * sent and keys.usage("unmetered") == (sent, None)
    refused = sum(sent - q for q in quotas.values())
    assert f'fedbpt_requests_total{{endpoint="/v1/score",status="429"}} {float(refused)}' in text
