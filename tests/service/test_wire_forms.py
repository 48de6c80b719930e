"""Prompts on the wire in three forms: dense float32, dense float16, and seed + z expanded by the service.

The seed form must give the service bit for bit the prompts the client's own projection makes, so the
scores are those of the dense float32 form, for d floats per prompt instead of L x D.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from fed_clients.client import PromptScorer
from fed_clients.data import Example
from fed_clients.service_client import ServiceClient
from fed_clients.tasks import Task
from fedbpt.loopback import serve_app
from fedbpt_wire.projection import Projection
from fedbpt_wire.schemas import SLOT, ProjectionSpec
from fedbpt_wire.tensors import encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.limits import Limits
from inference_service.projected import ProjectionCache
from inference_service.torch_engine import TorchEngine

KEY = "wire-key"
D, STD = 48, 0.02
LIMITS = Limits(
    max_prompt_length=16, max_population=8, max_texts=8, max_text_tokens=64, max_projection_values=64 * 16 * D
)
TASK = Task("tiny", ("text",), (" bad", " great"), "{text} . it was " + SLOT, "{text} . it was " + SLOT + " .")
EXAMPLES = [
    Example({"text": t}, y)
    for t, y in [("the movie was great", 1), ("a bad film", 0), ("what a great day", 1), ("the plot was bad", 0)]
]


@pytest.fixture(scope="module")
def engine(tiny_roberta_dir):
    return TorchEngine(str(tiny_roberta_dir), dtype="float32", limits=LIMITS)


@pytest.fixture(scope="module")
def url(engine):
    with serve_app(create_app(engine, KeyStore({KEY: None}), LIMITS)) as base:
        yield base


@pytest.mark.parametrize("init", ["random", "zeros"])
@pytest.mark.parametrize("d, L", [(16, 4), (500, 3)])
def test_service_expansion_is_bit_exact_with_a_from_scratch_projection(init, d, L):
    """What the service expands from seed + z, against P0 + A z drawn here straight from the seed's PCG64 streams
    (the numbers those streams give are pinned in test_client_math.py)."""
    seed, sigma0 = 7, 0.8
    a = np.random.Generator(np.random.PCG64(seed)).standard_normal((d, L * D), dtype=np.float32)
    a *= np.float32(STD / (np.sqrt(d) * sigma0))
    if init == "random":
        p0 = np.random.Generator(np.random.PCG64([seed, 1])).standard_normal((L, D), dtype=np.float32) * np.float32(STD)
    else:
        p0 = np.zeros((L, D), np.float32)
    # CMA-ES hands out float64 z; the wire carries it as float32.
    z64 = np.random.default_rng(1).standard_normal((5, d)) * 0.8
    z = z64.astype(np.float32)
    expected = (z @ a).reshape(5, L, D) + p0
    spec = ProjectionSpec(seed=seed, prompt_length=L, sigma0=sigma0, init=init)
    theirs = ProjectionCache(D, STD).expand(spec, z)
    assert theirs.dtype == np.float32 and theirs.shape == (5, L, D)
    assert theirs.tobytes() == expected.tobytes()
    # The client's own projection, handed CMA-ES's float64 z, rounds it the same way.
    mine = Projection(seed, d, L, D, STD, sigma0, init)(z64)
    assert mine.tobytes() == expected.tobytes()


def test_the_cache_is_bounded_and_keyed_by_the_whole_spec():
    table = np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)  # an embedding table, ids -> rows
    cache = ProjectionCache(D, STD, size=2, token_embeddings=lambda ids: table[ids], vocab_size=50)
    a = ProjectionSpec(seed=1, prompt_length=2, sigma0=1.0)
    assert cache.get(a, 4) is cache.get(a, 4)
    assert cache.get(a, 5) is not cache.get(a, 4)
    assert not cache.get(a.model_copy(update={"init": "zeros"}), 4).offset.any()
    normal = cache.get(a, 4).matrix
    assert not np.array_equal(cache.get(a.model_copy(update={"basis": "embeddings"}), 4).matrix, normal)
    assert len(cache._cache) == 2


@pytest.mark.parametrize("wire", ["float16", "seed"])
def test_scores_through_each_wire_form(url, engine, wire):
    """The seed form scores exactly as dense float32; float16 within its rounding; uploads shrink."""
    # The std the service publishes, as `projection_for` takes it: the service builds A from its own.
    projection = Projection(
        seed=3, intrinsic_dim=12, prompt_length=4, hidden_size=D, embedding_std=engine.info.embedding_std, sigma0=1.0
    )
    z = np.random.default_rng(2).standard_normal((6, 12))
    dense = ServiceClient(url, KEY)
    other = ServiceClient(url, KEY, prompt_wire=wire)
    try:
        base = PromptScorer(dense, TASK, projection, "masked", LIMITS.max_texts).logits(z, EXAMPLES)
        got = PromptScorer(other, TASK, projection, "masked", LIMITS.max_texts).logits(z, EXAMPLES)
        up_dense, up_other = dense.http.wire.bytes_up, other.http.wire.bytes_up
    finally:
        dense.close()
        other.close()
    if wire == "seed":
        assert got.tobytes() == base.tobytes()
        # 12 floats per prompt instead of 4 x 48: the body is mostly texts now.
        assert up_other < up_dense / 4
    else:
        np.testing.assert_allclose(got, base, rtol=0, atol=0.05)
        assert up_other < up_dense * 0.6


def test_token_init_travels_as_seed_and_is_expanded_from_the_service_embeddings(url, engine, tiny_roberta_dir):
    """Init 'tokens': a client that cannot build P0 sends seed + z (even when asked for dense), and the service
    scores P0 = rows of its embedding table (read here from the checkpoint) plus A z."""
    from safetensors.numpy import load_file

    from fedbpt_wire.projection import initial_token_ids

    info = engine.info
    client_side = Projection(
        seed=5,
        intrinsic_dim=12,
        prompt_length=3,
        hidden_size=D,
        embedding_std=info.embedding_std,
        sigma0=1.0,
        init="tokens",
    )
    z = np.random.default_rng(4).standard_normal((3, 12))
    service = ServiceClient(url, KEY)  # dense float32 by default
    try:
        got = PromptScorer(service, TASK, client_side, "masked", LIMITS.max_texts).logits(z, EXAMPLES)
        table = load_file(str(tiny_roberta_dir / "model.safetensors"))
        weight = next(v for k, v in table.items() if k.endswith("word_embeddings.weight"))
        rows = weight[initial_token_ids(5, 3, info.vocab_size)]
        dense = (z.astype(np.float32) @ client_side.matrix).reshape(3, 3, D) + rows
        texts = [TASK.render(ex.fields, "masked") for ex in EXAMPLES]
        expected = service.score(dense.astype(np.float32), texts, list(TASK.label_words)).logits
    finally:
        service.close()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_embedding_basis_travels_as_seed_and_is_expanded_from_the_service_embeddings(url, engine, tiny_roberta_dir):
    """Basis 'embeddings': A's rows are centred rows of the service's embedding table, drawn from the seed. The
    client sends seed + z (even when asked for dense) and the service scores P0 + A z with A rebuilt here from the
    checkpoint, independently of fedbpt_wire's code; a normal-basis spec leaves the field off the wire."""
    from safetensors.numpy import load_file

    info = engine.info
    client_side = Projection(5, 12, 3, D, info.embedding_std, 1.0, "zeros", basis="embeddings")
    assert client_side.service_only and client_side.spec.basis == "embeddings"
    with pytest.raises(ValueError, match="seed \\+ z"):
        client_side(np.zeros((1, 12)))
    assert "basis" not in Projection(5, 12, 3, D, info.embedding_std, 1.0, "zeros").spec.model_dump(exclude_none=True)
    z = np.random.default_rng(4).standard_normal((3, 12))
    service = ServiceClient(url, KEY)
    try:
        got = PromptScorer(service, TASK, client_side, "masked", LIMITS.max_texts).logits(z, EXAMPLES)
        table = load_file(str(tiny_roberta_dir / "model.safetensors"))
        weight = next(v for k, v in table.items() if k.endswith("word_embeddings.weight")).astype(np.float32)
        rng = np.random.Generator(np.random.PCG64([5, 3]))
        centre = weight[rng.integers(0, info.vocab_size, 4096)].mean(axis=0)
        rows = weight[rng.integers(0, info.vocab_size, 12 * 3)] - centre
        basis = (rows * (client_side.std / rows.std())).reshape(12, 3 * D)
        dense = (z.astype(np.float32) @ basis).reshape(3, 3, D)
        texts = [TASK.render(ex.fields, "masked") for ex in EXAMPLES]
        expected = service.score(dense.astype(np.float32), texts, list(TASK.label_words)).logits
    finally:
        service.close()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_model_info_publishes_the_projection_limit(url):
    info = httpx.get(f"{url}/v1/model").json()
    assert info["max_projection_values"] == LIMITS.max_projection_values


