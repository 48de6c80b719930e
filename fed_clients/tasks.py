"""Tasks: a template with a slot and a verbalizer (label words), per model kind.

Masked-LM templates and label words follow BBT (RoBERTa, label words with their leading space);
causal-LM templates end at the slot so the label word is the next token.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbpt_wire.schemas import SLOT


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
            text = text.replace("{" + f + "}", example[f].replace(SLOT, "{ mask }"))
        return text

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


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
