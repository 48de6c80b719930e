"""FedPrompt, the benchmark grid's white-box baseline (in-context learning, the black-box one, is `icl`).

FedPrompt is the white-box reference the black-box setting forbids: every client holds the model and
trains the L x D soft prompt by backpropagation, and the server averages the prompts (FedAvg). Its
forward is the service's scoring (same layout, same label-word logits, same loss), so it optimises
exactly the objective the black-box methods can only query; communication is counted as JSON bodies of
the prompt, the way the black-box methods' wire bytes are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from fed_clients.data import ClientData, Example
from fed_clients.tasks import Task
from fedbpt_wire.metrics import label_cross_entropy
from fedbpt_wire.projection import initial_prompt
from fedbpt_wire.schemas import Tensor
from fedbpt_wire.tensors import encode_tensor
from inference_service.layout import TextIds, sequence
from inference_service.torch_engine import TorchEngine


class PromptUpdate(BaseModel):
    """What a FedPrompt client uploads each round; only its JSON size is used, to count bytes up."""

    prompt: Tensor
    num_samples: int


def fedavg(prompts: list[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of the clients' prompts (weights: their numbers of training examples)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(prompts) != len(w) or not len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per prompt with a positive sum, got {weights}")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in prompts])
    return np.tensordot(w / w.sum(), stacked, axes=1).astype(np.float32)


def prompt_label_logits(
    engine: TorchEngine, prompt: torch.Tensor, texts: list[TextIds], label_ids: torch.Tensor
) -> torch.Tensor:
    """[N, C] label-word logits of one prompt [L, D] on tokenized texts, differentiable in `prompt`.

    The engine's layout (`inference_service.layout.sequence`: specials, anchor, the text's head, the prompt, the
    rest), right-padded; the hidden state at each text's own slot, so padding never moves the read position.
    """
    n, dev, n_prompt = len(texts), engine.device, prompt.shape[0]
    seqs = [sequence(engine.layout, t, n_prompt) for t in texts]
    rows = [q.lead + [0] * n_prompt + q.tail for q in seqs]
    lengths = torch.tensor([len(r) for r in rows], device=dev)
    ids = torch.zeros(n, int(lengths.max()), dtype=torch.long, device=dev)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    x = engine.embed(ids).to(engine.dtype)
    lead = torch.tensor([len(q.lead) for q in seqs], device=dev)
    at = lead[:, None] + torch.arange(n_prompt, device=dev)
    x = x.index_put((torch.arange(n, device=dev)[:, None], at), prompt.to(dev, engine.dtype).expand(n, -1, -1))
    mask = (torch.arange(x.shape[1], device=dev) < lengths[:, None]).long()
    hidden = engine.body(inputs_embeds=x, attention_mask=mask).last_hidden_state
    slots = torch.tensor([len(q.lead) + n_prompt + q.slot for q in seqs], device=dev)
    picked = hidden[torch.arange(n, device=dev), slots]
    if engine.kind == "causal" and isinstance(engine.head, torch.nn.Linear):
        # The C label rows of the output matrix only, as the engine does: no full-vocabulary product.
        bias = engine.head.bias[label_ids] if engine.head.bias is not None else None
        return torch.nn.functional.linear(picked, engine.head.weight[label_ids], bias)
    return engine.head(picked)[:, label_ids]


def _evaluate(
    engine: TorchEngine,
    prompt: np.ndarray,
    texts: list[TextIds],
    labels: np.ndarray,
    label_ids: torch.Tensor,
    batch_size: int,
) -> tuple[float, float]:
    # Length-sorted batches keep padding small; logits go back to the examples' order for the labels.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].ids))
    logits = np.empty((len(texts), len(label_ids)), np.float32)
    p = torch.from_numpy(prompt)
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            logits[idx] = prompt_label_logits(engine, p, [texts[i] for i in idx], label_ids).float().cpu().numpy()
    loss, acc = label_cross_entropy(logits[None], labels)
    return float(loss[0]), float(acc[0])


def _local_train(
    engine: TorchEngine,
    start: np.ndarray,
    texts: list[TextIds],
    labels: torch.Tensor,
    label_ids: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[float]]:
    # fp32 master copy of the prompt whatever the model's dtype; Adam starts afresh each round because the
    # prompt it would carry moments for has just been replaced by the global average.
    prompt = torch.nn.Parameter(torch.from_numpy(start.copy()).to(engine.device))
    opt = torch.optim.Adam([prompt], lr=lr)
    losses = []
    for _ in range(steps):
        idx = (
            np.arange(len(texts))
            if len(texts) <= batch_size
            else np.sort(rng.choice(len(texts), batch_size, replace=False))
        )
        logits = prompt_label_logits(engine, prompt, [texts[i] for i in idx], label_ids)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[torch.from_numpy(idx)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return prompt.detach().cpu().numpy(), losses


def fedprompt_run(
    model_dir: str | Path,
    task: Task,
    shards: list[ClientData],
    test: list[Example],
    *,
    rounds: int,
    local_steps: int,
    lr: float,
    prompt_length: int,
    batch_size: int,
    seed: int,
    dtype: str = "float32",
    device: str = "cpu",
    final_test: list[Example] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """FedAvg of gradient-trained soft prompts; test accuracy of the global prompt after every round.

    `final_test`, if given, is scored once with the last global prompt (`final_test_accuracy`): a large
    held-out set for the result while `test` stays small enough to score every round.

    The start is the black-box methods' P0 (`initial_prompt` from `seed`: pass the run's projection seed
    for the identical start). Each client's local work: `local_steps` Adam steps on mini-batches of
    `batch_size` of its training examples, seeded by (seed, client, round).
    """
    if not shards or any(not s.train for s in shards):
        raise ValueError("every FedPrompt client needs training examples")
    engine = TorchEngine(str(model_dir), dtype=dtype, device=device)
    engine.model.requires_grad_(False)
    kind = engine.kind
    label_ids = torch.tensor(engine.label_token_ids(list(task.label_words)), device=engine.device)
    client_texts = [engine.tokenize([task.render(ex.fields, kind) for ex in s.train]) for s in shards]
    client_labels = [torch.tensor([ex.label for ex in s.train], device=engine.device) for s in shards]
    weights = [len(s.train) for s in shards]
    test_texts = engine.tokenize([task.render(ex.fields, kind) for ex in test])
    test_labels = np.array([ex.label for ex in test])
    eval_batch = max(batch_size, 32)

    t_start = time.perf_counter()
    prompt = initial_prompt(seed, prompt_length, engine.info.hidden_size, engine.info.embedding_std)
    init_loss, init_acc = _evaluate(engine, prompt, test_texts, test_labels, label_ids, eval_batch)
    history = []
    for r in range(rounds):
        t0 = time.perf_counter()
        down_body = len(encode_tensor(prompt).model_dump_json())
        local, losses, up, down = [], [], 0, 0
        for k in range(len(shards)):
            down += down_body
            p, step_losses = _local_train(
                engine,
                prompt,
                client_texts[k],
                client_labels[k],
                label_ids,
                local_steps,
                lr,
                batch_size,
                np.random.default_rng([seed, k, r]),
            )
            up += len(PromptUpdate(prompt=encode_tensor(p), num_samples=weights[k]).model_dump_json())
            local.append(p)
            losses.extend(step_losses)
        prompt = fedavg(local, weights)
        test_loss, test_acc = _evaluate(engine, prompt, test_texts, test_labels, label_ids, eval_batch)
        record = {
            "round": r,
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "train_loss": float(np.mean(losses)),
            "bytes_up": up,
            "bytes_down": down,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        if progress is not None:
            progress(record)
    final = {}
    if final_test is not None:
        final_texts = engine.tokenize([task.render(ex.fields, kind) for ex in final_test])
        final_loss, final_acc = _evaluate(
            engine, prompt, final_texts, np.array([ex.label for ex in final_test]), label_ids, eval_batch
        )
        final = {"final_test_accuracy": final_acc, "final_test_loss": final_loss}
    return {
        **final,
        "initial_test_accuracy": init_acc,
        "initial_test_loss": init_loss,
        "test_accuracy": history[-1]["test_accuracy"] if history else init_acc,
        "test_loss": history[-1]["test_loss"] if history else init_loss,
        "rounds": history,
        "bytes_up": sum(h["bytes_up"] for h in history),
        "bytes_down": sum(h["bytes_down"] for h in history),
        # What each client must hold and run, which the black-box setting spares it.
        "client_model_bytes": sum(p.numel() * p.element_size() for p in engine.model.parameters()),
        "trainable_params": prompt.size,
        "clients": len(shards),
        "train_examples": sum(weights),
        "seconds": time.perf_counter() - t_start,
        "prompt": prompt,
    }