def projected(z, **spec) -> dict:
    return {
        "z": encode_tensor(np.asarray(z, np.float32)).model_dump(),
        "projection": {"seed": 1, "prompt_length": 2, "sigma0": 1.0, **spec},
    }


GOOD = {"texts": ["it was {mask} ."], "label_words": [" bad", " great"]}
BAD = [
    (
        "both forms",
        {
            "prompts": encode_tensor(np.zeros((1, 2, D), np.float32)).model_dump(),
            "projected": projected(np.zeros((1, 4))),
        },
        "prompts",
    ),
    ("neither form", {}, "prompts"),
    ("z of rank 3", {"projected": projected(np.zeros((1, 2, 4)))}, "projected.z.shape"),
    ("empty population", {"projected": projected(np.zeros((0, 4)))}, "projected.z.shape"),
    ("d = 0", {"projected": projected(np.zeros((1, 0)))}, "projected.z.shape"),
    ("projection too large", {"projected": projected(np.zeros((1, 65)), prompt_length=16)}, "projected.z.shape"),
    (
        "L over the limit",
        {"projected": projected(np.zeros((1, 4)), prompt_length=17)},
        "projected.projection.prompt_length",
    ),
    ("NaN in z", {"projected": projected(np.full((1, 4), np.nan))}, "projected.z"),
    ("negative seed", {"projected": projected(np.zeros((1, 4)), seed=-1)}, "seed"),
    ("zero sigma0", {"projected": projected(np.zeros((1, 4)), sigma0=0)}, "sigma0"),
    ("unknown init", {"projected": projected(np.zeros((1, 4)), init="ones")}, "init"),
    ("unknown field", {"projected": projected(np.zeros((1, 4)), scale=2.0)}, "scale"),
]


