"""inference_service.scoring without HTTP: the Scorer driven straight from a ScoreRequest, on the real torch engine
with the embedded model, and behind an engine wrapper where a test injects a failure, a delay or a held turn."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

from fedbpt_wire.schemas import ScoreRequest, Tensor
from fedbpt_wire.tensors import decode_tensor, encode_tensor
from inference_service.auth import KeyStore
from inference_service.engine import InputError, ScoreBatch
from inference_service.limits import Limits
from inference_service.scoring import (
    ClientGone,
    EngineFailed,
    Scorer,
    TimedOut,
    TooLarge,
    TooMany,
    Unauthorized,
)
from inference_service.torch_engine import TorchEngine

WORDS = [" negative", " positive"]
TEXTS = [f"Review {i}: it was fine. Sentiment: {{mask}}" for i in range(6)]
# Slices of 64 positions: every candidate's texts are split over several engine turns.
LIMITS = Limits(max_batch_tokens=64, max_request_tokens=20_000)


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return TorchEngine(str(default_model_dir), dtype="float32", device="cpu", limits=LIMITS)


class Wrapped:
    """The real engine, each score call recorded; `fail_on` makes that call (1-based) raise, `gate` holds every
    call until it opens."""

    def __init__(self, engine, fail_on: int | None = None, gate: threading.Event | None = None):
        self.engine, self.info = engine, engine.info
        self.fail_on, self.gate = fail_on, gate
        self.batches: list[ScoreBatch] = []
        self.started = threading.Event()

    def label_token_ids(self, words):
        return self.engine.label_token_ids(words)

    def token_embeddings(self, ids):
        return self.engine.token_embeddings(ids)

    def positions(self, texts, prompt_length):
        return self.engine.positions(texts, prompt_length)

    def score(self, batch):
        self.batches.append(batch)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the engine's gate"
        if len(self.batches) == self.fail_on:
            raise RuntimeError("injected engine failure")
        return self.engine.score(batch)


def request(n_pop=3, n_prompt=2, texts=TEXTS, labels=None, dim=576) -> ScoreRequest:
    prompts = np.random.default_rng(0).standard_normal((n_pop, n_prompt, dim)).astype(np.float32) * 0.05
    return ScoreRequest(prompts=encode_tensor(prompts), texts=texts, label_words=WORDS, labels=labels)


async def _staying() -> bool:
    return False


def run(scorer: Scorer, req: ScoreRequest, key: str | None = "k", gone=_staying):
    return asyncio.run(scorer.score(req, key, gone))


def test_sliced_scoring_matches_one_engine_call_and_charges_the_key(engine):
    keys = KeyStore({"k": 5})
    wrapped = Wrapped(engine)
    req = request(labels=[0, 1, 0, 1, 0, 1])
    response = run(Scorer(wrapped, keys, LIMITS), req)
    assert len(wrapped.batches) > 3  # sliced: 3 candidates x 6 texts of ~20 positions in turns of 64
    whole = engine.score(ScoreBatch(decode_tensor(req.prompts, "prompts"), TEXTS, WORDS))
    logits = decode_tensor(response.logits, "logits")
    np.testing.assert_allclose(logits, whole.logits, rtol=1e-4, atol=1e-4)
    assert response.usage.sequences == whole.sequences == 18
    assert response.loss is not None and len(response.loss) == 3 and response.accuracy is not None
    assert keys.usage("k") == (1, 5)
    # Every slice is cached under the key's salt, never shared with another key's.
    assert {b.cache_salt for b in wrapped.batches} == {keys.key_id("k")}


def test_an_open_service_scores_with_no_key_and_no_salt(engine):
    wrapped = Wrapped(engine)
    run(Scorer(wrapped, KeyStore({}), LIMITS), request(n_pop=1, texts=TEXTS[:1]), key=None)
    assert [b.cache_salt for b in wrapped.batches] == [""]


def test_an_engine_failure_is_refunded_and_a_bad_request_is_not(engine):
    keys = KeyStore({"k": 5})
    with pytest.raises(EngineFailed, match="the engine failed"):
        run(Scorer(Wrapped(engine, fail_on=2), keys, LIMITS), request())
    assert keys.usage("k") == (0, 5)
    with pytest.raises(InputError, match=r"labels\[1\]"):
        run(Scorer(Wrapped(engine), keys, LIMITS), request(labels=[0, 7, 0, 1, 0, 1]))
    assert keys.usage("k") == (1, 5)  # validation costs a query: the body was decoded


def test_a_spent_quota_and_a_revoked_key_are_refused_before_any_work(engine, tmp_path):
    wrapped = Wrapped(engine)
    keys = KeyStore({"k": 1})
    scorer = Scorer(wrapped, keys, LIMITS)
    run(scorer, request(n_pop=1, texts=TEXTS[:1]))
    with pytest.raises(TooMany, match="quota of 1") as spent:
        run(scorer, request(n_pop=1, texts=TEXTS[:1]))
    assert spent.value.retry_after is None and len(wrapped.batches) == 1
    keys_file = tmp_path / "keys"
    keys_file.write_text("gone\n")
    revocable = KeyStore({}, keys_file=keys_file)
    keys_file.write_text("other\n")
    revocable.reload()
    with pytest.raises(Unauthorized, match="revoked"):
        run(Scorer(wrapped, revocable, LIMITS), request(n_pop=1, texts=TEXTS[:1]), key="gone")
    assert len(wrapped.batches) == 1


def test_a_declared_shape_over_the_budget_is_refused_before_decoding(engine):
    wrapped = Wrapped(engine)
    keys = KeyStore({"k": None})
    limits = Limits(max_request_tokens=1000)
    # P x N x (L + 1) = 64 x 6 x 129 positions at least; the data is not even base64 of the right size.
    req = ScoreRequest(prompts=Tensor(dtype="float32", shape=[64, 128, 576], data=""), texts=TEXTS, label_words=WORDS)
    with pytest.raises(TooLarge, match="at least 49536 positions"):
        run(Scorer(wrapped, keys, limits), req)
    with pytest.raises(TooLarge, match="it takes"):  # the exact cost, once the texts are tokenized
        run(Scorer(wrapped, keys, limits), request(n_pop=16, n_prompt=4))
    assert not wrapped.batches and keys.usage("k") == (2, None)


def test_a_key_past_its_positions_per_minute_is_told_when_to_retry(engine):
    cost = sum(engine.positions(TEXTS[:4], 2))
    limits = Limits(max_key_tokens_per_minute=cost * 3 // 2)
    scorer = Scorer(Wrapped(engine), KeyStore({"a": None, "b": None}), limits)
    run(scorer, request(n_pop=1, texts=TEXTS[:4]), key="a")
    with pytest.raises(TooMany, match="per minute") as refused:
        run(scorer, request(n_pop=1, texts=TEXTS[:4]), key="a")
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    run(scorer, request(n_pop=1, texts=TEXTS[:4]), key="b")


def test_a_client_gone_or_a_deadline_passed_stops_the_request_at_the_next_slice(engine):
    wrapped = Wrapped(engine)

    async def left() -> bool:
        return True

    with pytest.raises(ClientGone):
        run(Scorer(wrapped, KeyStore({"k": None}), LIMITS), request(), gone=left)
    assert len(wrapped.batches) == 1
    wrapped = Wrapped(engine)
    limits = Limits(max_batch_tokens=64, max_request_seconds=0.0)
    with pytest.raises(TimedOut, match=r"deadline after 1 of \d+ slices"):
        run(Scorer(wrapped, KeyStore({"k": None}), limits), request())
    assert len(wrapped.batches) == 1


def test_a_key_over_its_queue_is_busy_while_another_key_is_served(engine):
    gate = threading.Event()
    wrapped = Wrapped(engine, gate=gate)
    limits = Limits(max_inflight_per_key=1, max_queued_per_key=0)
    scorer = Scorer(wrapped, KeyStore({"a": None, "b": None}), limits)
    small = request(n_pop=1, texts=TEXTS[:1])

    async def scenario():
        first = asyncio.create_task(scorer.score(small, "a", _staying))
        while not wrapped.started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(TooMany, match="too many concurrent") as busy:
            await scorer.score(small, "a", _staying)
        other = asyncio.create_task(scorer.score(small, "b", _staying))
        gate.set()
        await asyncio.gather(first, other)
        return busy.value.retry_after

    assert asyncio.run(scenario()) == 1
    assert len(wrapped.batches) == 2


def test_scoring_imports_no_web_framework():
    code = (
        "import sys, inference_service.scoring; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
