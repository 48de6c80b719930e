"""One contract for every engine: shapes, exact label-word logits, prompt placement, padding, errors.

Parametrised over the engines present: the PyTorch engine on CPU always, on CUDA where a GPU is, and
the vLLM engine where vllm and a GPU are (skipped with the reason otherwise).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_service.app import public_model_info
from inference_service.engine import InputError, ScoreBatch
from inference_service.limits import Limits

from ..conftest import build_tiny_llama, build_tiny_roberta

LIMITS = Limits(max_prompt_length=16, max_population=8, max_texts=16, max_text_tokens=48, max_batch_tokens=4096)
HAS_CUDA = torch.cuda.is_available()
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    return {"masked": build_tiny_roberta(root / "roberta"), "causal": build_tiny_llama(root / "llama")}


def _torch(device):
    def make(path, limits=LIMITS):
        from inference_service.torch_engine import TorchEngine

        return TorchEngine(str(path), dtype="float32", device=device, limits=limits)

    return make


def _vllm(path, limits=LIMITS):
    from inference_service.vllm_engine import VllmEngine

    return VllmEngine(str(path), dtype="float32", limits=limits, gpu_memory_utilization=0.3, enforce_eager=True)


ENGINES = [
    pytest.param("torch-cpu", _torch("cpu"), id="torch-cpu"),
    pytest.param(
        "torch-cuda",
        _torch("cuda"),
        id="torch-cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    ),
    pytest.param(
        "vllm",
        _vllm,
        id="vllm",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not (HAS_CUDA and HAS_VLLM), reason="vllm needs a CUDA host with vllm installed (extra 'vllm')"
            ),
        ],
    ),
]
KINDS = ["causal", "masked"]
TEXTS = {
    "causal": ["the movie was great and the story was", "a bad film with a bad ending , it was", "hello world"],
    "masked": ["the movie was {mask} .", "{mask} film with a great story", "a bad ending . it was {mask}"],
}


@pytest.fixture(scope="module")
def engines(model_dirs):
    cache = {}

    def get(name, make, kind):
        if name == "vllm" and kind == "masked":
            pytest.skip("the vllm engine serves causal LMs only")
        if (name, kind) not in cache:
            cache[(name, kind)] = make(model_dirs[kind])
        return cache[(name, kind)]

    return get


def _texts(kind):
    return [t if kind == "masked" else t + "{mask}" for t in TEXTS[kind]]


def _reference(path, kind, prompts, texts, words, device):
    """A direct transformers forward of each sequence, one at a time, built from the tokenizer's own output."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    cls = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).to(device).eval()
    embed = model.get_input_embeddings()
    label_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    out = np.zeros((len(prompts), len(texts), len(words)), np.float32)
    with torch.inference_mode():
        for n, text in enumerate(texts):
            if kind == "masked":
                ids = tok(text.replace("{mask}", tok.mask_token)).input_ids
                pos = ids.index(tok.mask_token_id)
            else:
                ids = tok(text.replace("{mask}", "")).input_ids
                ids = ids[:-1] if ids[-1] == tok.eos_token_id else ids  # the causal layout drops trailing EOS
                pos = len(ids) - 1
            ids_t = torch.tensor(ids, device=device)
            for p in range(len(prompts)):
                soft = torch.from_numpy(prompts[p]).to(device)
                x = torch.cat([embed(ids_t[:1]), soft, embed(ids_t[1:])])
                out[p, n] = model(inputs_embeds=x[None]).logits[0, pos + len(soft), label_ids].float().cpu().numpy()
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,make", ENGINES)
def test_logits_match_transformers(engines, model_dirs, name, make, kind):
    engine = engines(name, make, kind)
    dim = engine.info.hidden_size
    prompts = (np.random.default_rng(0).standard_normal((3, 4, dim)) * engine.info.embedding_std).astype(np.float32)
    words = [" bad", " great"]
    result = engine.score(ScoreBatch(prompts, _texts(kind), words))
    assert result.logits.shape == (3, 3, 2) and result.logits.dtype == np.float32
    assert result.sequences == 9 and result.engine_ms > 0
    device = "cuda" if name != "torch-cpu" else "cpu"
    ref = _reference(model_dirs[kind], kind, prompts, _texts(kind), words, device)
    np.testing.assert_allclose(result.logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_scores_track_float32(engines, model_dirs, kind):
    """The one check in bf16, which `--dtype auto` picks on GPUs and on CPUs with AMX/AVX512-BF16; everything else
    here is float32, for exactness. bf16 keeps 8 significant bits (a rounding of at most 2^-9 relative): the
    roundings through two layers stay within 8 x 2^-8 of the logits' scale."""
    from inference_service.torch_engine import TorchEngine

    fp32 = engines("torch-cpu", _torch("cpu"), kind)
    bf16 = TorchEngine(str(model_dirs[kind]), dtype="bfloat16", device="cpu", limits=LIMITS)
    assert bf16.info.dtype == "bfloat16"
    prompts = (
        np.random.default_rng(0).standard_normal((3, 4, fp32.info.hidden_size)) * fp32.info.embedding_std
    ).astype(np.float32)
    batch = ScoreBatch(prompts, _texts(kind), [" bad", " great"])
    exact, rounded = fp32.score(batch).logits, bf16.score(batch).logits
    assert rounded.dtype == np.float32 and np.isfinite(rounded).all()
    np.testing.assert_allclose(rounded, exact, rtol=0, atol=8 * 2**-8 * np.abs(exact).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,make", ENGINES)
def test_prefix_embeddings_equal_plain_prefix(engines, name, make, kind):
    engine = engines(name, make, kind)
    tok = engine.tokenizer
    prefix, rest = "the movie", " was great . it was" + (" {mask} ." if kind == "masked" else "{mask}")
    pre_ids = tok(prefix, add_special_tokens=False).input_ids
    with torch.inference_mode():
        soft = engine.embed(torch.tensor(pre_ids, device=engine.embed.weight.device)).float().cpu().numpy()[None]
    words = [" bad", " great"]
    with_prompt = engine.score(ScoreBatch(soft, [rest], words)).logits
    written = engine.score(ScoreBatch(np.zeros((1, 0, soft.shape[2]), np.float32), [prefix + rest], words)).logits
    np.testing.assert_allclose(with_prompt, written, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,make", ENGINES)
def test_padding_and_micro_batching_do_not_change_logits(engines, model_dirs, name, make, kind):
    engine = engines(name, make, kind)
    dim = engine.info.hidden_size
    prompts = np.random.default_rng(1).standard_normal((4, 2, dim)).astype(np.float32) * 0.05
    texts = _texts(kind)
    together = engine.score(ScoreBatch(prompts, texts, [" bad", " great"])).logits
    alone = np.concatenate([engine.score(ScoreBatch(prompts, [t], [" bad", " great"])).logits for t in texts], 1)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    tight = make(model_dirs[kind], Limits(**{**LIMITS.__dict__, "max_batch_tokens": 16}))
    np.testing.assert_allclose(
        tight.score(ScoreBatch(prompts, texts, [" bad", " great"])).logits, together, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,make", ENGINES)
def test_input_errors_name_the_field(engines, name, make, kind):
    engine = engines(name, make, kind)
    zeros = np.zeros((1, 1, engine.info.hidden_size), np.float32)
    cases = [
        (ScoreBatch(zeros, _texts(kind), [" bad", " marvellously"]), "label_words[1]"),
        (ScoreBatch(zeros, [_texts(kind)[0], "no slot"], [" bad", " great"]), "texts[1]"),
        (ScoreBatch(zeros, ["great " * 60 + "{mask}"], [" bad", " great"]), "texts[0]"),
    ]
    if kind == "causal":
        cases.append((ScoreBatch(zeros, ["{mask} was the word"], [" bad", " great"]), "texts[0]"))
    for batch, field in cases:
        with pytest.raises(InputError) as err:
            engine.score(batch)
        assert err.value.field == field


@pytest.mark.parametrize("name,make", ENGINES)
def test_model_info_describes_the_model(engines, model_dirs, name, make):
    engine = engines(name, make, "causal")
    info = public_model_info(engine.info, LIMITS)
    assert info.kind == "causal" and info.hidden_size == 64 and info.mask_token is None
    assert info.engine == name.split("-")[0] and info.max_prompt_length == LIMITS.max_prompt_length
    assert info.embedding_std == pytest.approx(float(engine.embed.weight.detach().float().std()), rel=1e-5)


def test_vllm_asks_for_label_logits_by_id_and_masks_only_beyond_its_limit():
    from inference_service.vllm_engine import _MAX_LOGPROB_TOKEN_IDS, _sampling_params

    few = _sampling_params(dict, [7, 3])
    assert few == {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": [7, 3], "detokenize": False}
    many = list(range(_MAX_LOGPROB_TOKEN_IDS + 1))
    masked = _sampling_params(dict, many)
    assert masked["allowed_token_ids"] == many and masked["logprobs"] == len(many)
    assert "logprob_token_ids" not in masked and masked["temperature"] == 0.0


def test_auto_dtype_follows_the_cpus_bf16_support(tmp_path):
    """bf16 where the CPU has AVX512-BF16 or AMX (injected /proc/cpuinfo flags), fp32 elsewhere; bf16 on CUDA."""
    from inference_service.engine_base import cpu_has_bf16, resolve_dtype

    cpu = torch.device("cpu")
    cases = {
        "flags\t\t: fpu sse avx2 fma": torch.float32,
        "flags\t\t: fpu avx2 avx512f avx512_bf16": torch.bfloat16,
        "flags\t\t: fpu avx2 amx_bf16 amx_tile": torch.bfloat16,
    }
    for i, (flags, dtype) in enumerate(cases.items()):
        info = tmp_path / f"cpuinfo-{i}"
        info.write_text(f"processor\t: 0\n{flags}\n")
        assert cpu_has_bf16(info) == (dtype == torch.bfloat16)
        assert resolve_dtype("auto", cpu, info) == dtype
        assert resolve_dtype("float32", cpu, info) == torch.float32
    assert not cpu_has_bf16(tmp_path / "missing")
    assert resolve_dtype("auto", torch.device("cuda"), tmp_path / "missing") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("float64", cpu)
