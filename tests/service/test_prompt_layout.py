"""Where the soft prompt sits (marker, anchor), what it starts from (init 'tokens'), and the key/value reuse
that makes scoring a population cheap: each checked against an independent transformers forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbpt_wire.projection import Projection, initial_token_ids
from inference_service.engine import InputError, ScoreBatch
from inference_service.layout import make_layout, sequence

from ..conftest import build_tiny_llama
from .test_engine_contract import LIMITS

WORDS = [" bad", " great"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("layout") / "llama")


def engine_for(path, **kwargs):
    from inference_service.torch_engine import TorchEngine

    return TorchEngine(str(path), dtype="float32", device="cpu", **{"limits": LIMITS, **kwargs})


@pytest.fixture(scope="module")
def llama(llama_dir):
    return engine_for(llama_dir)


def reference(path, prompts: np.ndarray, pieces: list[tuple[str, str]]) -> np.ndarray:
    """Logits at the last position of [BOS] + tokens(before) + prompt + tokens(after), one sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    embed = model.get_input_embeddings()
    label_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in WORDS]
    out = np.zeros((len(prompts), len(pieces), len(WORDS)), np.float32)
    with torch.inference_mode():
        for n, (before, after) in enumerate(pieces):
            head = [tok.bos_token_id] + (tok(before, add_special_tokens=False).input_ids if before else [])
            tail = tok(after, add_special_tokens=False).input_ids
            for p, soft in enumerate(prompts):
                x = torch.cat([embed(torch.tensor(head)), torch.from_numpy(soft), embed(torch.tensor(tail))])
                out[p, n] = model(inputs_embeds=x[None]).logits[0, -1, label_ids].numpy()
    return out


PIECES = [
    ("the movie was great and", " the story was"),
    ("a bad film", " with a bad ending , it was"),
    ("hello", " world"),
]


def test_prompt_marker_puts_the_prompt_inside_the_text(llama, llama_dir):
    prompts = (np.random.default_rng(0).standard_normal((3, 4, 64)) * llama.info.embedding_std).astype(np.float32)
    texts = [f"{before}{{prompt}}{after}{{mask}}" for before, after in PIECES]
    got = llama.score(ScoreBatch(prompts, texts, WORDS)).logits
    ref = reference(llama_dir, prompts, PIECES)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("marker", [True, False], ids=["after-text", "ahead"])
def test_kv_reuse_gives_the_logits_of_whole_sequences(llama_dir, marker):
    """Both reuse plans against the whole-sequence path, with ragged texts and a tiny batch budget."""
    reuse, whole = engine_for(llama_dir), engine_for(llama_dir, kv_reuse=False)
    texts = [(f"{b}{{prompt}}{a}" if marker else b + a) + "{mask}" for b, a in PIECES * 3]
    prompts = np.random.default_rng(1).standard_normal((5, 3, 64)).astype(np.float32) * 0.05
    seqs = [sequence(reuse.layout, t, 3) for t in reuse.tokenize(texts)]
    assert reuse.reuse_plan(seqs, 3) == ("text" if marker else "prompt")
    a, b = reuse.score(ScoreBatch(prompts, texts, WORDS)), whole.score(ScoreBatch(prompts, texts, WORDS))
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4 * np.abs(b.logits).max())
    assert a.sequences == b.sequences and a.tokens < b.tokens  # the shared part ran once
    tight = engine_for(llama_dir, limits=type(LIMITS)(**{**LIMITS.__dict__, "max_batch_tokens": 24}))
    np.testing.assert_allclose(
        tight.score(ScoreBatch(prompts, texts, WORDS)).logits, b.logits, rtol=1e-4, atol=1e-4 * np.abs(b.logits).max()
    )


def test_mixed_placements_and_bare_template_fall_back_to_whole_sequences(llama):
    texts = ["hello{prompt} world{mask}", "a bad film{mask}"]
    seqs = [sequence(llama.layout, t, 2) for t in llama.tokenize(texts)]
    assert llama.reuse_plan(seqs, 2) == "text"  # BOS leads every text, so each has a lead to share
    no_bos = make_layout(llama.tokenizer, "causal", "none")
    bare = [sequence(no_bos, t, 2) for t in llama.tokenize(texts)]
    assert [s.lead[:1] for s in seqs] == [[llama.tokenizer.bos_token_id]] * 2
    assert bare[1].lead == seqs[1].lead  # the tiny tokenizer adds BOS itself: no anchor on top


