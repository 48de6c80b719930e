"""The inference service fuzzed over loopback HTTP: from its own OpenAPI schema, and with score requests that
are valid but hostile (any code points in the texts, prompt values up to float32's limit), so generated input
reaches the engine's `score`.

Whatever arrives, the answer is never a 5xx; every rejection is a 4xx whose JSON body carries a readable
`detail`; every 200 comes from one call of the engine and carries finite logits of the promised shape; and a
request this test judges valid, with prompts of embedding-like scale, is answered 200.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from fedbpt.loopback import serve_app
from fedbpt_wire.schemas import SLOT, ScoreResponse
from fedbpt_wire.tensors import decode_tensor, encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.limits import Limits
from inference_service.torch_engine import TorchEngine

from ..conftest import assert_no_5xx

pytestmark = pytest.mark.fuzz

KEY = "fuzz-key"
D = 48  # the tiny RoBERTa's hidden size
# The text limit lies past what the model can take: RoBERTa numbers positions from padding_idx + 1 = 2, so the
# tiny RoBERTa's 160 position embeddings hold sequences of 158, <s> + L prompt vectors + the text + </s>. A text
# within the published limit may still be too long for the model with its prompt, and must be refused, not crash.
MODEL_POSITIONS = 158
LIMITS = Limits(max_prompt_length=8, max_population=4, max_texts=4, max_text_tokens=200, max_body_bytes=200_000)
OPERATIONS = [("GET", "/healthz"), ("GET", "/v1/model"), ("POST", "/v1/score"), ("GET", "/metrics")]
# Failures are kept in Hypothesis' example database (.hypothesis/, git-ignored) and replayed first on the next
# run; print_blob prints the @reproduce_failure line for a failure seen elsewhere. Every health check is on but
# too_slow, which times data generation by the wall clock: on a shared machine it measures the neighbours.
# deadline=None likewise: an example's duration is a loopback round trip and a forward, no property of the service.
FUZZ = settings(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


class CountingEngine:
    """The tiny RoBERTa, counting the batches that reach `score`; everything else is the engine's own."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def score(self, batch):
        with self._lock:
            self.calls += 1
        return self.engine.score(batch)


@pytest.fixture(scope="module")
def engine(tiny_roberta_dir):
    return CountingEngine(TorchEngine(str(tiny_roberta_dir), dtype="float32", limits=LIMITS))


@pytest.fixture(scope="module")
def service(engine):
    with serve_app(create_app(engine, KeyStore({KEY: None}), LIMITS)) as url:
        yield url, schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_operation_is_fuzzed(service):
    _, schema = service
    found = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert found == set(OPERATIONS)


CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [("POST", "/v1/score", GenerationMode.NEGATIVE)]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m}-{p}-{g.value}" for m, p, g in CASES])
def test_schema_fuzz_never_5xx(service, method, path, mode):
    url, schema = service
    operation = schema[path][method]
    # A generated Authorization header mostly stops at 401; the real key reaches the body checks.
    auth = st.sampled_from([None, f"Bearer {KEY}", "Bearer not-a-key"])

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode), authorization=auth)
    def fuzz(case, authorization):
        headers = {"Authorization": authorization} if authorization else None
        assert_no_5xx(case.call(base_url=url, headers=headers, timeout=60))

    fuzz()


# Free text of any code point but the braces of the slot and prompt markers (their misuse is a fault of its own):
# at most 2 x 15 x 4 UTF-8 bytes, hence byte-level BPE tokens, which always fit the model with any prompt.
any_text = st.text(st.characters(codec="utf-8", exclude_characters="{}"), max_size=15)
# Lone surrogates survive JSON as "\udXXX" escapes and reach the service as str.
surrogate_text = st.text(
    st.characters(codec="utf-8") | st.characters(categories=["Cs"]), min_size=1, max_size=10
).filter(lambda t: any(0xD800 <= ord(c) <= 0xDFFF for c in t))
SINGLE_TOKENS = [" bad", " great", " film", " movie", " story", " day"]
FAULTS = ["none", "none", "none", "shape", "values", "texts", "long", "label_words", "labels"]
# Prompt values within this bound (the tiny model's word embeddings are ~N(0, 0.02), and its LayerNorms keep a
# forward finite far beyond): a valid request must then be answered 200. Past it, a 422 for non-finite logits
# is an answer too.
TAME = 10.0


@dataclass(frozen=True)
class Request:
    body: dict
    shape: tuple[int, ...]
    n_texts: int
    n_words: int
    valid: bool | None  # None: this test cannot tell (a random word may be one token of the vocabulary)
    tame: bool  # every prompt value within +-TAME


