"""The benchmark's baselines: in-context learning through the real service, and white-box FedPrompt.

FedPrompt's forward must be the service's scoring, or its accuracy would not bound what the black-box
methods optimise: checked against the engine's logits for the same prompt and texts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_clients.data import Example, client_shard, load_splits
from fed_clients.service_client import ServiceClient
from fed_clients.tasks import get_task
from fedbpt.bench.fedprompt import PromptUpdate, fedavg, fedprompt_run, prompt_label_logits
from fedbpt.bench.icl import icl_evaluate, pick_demos, render_icl
from fedbpt.loopback import serve_app
from fedbpt_wire.projection import initial_prompt
from fedbpt_wire.tensors import encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.engine import ScoreBatch
from inference_service.torch_engine import TorchEngine

TASK = get_task("rotten_tomatoes")


@pytest.fixture(scope="module")
def splits():
    return load_splits("default", TASK)


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return TorchEngine(str(default_model_dir), dtype="float32", device="cpu")


def transformers_reference(model_dir, prompt: np.ndarray, texts: list[str], words: list[str]) -> np.ndarray:
    """[N, C] label-word logits of SmolLM2 for prompt + text, one sequence at a time, straight from transformers:
    no BOS (its tokenizer adds none), the prompt vectors, the text up to the slot; the last position's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    embed = model.get_input_embeddings()
    label_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    out = np.zeros((len(texts), len(words)), np.float32)
    with torch.inference_mode():
        for n, text in enumerate(texts):
            assert text.endswith("{mask}")
            ids = torch.tensor(tok(text.removesuffix("{mask}"), add_special_tokens=False).input_ids)
            x = torch.cat([torch.from_numpy(prompt), embed(ids)])
            out[n] = model(inputs_embeds=x[None]).logits[0, -1, label_ids].numpy()
    return out


def test_fedprompt_logits_match_an_independent_forward(engine, splits, default_model_dir):
    examples = splits["test"][:6]  # reviews of different lengths: padding inside one batch
    texts = [TASK.render(ex.fields, engine.kind) for ex in examples]
    assert len({len(t) for t in texts}) > 1
    prompt = initial_prompt(7, 4, engine.info.hidden_size, engine.info.embedding_std)
    reference = transformers_reference(default_model_dir, prompt, texts, list(TASK.label_words))
    label_ids = torch.tensor(engine.label_token_ids(list(TASK.label_words)))
    with torch.inference_mode():
        ours = prompt_label_logits(engine, torch.from_numpy(prompt), engine.tokenize(texts), label_ids).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    # And the same forward carries a gradient to the prompt, which is all FedPrompt trains.
    p = torch.nn.Parameter(torch.from_numpy(prompt.copy()))
    prompt_label_logits(engine, p, engine.tokenize(texts[:2]), label_ids).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_fedavg_weights_by_sample_count():
    a, b = np.full((2, 3), 1.0, np.float32), np.full((2, 3), 4.0, np.float32)
    np.testing.assert_allclose(fedavg([a, b], [3, 1]), np.full((2, 3), 1.75))  # (3*1 + 1*4) / 4
    np.testing.assert_allclose(fedavg([a, b], [0, 5]), b)
    with pytest.raises(ValueError):
        fedavg([a, b], [0, 0])
    with pytest.raises(ValueError):
        fedavg([a], [1, 1])


