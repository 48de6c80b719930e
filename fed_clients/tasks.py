"""Tasks: a template with a slot and a verbalizer (label words), per model kind.

Masked-LM templates and label words follow BBT (RoBERTa, label words with their leading space);
causal-LM templates end at the slot so the label word is the next token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedbpt_wire.federation import PLACEMENTS
from fedbpt_wire.schemas import PROMPT_SLOT, SLOT


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]  # the example's text fields the template fills
    label_words: tuple[str, ...]  # index = label
    causal_template: str
    masked_template: str
    hf_dataset: tuple[str, ...] | None = None  # (path, config) for `datasets.load_dataset` when online
    hf_test_split: str = "validation"

    def template(self, kind: str) -> str:
        return self.masked_template if kind == "masked" else self.causal_template

    def render(self, example: dict[str, str], kind: str) -> str:
        # Field values may hold braces: substitute by replacement, never with str.format.
        text = self.template(kind)
        for f in self.fields:
            value = example[f].replace(SLOT, "{ mask }").replace(PROMPT_SLOT, "{ prompt }")
            text = text.replace("{" + f + "}", value)
        return text

    def with_label_words(self, words) -> Task:
        words = tuple(words)
        if len(words) != self.num_classes:
            raise ValueError(f"task {self.name} has {self.num_classes} classes, got {len(words)} label words")
        return replace(self, label_words=words)

    @property
    def num_classes(self) -> int:
        return len(self.label_words)


_SENTIMENT_CAUSAL = "Review: {text}\nSentiment:" + SLOT
_SENTIMENT_MASKED = "{text} . It was " + SLOT + " ."

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("rotten_tomatoes", ("text",), (" negative", " positive"), _SENTIMENT_CAUSAL, _SENTIMENT_MASKED),
        Task("amazon_snippets", ("text",), (" negative", " positive"), _SENTIMENT_CAUSAL, _SENTIMENT_MASKED),
        Task("sst2", ("text",), (" bad", " great"), _SENTIMENT_CAUSAL, _SENTIMENT_MASKED, ("glue", "sst2")),
        Task("yelp_polarity", ("text",), (" bad", " great"), _SENTIMENT_CAUSAL, _SENTIMENT_MASKED,
             ("yelp_polarity",), "test"),
        Task("ag_news", ("text",), (" World", " Sports", " Business", " Tech"),
             "Article: {text}\nTopic:" + SLOT, SLOT + " News: {text}", ("ag_news",), "test"),
        Task("mrpc", ("text", "text2"), (" No", " Yes"),
             "Sentence 1: {text}\nSentence 2: {text2}\nSame meaning?" + SLOT, "{text} ? " + SLOT + " , {text2}",
             ("glue", "mrpc")),
        Task("rte", ("text", "text2"), (" Yes", " No"),
             "Premise: {text}\nHypothesis: {text2}\nEntailed?" + SLOT, "{text} ? " + SLOT + " , {text2}",
             ("glue", "rte")),
    ]
}

# Column names in the HF datasets, mapped onto the fields above.
HF_COLUMNS = {"sentence": "text", "sentence1": "text", "sentence2": "text2", "text": "text"}


def parse_label_words(text: str) -> list[str]:
    """' bad, good' -> [' bad', ' good']: commas separate, and each word keeps its own leading space."""
    words = text.split(",")
    if len(words) < 2 or any(not w.strip() for w in words):
        raise ValueError(f"label words must be two or more comma-separated words, got {text!r}")
    return words


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None



def with_placement(task: Task, placement: str) -> Task:
    """The task with its causal template's soft prompt placed: `ahead` of the text (BBT's place; the template as
    written, which may hold its own prompt marker) or `after-text`, before the cue line
    ("Review: ...{prompt}\nSentiment:").

    After the text, a causal LM runs each text once per request and only the prompt and the cue per
    candidate (the service reuses the text's keys and values), about 3x less compute per candidate.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    template = task.causal_template
    if placement == "after-text" and PROMPT_SLOT not in template:
        last = template.rfind("\n")
        if last < 0:
            raise ValueError(f"task {task.name}: its template has no cue line to put the prompt before")
        template = template[:last] + PROMPT_SLOT + template[last:]
    return replace(task, causal_template=template)