def test_prompt_marker_errors_name_the_text(llama):
    zeros = np.zeros((1, 2, 64), np.float32)
    for text, message in [
        ("a{prompt} b{prompt} c{mask}", "at most once"),
        ("a {mask}{prompt}", "before the slot"),
        ("hello world{prompt}{mask}", "between the prompt and the slot"),
    ]:
        with pytest.raises(InputError, match=message) as err:
            llama.score(ScoreBatch(zeros, ["fine{mask}", text], WORDS))
        assert err.value.field == "texts[1]"


def test_anchor_leads_a_soft_prompt_where_the_tokenizer_adds_no_bos(default_model_dir):
    """SmolLM2's tokenizer adds no BOS: `auto` keeps a real token at the attention-sink position."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    auto = make_layout(tok, "causal", "auto")
    assert auto.prefix_ids == [] and auto.anchor_ids == (tok.bos_token_id,)
    assert make_layout(tok, "causal").anchor_ids == ()  # the default, by measurement
    assert make_layout(tok, "causal", "<|endoftext|>").anchor_ids == (tok.convert_tokens_to_ids("<|endoftext|>"),)
    with pytest.raises(ValueError, match="not a token"):
        make_layout(tok, "causal", "no-such-token-here")
    from inference_service.layout import TextIds

    text = TextIds([5, 6], 1)
    assert sequence(auto, text, 3).lead == list(auto.anchor_ids)  # with a soft prompt
    assert sequence(auto, text, 0).lead == []  # the bare template is what a user would send


def test_an_anchored_prompt_scores_as_transformers_reads_anchor_prompt_text(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_service.torch_engine import TorchEngine

    engine = TorchEngine(str(default_model_dir), dtype="float32", prompt_anchor="<|endoftext|>")
    assert engine.info.prompt_anchor == "<|endoftext|>"
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    prompts = (np.random.default_rng(3).standard_normal((2, 3, 576)) * engine.info.embedding_std).astype(np.float32)
    texts = ["Review: a fine film.\nSentiment:{mask}", "Review: dull.{prompt}\nSentiment:{mask}"]
    words = [" negative", " positive"]
    got = engine.score(ScoreBatch(prompts, texts, words)).logits
    anchor, label_ids = (
        tok.convert_tokens_to_ids("<|endoftext|>"),
        [tok(w, add_special_tokens=False).input_ids[0] for w in words],
    )
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        for n, (before, after) in enumerate(
            [("", "Review: a fine film.\nSentiment:"), ("Review: dull.", "\nSentiment:")]
        ):
            head = [anchor] + (tok(before, add_special_tokens=False).input_ids if before else [])
            tail = tok(after, add_special_tokens=False).input_ids
            for p in range(2):
                x = torch.cat([embed(torch.tensor(head)), torch.from_numpy(prompts[p]), embed(torch.tensor(tail))])
                ref = model(inputs_embeds=x[None]).logits[0, -1, label_ids].numpy()
                np.testing.assert_allclose(got[p, n], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_token_init_is_the_embeddings_of_seeded_vocabulary_ids(llama, llama_dir):
    """P0 under init 'tokens' = rows of the embedding table (read here from the checkpoint, not the engine)."""
    from safetensors.numpy import load_file

    weights = load_file(str(llama_dir / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    vocab = llama.info.vocab_size
    ids = initial_token_ids(7, 4, vocab)
    assert ids.shape == (4,) and (0 <= ids).all() and (ids < vocab).all()
    assert not np.array_equal(ids, initial_token_ids(8, 4, vocab))
    service_side = Projection(7, 10, 4, 64, llama.info.embedding_std, 1.0, "tokens", llama.token_embeddings, vocab)
    np.testing.assert_allclose(service_side(np.zeros(10))[0], table[ids], rtol=1e-6, atol=1e-7)
    client_side = Projection(7, 10, 4, 64, llama.info.embedding_std, 1.0, "tokens")
    with pytest.raises(ValueError, match="seed \\+ z"):
        client_side(np.zeros(10))
    np.testing.assert_array_equal(client_side.matrix, service_side.matrix)
