"""The inference service fuzzed over loopback HTTP: from its own OpenAPI schema, and with well-formed
score requests of any values, so generated input reaches past validation into the engine.

Whatever arrives, the answer is never a 5xx; every rejection is a 4xx whose JSON body carries a
readable `detail`, and every 200 carries finite logits of the promised shape.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from fedbpt.loopback import serve_app
from fedbpt_wire.schemas import SLOT, Tensor
from fedbpt_wire.tensors import decode_tensor, encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.limits import Limits
from inference_service.torch_engine import TorchEngine

from .conftest import assert_no_5xx

KEY = "fuzz-key"
D = 48  # the tiny RoBERTa's hidden size
LIMITS = Limits(max_prompt_length=8, max_population=4, max_texts=4, max_text_tokens=48, max_body_bytes=200_000)
OPERATIONS = [("GET", "/healthz"), ("GET", "/v1/model"), ("POST", "/v1/score"), ("GET", "/metrics")]
# No example database: a fuzz run must not leave files in the repository, and each run explores afresh.
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def service(tiny_roberta_dir):
    engine = TorchEngine(str(tiny_roberta_dir), dtype="float32", limits=LIMITS)
    with serve_app(create_app(engine, KeyStore({KEY: None}), LIMITS)) as url:
        yield url, schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_operation_is_fuzzed(service):
    _, schema = service
    found = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert found == set(OPERATIONS)


CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [("POST", "/v1/score", GenerationMode.NEGATIVE)]


@pytest.mark.timeout(60)
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
        assert_no_5xx(case.call(base_url=url, headers=headers, timeout=30))

    fuzz()


any_text = st.text(st.characters(codec="utf-8"), max_size=40)
# Lone surrogates survive JSON as "\udXXX" escapes and reach the service as str.
surrogate_text = st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"]), min_size=1, max_size=10).filter(
    lambda t: any(0xD800 <= ord(c) <= 0xDFFF for c in t))
single_tokens = [" bad", " great", " film", " movie", " story", " day"]
FAULTS = ["none", "none", "none", "shape", "values", "texts", "label_words", "labels"]


@st.composite
def score_requests(draw) -> dict:
    """Bodies the schema accepts: well-formed apart from at most one fault, so most reach the engine,
    with prompt values anywhere in float32's range and texts of any code points."""
    fault = draw(st.sampled_from(FAULTS))
    shape = [draw(st.integers(1, LIMITS.max_population)), draw(st.integers(0, LIMITS.max_prompt_length)), D]
    if fault == "shape":
        i = draw(st.integers(0, 2))
        shape[i] = draw(st.sampled_from([0, -1, LIMITS.max_population + 1, LIMITS.max_prompt_length + 1, D - 1, 2**40]))
    size = max(0, int(np.prod(shape))) if max(shape) < 2**20 else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.0, 0.02, 1.0, 1e4, 1e19, 1e30, 3e38]))
    prompts = (rng.standard_normal(size) * scale).astype(np.float32)
    if fault == "values" and size:
        prompts[draw(st.integers(0, size - 1))] = draw(st.floats(width=32))  # NaN and infinities included
    n = draw(st.integers(1, LIMITS.max_texts))
    texts = [draw(any_text) + SLOT + draw(any_text) for _ in range(n)]
    if fault == "texts":
        i = draw(st.integers(0, n - 1))
        texts[i] = draw(st.sampled_from([texts[i].replace(SLOT, ""), texts[i] + SLOT, "x" * 10_000 + SLOT,
                                          draw(surrogate_text) + SLOT]))
    words = draw(st.lists(st.sampled_from(single_tokens), min_size=2, max_size=4, unique=True))
    if fault == "label_words":
        words[draw(st.integers(0, len(words) - 1))] = draw(st.sampled_from(["", SLOT, " marvellously", words[0]])
                                                           | surrogate_text | any_text)
    tensor = {"dtype": "float32", "shape": shape, "data": encode_tensor(prompts).data}
    body = {"prompts": tensor, "texts": texts, "label_words": words}
    if fault == "labels" or draw(st.booleans()):
        labels = draw(st.lists(st.integers(0, len(words) - 1), min_size=n, max_size=n))
        if fault == "labels":
            labels = draw(st.sampled_from([labels[:-1], labels + [0], [*labels[:-1], len(words)], [-1] * n]))
        body["labels"] = labels
    return body


