"""The inference service over real HTTP: exactness against transformers, prompt placement, every 4xx."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from fedbpt_wire.schemas import ScoreResponse
from fedbpt_wire.tensors import decode_tensor, encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore, key_id
from inference_service.limits import Limits
from inference_service.torch_engine import TorchEngine

from ..conftest import serve_app

KEY = "test-key-1"
LIMITS = Limits(max_prompt_length=16, max_population=8, max_texts=16, max_text_tokens=64, max_body_bytes=400_000)


def body(prompts, texts, label_words, labels=None, dtype="float32"):
    out = {"prompts": encode_tensor(prompts, dtype).model_dump(), "texts": texts, "label_words": label_words}
    if labels is not None:
        out["labels"] = labels
    return out


def post(url, payload, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/score", json=payload, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def smol_engine(default_model_dir):
    return TorchEngine(str(default_model_dir), dtype="float32", limits=LIMITS)


@pytest.fixture(scope="module")
def roberta_engine(tiny_roberta_dir):
    return TorchEngine(str(tiny_roberta_dir), dtype="float32", limits=LIMITS)


@pytest.fixture(scope="module")
def smol_url(smol_engine):
    with serve_app(create_app(smol_engine, KeyStore({KEY: None}), LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def roberta_url(roberta_engine):
    with serve_app(create_app(roberta_engine, KeyStore({KEY: None, "other": None}), LIMITS)) as url:
        yield url


def scored(response) -> tuple[np.ndarray, ScoreResponse]:
    assert response.status_code == 200, response.text
    parsed = ScoreResponse.model_validate(response.json())
    return decode_tensor(parsed.logits), parsed


# ------------------------------------------------------------------ exactness


def test_causal_logits_match_transformers(smol_url, default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = (rng.standard_normal((3, 4, 576)) * 0.13).astype(np.float32)
    texts = ["Review: a moving, funny film.\nSentiment:{mask}", "Review: dull and far too long.\nSentiment:{mask}"]
    words = [" negative", " positive"]
    logits, parsed = scored(post(smol_url, body(prompts, texts, words, [1, 0])))
    assert logits.shape == (3, 2, 2)

    label_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    bos = tok("x").input_ids[: -len(tok("x", add_special_tokens=False).input_ids)]
    anchor = httpx.get(f"{smol_url}/v1/model").json()["prompt_anchor"]
    assert bos == [] and anchor is None  # SmolLM2 adds no BOS, and the default puts no anchor in its place
    embed = model.get_input_embeddings()
    ref = np.zeros_like(logits)
    with torch.inference_mode():
        for p in range(3):
            for n, text in enumerate(texts):
                ids = tok(text.replace("{mask}", ""), add_special_tokens=False).input_ids
                x = torch.cat(
                    [embed(torch.tensor(bos, dtype=torch.long)), torch.from_numpy(prompts[p]), embed(torch.tensor(ids))]
                )
                ref[p, n] = model(inputs_embeds=x[None]).logits[0, -1, label_ids].numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    shifted = ref - ref.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected_loss = -(logp[:, 0, 1] + logp[:, 1, 0]) / 2
    np.testing.assert_allclose(parsed.loss, expected_loss, rtol=1e-4)
    assert parsed.usage.sequences == 6
    # The (specials + prompt) prefix runs once per candidate; each text continues from its keys and values.
    text_tokens = sum(len(tok(t.replace("{mask}", ""), add_special_tokens=False).input_ids) for t in texts)
    assert parsed.usage.tokens == 3 * (len(bos) + 4) + 3 * text_tokens


def test_masked_logits_match_transformers(roberta_url, tiny_roberta_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta_dir)
    model = AutoModelForMaskedLM.from_pretrained(tiny_roberta_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    dim = model.config.hidden_size
    prompts = rng.standard_normal((2, 3, dim)).astype(np.float32) * 0.02
    texts = ["the movie was long . it was {mask} .", "{mask} film with a great story", "a bad ending . it was {mask}"]
    words = [" bad", " great"]
    logits, _ = scored(post(roberta_url, body(prompts, texts, words)))

    label_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    embed = model.get_input_embeddings()
    ref = np.zeros_like(logits)
    with torch.inference_mode():
        for p in range(2):
            for n, text in enumerate(texts):
                ids = tok(text.replace("{mask}", tok.mask_token)).input_ids
                pos = ids.index(tok.mask_token_id) + 3
                x = torch.cat(
                    [embed(torch.tensor(ids[:1])), torch.from_numpy(prompts[p]), embed(torch.tensor(ids[1:]))]
                )
                ref[p, n] = model(inputs_embeds=x[None]).logits[0, pos, label_ids].numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("which", ["smol", "roberta"])
def test_prompt_of_prefix_embeddings_equals_plain_prefix(which, request):
    """A soft prompt equal to a text prefix's input embeddings scores exactly as that prefix written out (after
    the anchor token, which the tokenizer reads as the one special token)."""
    engine = request.getfixturevalue(f"{which}_engine")
    url = request.getfixturevalue(f"{which}_url")
    tok = engine.tokenizer
    prefix, rest = (
        ("Review:", " a great film, moving and funny.\nSentiment:{mask}")
        if which == "smol"
        else ("the movie", " was great . it was {mask} .")
    )
    pre_ids = tok(prefix, add_special_tokens=False).input_ids
    assert tok((prefix + rest).replace("{mask}", ""), add_special_tokens=False).input_ids[: len(pre_ids)] == pre_ids
    # A soft prompt is preceded by the anchor where the model has one (SmolLM2): written out, it leads the text.
    plain = (engine.info.prompt_anchor or "") + prefix + rest
    with torch.inference_mode():
        soft = engine.embed(torch.tensor(pre_ids)).float().numpy()[None]
    words = [" negative", " positive"] if which == "smol" else [" bad", " great"]
    with_prompt, _ = scored(post(url, body(soft, [rest], words)))
    written, _ = scored(post(url, body(np.zeros((1, 0, soft.shape[2]), np.float32), [plain], words)))
    np.testing.assert_allclose(with_prompt, written, rtol=1e-4, atol=1e-5)


def test_local_directory_loads_through_the_cli_path(tiny_roberta_dir):
    """`fedbpt serve --model PATH` resolves a local HF directory as given (no hub, no default alias)."""
    from inference_service.server import build_engine

    engine = build_engine(str(tiny_roberta_dir), dtype="float32", limits=LIMITS)
    assert engine.info.kind == "masked" and engine.info.name == tiny_roberta_dir.name
    assert engine.info.dtype == "float32" and engine.info.engine == "torch"


def test_float16_wire_and_model_info(roberta_url, roberta_engine):
    info = httpx.get(f"{roberta_url}/v1/model").json()
    assert info["kind"] == "masked" and info["engine"] == "torch" and info["mask_token"] == "<mask>"
    assert info["hidden_size"] == 48 and info["max_prompt_length"] == LIMITS.max_prompt_length
    assert info["embedding_std"] == pytest.approx(float(roberta_engine.embed.weight.detach().std()), rel=1e-6)
    prompts = np.random.default_rng(2).standard_normal((2, 2, 48)).astype(np.float16)
    l16, _ = scored(post(roberta_url, body(prompts, ["it was {mask}"], [" bad", " great"], dtype="float16")))
    l32, _ = scored(post(roberta_url, body(prompts.astype(np.float32), ["it was {mask}"], [" bad", " great"])))
    np.testing.assert_array_equal(l16, l32)
    assert httpx.get(f"{roberta_url}/healthz").status_code == 200
    assert httpx.get(f"{roberta_url}/docs").status_code == 404  # off unless --docs: the page needs a CDN
    assert "/v1/score" in httpx.get(f"{roberta_url}/openapi.json").json()["paths"]


# ------------------------------------------------------------------ bad input


def _good(dim=48):
    return body(
        np.zeros((2, 2, dim), np.float32), ["it was {mask} .", "a great film . {mask}"], [" bad", " great"], [0, 1]
    )


def _with(**changes):
    payload = _good()
    for key, value in changes.items():
        if value is _DROP:
            payload.pop(key)
        elif key.startswith("prompts_"):
            payload["prompts"][key.removeprefix("prompts_")] = value
        else:
            payload[key] = value
    return payload


_DROP = object()
_nan = np.zeros((2, 2, 48), np.float32)
_nan[1, 0, 3] = np.nan
_inf = np.zeros((2, 2, 48), np.float32)
_inf[0, 1, 0] = np.inf

BAD_INPUTS = {
    "rank": (_with(prompts=encode_tensor(np.zeros((2, 48), np.float32)).model_dump()), "prompts.shape"),
    "dim": (_with(prompts=encode_tensor(np.zeros((2, 2, 47), np.float32)).model_dump()), "hidden size"),
    "too-long-prompt": (_with(prompts=encode_tensor(np.zeros((1, 17, 48), np.float32)).model_dump()), "L = 17"),
    "nan": (_with(prompts=encode_tensor(_nan).model_dump()), "NaN"),
    "inf": (_with(prompts=encode_tensor(_inf).model_dump()), "NaN or infinite"),
    "dtype": (_with(prompts_dtype="float64"), "prompts.dtype"),
    "base64": (_with(prompts_data="!!!notbase64"), "base64"),
    "truncated": (_with(prompts_data=base64.b64encode(b"\0" * 100).decode()), "bytes"),
    "empty-texts": (_with(texts=[], labels=_DROP), "texts"),
    "one-label-word": (_with(label_words=[" bad"]), "label_words"),
    "multi-token-word": (_with(label_words=[" bad", " marvellously"]), "label_words[1]"),
    "label-range": (_with(labels=[0, 2]), "labels[1]"),
    "label-count": (_with(labels=[0]), "labels"),
    "no-slot": (_with(texts=["it was {mask}", "no slot here"]), "texts[1]"),
    "two-slots": (_with(texts=["{mask} and {mask}", "ok {mask}"]), "texts[0]"),
    "unknown-field": (_with(temperature=0.5), "temperature"),
    "missing-field": (_with(prompts=_DROP), "prompts"),
    "empty-population": (_with(prompts=encode_tensor(np.zeros((0, 2, 48), np.float32)).model_dump()), "P must"),
    "text-too-long": (_with(texts=["word " * 80 + "{mask}", "ok {mask}"]), "texts[0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_422_naming_the_field(roberta_url, case):
    payload, needle = BAD_INPUTS[case]
    r = post(roberta_url, payload)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]
    # The server is still up and answers the next good request.
    assert post(roberta_url, _good()).status_code == 200


def test_causal_slot_must_end_text(smol_url):
    r = post(smol_url, body(np.zeros((1, 1, 576), np.float32), ["{mask} is the answer"], [" negative", " positive"]))
    assert r.status_code == 422 and "texts[0]" in r.json()["detail"] and "end" in r.json()["detail"]


def test_population_and_body_limits_are_413(roberta_url):
    r = post(roberta_url, _with(prompts=encode_tensor(np.zeros((9, 1, 48), np.float32)).model_dump()))
    assert r.status_code == 413 and "P = 9" in r.json()["detail"]
    r = post(roberta_url, _with(texts=["a {mask}"] * 17, labels=_DROP))
    assert r.status_code == 413 and "texts" in r.json()["detail"]
    r = post(roberta_url, _with(texts=["x" * 500_000 + "{mask}", "a {mask}"]))
    assert r.status_code == 413 and "body" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'{"texts": ["'
        for _ in range(100):
            yield b"y" * 10_000
        yield b'"]}'

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{roberta_url}/v1/score", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert post(roberta_url, _good()).status_code == 200


def test_non_json_and_non_utf8_bodies_are_4xx(roberta_url):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (b"\xff\xfe\x00garbage", b"{not json", b"[]"):
        r = httpx.post(f"{roberta_url}/v1/score", content=raw, headers=headers)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)


# ------------------------------------------------------------------ auth, quota, metering


def test_auth_rejects_missing_and_unknown_keys(roberta_url):
    assert post(roberta_url, _good(), key=None).status_code == 401
    r = post(roberta_url, _good(), key="nope")
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    # Authentication comes before validation: a stranger learns nothing about the request's faults.
    assert post(roberta_url, {"junk": 1}, key="nope").status_code == 401


def test_quota_is_429_and_metrics_count_per_key(roberta_engine):
    keys = KeyStore({"metered": 3, "free": None})
    with serve_app(create_app(roberta_engine, keys, LIMITS)) as url:
        assert post(url, _good(), key="metered").status_code == 200
        # Rejected after its body was decoded and checked: that work is charged too.
        assert post(url, _with(labels=[0, 5]), key="metered").status_code == 422
        assert post(url, _good(), key="metered").status_code == 200
        r = post(url, _good(), key="metered")
        assert r.status_code == 429 and "quota" in r.json()["detail"]
        assert post(url, _good(), key="free").status_code == 200
        assert keys.usage("metered") == (3, 3)
        text = httpx.get(f"{url}/metrics").text
        assert f'fedbpt_key_queries_total{{key_id="{keys.key_id("metered")}"}} 2.0' in text
        assert f'fedbpt_key_queries_total{{key_id="{keys.key_id("free")}"}} 1.0' in text
        # Salted: the published id is not the bare hash of the key, which anyone could compute from a guess.
        assert key_id("metered") not in text and "metered" not in text.replace(keys.key_id("metered"), "")
        assert 'fedbpt_requests_total{endpoint="/v1/score",status="429"} 1.0' in text
        assert "fedbpt_sequences_total 12.0" in text


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nalpha 5\nbeta\n")
    monkeypatch.setenv("FEDBPT_API_KEYS", "gamma, delta")
    store = KeyStore.from_sources(str(keys_file), default_quota=3)
    assert store.usage("alpha") == (0, 5) and store.usage("beta") == (0, 3) and store.usage("gamma") == (0, 3)
    assert not store.known("epsilon") and store.known("delta")
    keys_file.write_text("alpha five\n")
    with pytest.raises(ValueError, match="keys:1"):
        KeyStore.from_sources(str(keys_file))