@pytest.mark.parametrize("case, extra, field", BAD, ids=[c[0] for c in BAD])
def test_bad_projected_requests_are_422_naming_the_field(url, case, extra, field):
    r = httpx.post(f"{url}/v1/score", json={**GOOD, **extra}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 422, r.text
    assert field in r.text
    ok = httpx.post(
        f"{url}/v1/score",
        json={**GOOD, "projected": projected(np.zeros((2, 4)))},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["sequences"] == 2


def test_a_service_without_the_seed_form_is_refused_clearly(url, monkeypatch):
    from fedbpt_wire.schemas import ModelInfo

    client = ServiceClient(url, KEY, prompt_wire="seed")
    try:
        info = client.model_info()
        monkeypatch.setattr(client, "_info", ModelInfo(**{**info.model_dump(), "max_projection_values": None}))
        with pytest.raises(RuntimeError, match="seed"):
            client.score_projected(
                np.zeros((1, 4)),
                ProjectionSpec(seed=1, prompt_length=2, sigma0=1.0),
                GOOD["texts"],
                GOOD["label_words"],
            )
    finally:
        client.close()


def test_building_a_projection_is_charged(engine):
    """A seed + z request whose projection the service must draw pays for the drawing: one position per
    PROJECTION_VALUES_PER_POSITION values of A. The same request once A is cached pays only its positions."""
    from inference_service.scoring import PROJECTION_VALUES_PER_POSITION

    d, length = 2000, 16
    texts = ["the movie was great . it was {mask} .", "a bad film . it was {mask} ."]
    positions = 2 * sum(engine.positions(texts, length))
    build = -(-d * length * D // PROJECTION_VALUES_PER_POSITION)
    assert build >= 10
    limits = Limits(
        **{
            **LIMITS.__dict__,
            "max_projection_values": d * length * D,
            "max_key_tokens_per_minute": positions + build - 1,
        }
    )
    body = {
        "projected": {
            "z": encode_tensor(np.zeros((2, d), np.float32)).model_dump(),
            "projection": {"seed": 11, "prompt_length": length, "sigma0": 1.0, "init": "random"},
        },
        "texts": texts,
        "label_words": [" bad", " great"],
    }
    with serve_app(create_app(engine, KeyStore({"a": None, "b": None}), limits)) as base:
        first = httpx.post(f"{base}/v1/score", json=body, headers={"Authorization": "Bearer a"}, timeout=60)
        again = httpx.post(f"{base}/v1/score", json=body, headers={"Authorization": "Bearer b"}, timeout=60)
    assert first.status_code == 429 and "positions per minute" in first.json()["detail"]
    assert again.status_code == 200, again.text