def test_fedprompt_run_trains_and_counts_prompt_bytes(engine, default_model_dir, splits):
    shards = [client_shard(splits["train"], k, 2, None, seed=0, per_class=4) for k in range(2)]
    L, seen = 4, []
    out = fedprompt_run(
        default_model_dir,
        TASK,
        shards,
        splits["test"][:8],
        rounds=2,
        local_steps=2,
        lr=0.01,
        prompt_length=L,
        batch_size=4,
        seed=0,
        progress=seen.append,
    )
    assert [r["round"] for r in out["rounds"]] == [0, 1] and seen == out["rounds"]
    assert out["prompt"].shape == (L, 576) and out["trainable_params"] == L * 576
    first, last = out["rounds"]
    assert np.isfinite(first["train_loss"]) and last["train_loss"] < first["train_loss"]
    # The reported accuracy is that of the returned global prompt on the 8 test examples, scored here by the service
    # engine (another forward than FedPrompt's own).
    test = splits["test"][:8]
    texts = [TASK.render(ex.fields, engine.kind) for ex in test]
    logits = engine.score(ScoreBatch(out["prompt"][None], texts, list(TASK.label_words))).logits[0]
    assert out["test_accuracy"] == np.mean(logits.argmax(-1) == [ex.label for ex in test])
    # Bytes per client per round: the JSON of an L x D float32 tensor down; that plus the sample count up.
    tensor_json = len(encode_tensor(np.zeros((L, 576), np.float32)).model_dump_json())
    assert tensor_json > L * 576 * 4 * 4 // 3  # base64 of the float32 bytes, plus dtype and shape
    up = sum(tensor_json + len('{"prompt":,"num_samples":}') + len(str(len(s.train))) for s in shards)
    for r in out["rounds"]:
        assert r["bytes_down"] == 2 * tensor_json and r["bytes_up"] == up
    assert len(PromptUpdate(prompt=encode_tensor(out["prompt"]), num_samples=3).model_dump_json()) == (
        tensor_json + len('{"prompt":,"num_samples":3}')
    )
    assert out["bytes_up"] == 2 * up and out["client_model_bytes"] > 100e6 * 4  # 135M fp32 parameters


def test_render_icl_puts_labelled_demos_before_the_input():
    demos = [Example({"text": "Grating and tedious."}, 0), Example({"text": "A joy."}, 1)]
    query = Example({"text": "Fine {mask} film."}, 1)
    assert render_icl(TASK, demos, query, "causal") == (
        "Review: Grating and tedious.\nSentiment: negative\n\n"
        "Review: A joy.\nSentiment: positive\n\n"
        "Review: Fine { mask } film.\nSentiment:{mask}"
    )
    # A masked template has the space before the slot already: the label word's own space is dropped.
    assert (
        render_icl(TASK, demos[1:], query, "masked")
        == "A joy. . It was positive . Fine { mask } film. . It was {mask} ."
    )
    assert render_icl(TASK, [], query, "causal") == TASK.render(query.fields, "causal")


def test_pick_demos_balanced_short_and_seeded(splits):
    demos = pick_demos(splits["train"], k=5, seed=3)
    assert len(demos) == 5 and len({id(d) for d in demos}) == 5
    assert sorted(np.bincount([d.label for d in demos], minlength=2)) == [2, 3]
    assert all(len(d.fields["text"]) <= 100 for d in demos)
    assert pick_demos(splits["train"], k=5, seed=3) == demos
    assert pick_demos(splits["train"], k=5, seed=4) != demos
    # Too few short examples: still balanced, the short ones and then the shortest of the long ones.
    pool = [Example({"text": "x" * n}, y) for n, y in [(300, 0), (20, 0), (150, 1), (30, 1), (400, 1)]]
    assert sorted(len(d.fields["text"]) for d in pick_demos(pool, k=4, seed=0)) == [20, 30, 150, 300]


def test_icl_evaluate_through_the_real_service(engine, splits):
    test = splits["test"][:16]
    demos = pick_demos(splits["train"], k=5, seed=0)
    with serve_app(create_app(engine, KeyStore({"k": None}))) as url:
        service = ServiceClient(url, "k")
        try:
            icl = icl_evaluate(service, TASK, demos, test, engine.kind, max_texts=8)
            zero = icl_evaluate(service, TASK, [], test, engine.kind, max_texts=16)
        finally:
            service.close()
    labels = np.array([ex.label for ex in test])
    for r, demo_set in ((icl, demos), (zero, [])):
        # The logits are the engine's for the rendered texts with no soft prompt, and the accuracy their share right.
        texts = [render_icl(TASK, demo_set, ex, engine.kind) for ex in test]
        direct = engine.score(
            ScoreBatch(np.zeros((1, 0, engine.info.hidden_size), np.float32), texts, list(TASK.label_words))
        ).logits[0]
        np.testing.assert_allclose(r["logits"], direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
        assert r["accuracy"] == np.mean(r["logits"].argmax(-1) == labels) and np.isfinite(r["loss"])
        assert r["sequences"] == 16 and r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["examples"] == 16
    assert icl["queries"] == 2 and zero["queries"] == 1 and icl["demos"] == 5
    # The demos are sent with every input: the token bill, not a soft prompt, is ICL's cost.
    assert icl["tokens"] > zero["tokens"] + 16 * 5 * 5 and icl["bytes_up"] > zero["bytes_up"]