@st.composite
def score_requests(draw) -> Request:
    """Bodies the schema accepts: well-formed apart from at most one fault, so most reach the engine, with prompt
    values anywhere in float32's range and texts of any code points."""
    fault = draw(st.sampled_from(FAULTS))
    shape = [draw(st.integers(1, LIMITS.max_population)), draw(st.integers(0, LIMITS.max_prompt_length)), D]
    if fault == "shape":
        i = draw(st.integers(0, 2))
        shape[i] = draw(st.sampled_from([0, -1, LIMITS.max_population + 1, LIMITS.max_prompt_length + 1, D - 1, 2**40]))
    size = max(0, int(np.prod(shape))) if max(shape) < 2**20 else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.0, 0.02, 1.0, 1e4, 1e19, 1e30, 3e38]))
    with np.errstate(over="ignore"):  # past float32's range the values become infinities: a fault of its own
        prompts = (rng.standard_normal(size) * scale).astype(np.float32)
    if fault == "values" and size:
        prompts[draw(st.integers(0, size - 1))] = draw(st.floats(width=32))  # NaN and infinities included
    n = draw(st.integers(1, LIMITS.max_texts))
    texts = [draw(any_text) + SLOT + draw(any_text) for _ in range(n)]
    if fault == "texts":
        i = draw(st.integers(0, n - 1))
        texts[i] = draw(
            st.sampled_from(
                [
                    texts[i].replace(SLOT, ""),
                    texts[i] + SLOT,
                    "x" * 10_000 + SLOT,
                    "{prompt}" + texts[i] + "{prompt}",
                    texts[i] + "{prompt}",
                    draw(surrogate_text) + SLOT,
                ]
            )
        )
    long_fits = True
    if fault == "long":
        # k one-token words and the mask: <s> + L + k + 1 + </s> positions, around the model's limit.
        k = draw(st.integers(MODEL_POSITIONS - 40, LIMITS.max_text_tokens - 1))
        texts[draw(st.integers(0, n - 1))] = " bad" * k + SLOT
        long_fits = k + shape[1] + 3 <= MODEL_POSITIONS
    words = draw(st.lists(st.sampled_from(SINGLE_TOKENS), min_size=2, max_size=4, unique=True))
    words_valid: bool | None = True
    if fault == "label_words":
        word = draw(st.sampled_from(["", SLOT, " marvellously"]) | surrogate_text | any_text)
        surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in word)
        words[draw(st.integers(0, len(words) - 1))] = word
        # Empty, several tokens, a lone surrogate or a word twice: refused. Any other text may be one token.
        refused = word in ("", SLOT, " marvellously") or surrogate or len(set(words)) < len(words)
        words_valid = False if refused else None
    tensor = {"dtype": "float32", "shape": shape, "data": encode_tensor(prompts).data}
    body = {"prompts": tensor, "texts": texts, "label_words": words}
    labels_valid = True
    if fault == "labels" or draw(st.booleans()):
        labels = draw(st.lists(st.integers(0, len(words) - 1), min_size=n, max_size=n))
        if fault == "labels":
            labels = draw(st.sampled_from([labels[:-1], labels + [0], [*labels[:-1], len(words)], [-1] * n]))
            labels_valid = False
        body["labels"] = labels
    shape_valid = 1 <= shape[0] <= LIMITS.max_population and 0 <= shape[1] <= LIMITS.max_prompt_length and shape[2] == D
    values_valid = bool(np.isfinite(prompts).all())
    known = [shape_valid, values_valid, fault != "texts", long_fits, labels_valid]
    valid = False if not all(known) or words_valid is False else words_valid
    tame = values_valid and float(np.abs(prompts).max(initial=0.0)) <= TAME
    return Request(body, tuple(shape), n, len(words), valid, tame)


def _example(words: int, prompt_length: int, valid: bool) -> Request:
    """Two texts, one of them `words` one-token words long, with labels."""
    prompts = np.full((2, prompt_length, D), 0.02, np.float32)
    body = {
        "prompts": encode_tensor(prompts).model_dump(),
        "texts": ["é ☃ 𝄞 {mask} .", " bad" * words + SLOT],
        "label_words": [" bad", " great"],
        "labels": [1, 0],
    }
    return Request(body, (2, prompt_length, D), 2, 2, valid, True)


@FUZZ
@given(req=score_requests())
@example(req=_example(words=3, prompt_length=3, valid=True))
# What the first run found: 1 + 156 + 1 + 1 positions, one past the model's, within the published text limit.
@example(req=_example(words=156, prompt_length=0, valid=False))
@example(req=_example(words=150, prompt_length=5, valid=True))
def test_valid_hostile_requests_reach_the_engine(service, engine, req):
    url, _ = service
    before = engine.calls
    r = httpx.post(f"{url}/v1/score", json=req.body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert_no_5xx(r)
    event(f"HTTP {r.status_code}")
    if req.valid is False:
        assert 400 <= r.status_code < 500, r.text[:500]
    if req.valid and req.tame:
        assert r.status_code == 200, r.text[:500]
    if r.status_code != 200:
        assert 400 <= r.status_code < 500, r.text[:500]
        return
    # Answered: it went through the engine, and the logits are all there and finite.
    assert engine.calls > before
    parsed = ScoreResponse.model_validate(r.json())
    logits = decode_tensor(parsed.logits)
    n_pop = req.shape[0]
    assert logits.shape == (n_pop, req.n_texts, req.n_words) and np.isfinite(logits).all()
    assert parsed.usage.sequences == n_pop * req.n_texts
    if "labels" in req.body:
        assert len(parsed.loss) == len(parsed.accuracy) == n_pop and np.isfinite(parsed.loss).all()
        predicted = logits.argmax(-1)
        np.testing.assert_allclose(parsed.accuracy, (predicted == np.asarray(req.body["labels"])).mean(-1))
    else:
        assert parsed.loss is None and parsed.accuracy is None
