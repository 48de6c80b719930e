"""In-context learning, a baseline of the FedBPT benchmark grid.

It is black-box like FedBPT: it goes through the real inference service with no soft prompt, and only the text
sent changes (a few labelled demonstrations before each input).
"""

from __future__ import annotations

import time

import numpy as np

from fed_clients.data import Example
from fed_clients.service_client import ServiceClient
from fed_clients.tasks import Task
from fedbpt_wire.metrics import label_cross_entropy
from fedbpt_wire.schemas import SLOT

# A blank line reads as "next example" to a causal LM; a masked LM's templates are one sentence each.
_DEMO_SEPARATOR = {"causal": "\n\n", "masked": " "}


def pick_demos(train: list[Example], k: int = 5, seed: int = 0, max_chars: int = 100) -> list[Example]:
    """k training examples, balanced over labels where the pool allows, in a seeded random order.

    Examples of at most `max_chars` characters come first (at random), then the shortest of the rest, so
    k demos plus a long test input stay within the service's `max_text_tokens` (256 by default).
    """
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[Example]] = {}
    for i in rng.permutation(len(train)):
        by_label.setdefault(train[i].label, []).append(train[i])

    def excess(ex: Example) -> int:
        return max(sum(len(v) for v in ex.fields.values()) - max_chars, 0)

    # A shuffled label order decides which label gets the extra demo when k is not a multiple of C.
    queues = [iter(sorted(by_label[y], key=excess)) for y in rng.permutation(sorted(by_label))]
    picked: list[Example] = []
    while len(picked) < min(k, len(train)):
        for queue in queues:
            if len(picked) < k and (ex := next(queue, None)) is not None:
                picked.append(ex)
    # Shuffled again so the label of the demo nearest the input (the one a small LM copies most) is random.
    return [picked[i] for i in rng.permutation(len(picked))]


def render_demo(task: Task, demo: Example, kind: str) -> str:
    """The task's text for `demo` with its label word in the slot."""
    text = task.render(demo.fields, kind)
    word = task.label_words[demo.label]
    # Label words carry the space a masked LM's mask token swallows; where the template already has one, drop it.
    if text.split(SLOT)[0][-1:].isspace():
        word = word.lstrip()
    return text.replace(SLOT, word)


def render_icl(task: Task, demos: list[Example], example: Example, kind: str) -> str:
    """Demos with their label words, then the input's text still holding the slot."""
    parts = [render_demo(task, d, kind) for d in demos] + [task.render(example.fields, kind)]
    return _DEMO_SEPARATOR[kind].join(parts)


def icl_evaluate(
    service: ServiceClient, task: Task, demos: list[Example], test: list[Example], kind: str, max_texts: int
) -> dict:
    """Accuracy and loss of in-context learning on `test` through the service, and what it cost.

    No soft prompt: a zero-length one (L = 0), the bare-template request. With `demos=[]` this is the
    manual-prompt zero-shot baseline.
    """
    texts = [render_icl(task, demos, ex, kind) for ex in test]
    prompts = np.zeros((1, 0, service.model_info().hidden_size), np.float32)
    before = service.usage()
    t0 = time.perf_counter()
    logits = np.concatenate(
        [
            service.score(prompts, texts[i : i + max_texts], list(task.label_words)).logits
            for i in range(0, len(texts), max_texts)
        ],
        axis=1,
    )
    seconds = time.perf_counter() - t0
    loss, acc = label_cross_entropy(logits, np.array([ex.label for ex in test]))
    spent = service.usage() - before
    return {
        "accuracy": float(acc[0]),
        "loss": float(loss[0]),
        "examples": len(test),
        "demos": len(demos),
        "logits": logits[0],
        "queries": spent.queries,
        "sequences": spent.sequences,
        "tokens": spent.tokens,
        "bytes_up": spent.bytes_up,
        "bytes_down": spent.bytes_down,
        "seconds": seconds,
    }
