"""Tasks: a template with a slot and a verbalizer (label words), as data.

A task is a public JSON format (`fedbpt-task/1`, docs/formats.md): a template whose placeholders other than
`{mask}` (and `{prompt}`) are the data's column names, and `label_words` mapping each label name, as it appears in
the data's label column, to its label word, in class order. The built-in tasks are such specs; `fedbpt task show
NAME` prints one to start from.

Masked-LM templates and label words follow BBT (RoBERTa, label words with their leading space);
causal-LM templates end at the slot so the label word is the next token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from fedbpt_wire.federation import PLACEMENTS
from fedbpt_wire.schemas import PROMPT_SLOT, SLOT

TASK_FORMAT = "fedbpt-task/1"
# Braces around anything else (JSON in a template, say) stay literal text.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_SPEC_KEYS = {"format", "name", "template", "label_words", "label_column", "description", "masked_template"}


class TaskSpecError(ValueError):
    """A task spec that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]  # the example's text fields the template fills
    label_words: tuple[str, ...]  # index = label
    causal_template: str
    masked_template: str
    hf_dataset: tuple[str, ...] | None = None  # (path, config) for `datasets.load_dataset` when online
    hf_test_split: str = "validation"
    label_names: tuple[str, ...] = ()  # as the data's label column spells them; empty: the class indices
    label_column: str = "label"
    description: str = ""

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
        if len(set(words)) != len(words):
            raise ValueError(f"task {self.name}: label words must be distinct, got {list(words)}")
        return replace(self, label_words=words)

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    @property
    def names(self) -> tuple[str, ...]:
        return self.label_names or tuple(str(i) for i in range(self.num_classes))

    def label_index(self, value) -> int:
        """A label as the data spells it: a name of the spec, or a class index (int, or its digits).

        Names win over indices, so labels named "1".."5" (star ratings) keep their spec's order. Raises
        ValueError with a message that lists the accepted values."""
        if isinstance(value, str):
            key = value.strip()
            if key in self.label_names:
                return self.label_names.index(key)
            if key.lstrip("-").isdigit():
                value = int(key)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.num_classes:
            return value
        accepted = ", ".join(self.label_names) + " or " if self.label_names else ""
        raise ValueError(f"label {value!r} is not one of the task's labels ({accepted}0..{self.num_classes - 1})")

    def to_spec(self) -> dict:
        spec = {
            "format": TASK_FORMAT,
            "name": self.name,
            "template": self.causal_template,
            "label_words": dict(zip(self.names, self.label_words)),
            "label_column": self.label_column,
        }
        if self.masked_template != self.causal_template:
            spec["masked_template"] = self.masked_template
        if self.description:
            spec["description"] = self.description
        return spec


def _placeholders(template: str) -> list[str]:
    return [m for m in _PLACEHOLDER.findall(template) if m not in ("mask", "prompt")]


def _check_template(template, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(template, str) or not template:
        raise TaskSpecError(f"{where}: '{key}' must be a non-empty string")
    if template.count(SLOT) != 1:
        raise TaskSpecError(
            f"{where}: '{key}' must hold {SLOT} exactly once (where the label word goes), found {template.count(SLOT)}"
        )
    if template.count(PROMPT_SLOT) > 1 or (
        PROMPT_SLOT in template and template.index(PROMPT_SLOT) > template.index(SLOT)
    ):
        raise TaskSpecError(f"{where}: '{key}' may hold {PROMPT_SLOT} once, before {SLOT}")
    fields = tuple(dict.fromkeys(_placeholders(template)))
    if not fields:
        raise TaskSpecError(f"{where}: '{key}' names no data column, e.g. {{text}}")
    return fields


def task_from_spec(spec, where: str = "task spec") -> Task:
    """A Task from its JSON form; TaskSpecError naming `where` and the key on anything unusable."""
    if not isinstance(spec, dict):
        raise TaskSpecError(f"{where}: a task spec is a JSON object, got {type(spec).__name__}")
    fmt = spec.get("format", TASK_FORMAT)
    if fmt != TASK_FORMAT:
        raise TaskSpecError(f"{where}: format {fmt!r} is not {TASK_FORMAT!r} (written by another fedbpt version?)")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise TaskSpecError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_SPEC_KEYS))}"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TaskSpecError(f"{where}: 'name' must be a non-empty string")
    fields = _check_template(spec.get("template"), "template", where)
    masked = spec["masked_template"] if "masked_template" in spec else spec["template"]
    if set(_check_template(masked, "masked_template", where)) != set(fields):
        raise TaskSpecError(
            f"{where}: 'masked_template' must name the same columns as 'template' ({', '.join(fields)})"
        )
    words = spec.get("label_words")
    if not isinstance(words, dict) or len(words) < 2:
        raise TaskSpecError(
            f"{where}: 'label_words' must be an object of two or more label name -> label word, "
            'e.g. {"negative": " bad", "positive": " great"}'
        )
    for label, word in words.items():
        if not label.strip() or not isinstance(word, str) or not word.strip():
            raise TaskSpecError(f"{where}: label_words[{label!r}] must be a non-empty word for a non-empty label name")
    if len(set(words.values())) != len(words):
        raise TaskSpecError(f"{where}: label words must be distinct, got {list(words.values())}")
    column = spec.get("label_column", "label")
    if not isinstance(column, str) or not column or column in fields:
        raise TaskSpecError(f"{where}: 'label_column' must be a column name other than the template's")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise TaskSpecError(f"{where}: 'description' must be a string")
    return Task(
        name.strip(),
        fields,
        tuple(words.values()),
        spec["template"],
        masked,
        label_names=tuple(k.strip() for k in words),
        label_column=column,
        description=description,
    )


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskSpecError(f"{path}: cannot read the task spec ({exc.strerror or exc})") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskSpecError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    return task_from_spec(spec, str(path))


_SENTIMENT = ("negative", "positive")
_SENTIMENT_CAUSAL = "Review: {text}\nSentiment:" + SLOT
_SENTIMENT_MASKED = "{text} . It was " + SLOT + " ."


def _builtin(
    name: str,
    template: str,
    masked: str,
    words: dict[str, str],
    description: str,
    hf: tuple[str, ...] | None = None,
    hf_test_split: str = "validation",
) -> Task:
    task = task_from_spec(
        {
            "name": name,
            "template": template,
            "masked_template": masked,
            "label_words": words,
            "description": description,
        },
        f"built-in task {name}",
    )
    return replace(task, hf_dataset=hf, hf_test_split=hf_test_split)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _builtin(
            "rotten_tomatoes",
            _SENTIMENT_CAUSAL,
            _SENTIMENT_MASKED,
            dict(zip(_SENTIMENT, (" negative", " positive"))),
            "movie-review polarity (embedded data)",
        ),
        _builtin(
            "amazon_snippets",
            _SENTIMENT_CAUSAL,
            _SENTIMENT_MASKED,
            dict(zip(_SENTIMENT, (" negative", " positive"))),
            "product-review polarity (embedded data)",
        ),
        _builtin(
            "sst2",
            _SENTIMENT_CAUSAL,
            _SENTIMENT_MASKED,
            dict(zip(_SENTIMENT, (" bad", " great"))),
            "GLUE SST-2 sentence polarity",
            ("glue", "sst2"),
        ),
        _builtin(
            "yelp_polarity",
            _SENTIMENT_CAUSAL,
            _SENTIMENT_MASKED,
            dict(zip(_SENTIMENT, (" bad", " great"))),
            "Yelp review polarity",
            ("yelp_polarity",),
            "test",
        ),
        _builtin(
            "ag_news",
            "Article: {text}\nTopic:" + SLOT,
            SLOT + " News: {text}",
            {"World": " World", "Sports": " Sports", "Business": " Business", "Sci/Tech": " Tech"},
            "AG News topic, four classes",
            ("ag_news",),
            "test",
        ),
        _builtin(
            "mrpc",
            "Sentence 1: {text}\nSentence 2: {text2}\nSame meaning?" + SLOT,
            "{text} ? " + SLOT + " , {text2}",
            {"not_equivalent": " No", "equivalent": " Yes"},
            "GLUE MRPC paraphrase",
            ("glue", "mrpc"),
        ),
        _builtin(
            "rte",
            "Premise: {text}\nHypothesis: {text2}\nEntailed?" + SLOT,
            "{text} ? " + SLOT + " , {text2}",
            {"entailment": " Yes", "not_entailment": " No"},
            "GLUE RTE entailment",
            ("glue", "rte"),
        ),
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


def get_task(ref: str, label_words: str | None = None) -> Task:
    """A built-in task by name, or a task spec file (`.json`); `label_words` (comma-separated, e.g.
    " terrible, great") replace its verbalizer."""
    if ref in TASKS:
        task = TASKS[ref]
    elif ref.endswith(".json") or Path(ref).is_file():
        task = load_task_file(ref)
    else:
        task = None
    if task is not None:
        return task.with_label_words(parse_label_words(label_words)) if label_words else task
    raise TaskSpecError(
        f"unknown task {ref!r}: give a built-in task ({', '.join(sorted(TASKS))}) "
        "or a task spec file (.json; `fedbpt task show NAME` prints one to start from)"
    )


def with_placement(task: Task, placement: str) -> Task:
    """The task with its causal template's soft prompt placed: `ahead` of the text (BBT's place; the template as
    written, which may hold its own prompt marker) or `after-text`: right after the last column before the slot,
    so before the cue ("Review: {text}{prompt}\nSentiment:").

    After the text, a causal LM runs each text once per request and only the prompt and the cue per
    candidate (the service reuses the text's keys and values), about 3x less compute per candidate.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    template = task.causal_template
    if placement == "after-text" and PROMPT_SLOT not in template:
        head = template[: template.index(SLOT)]
        ends = [m.end() for m in _PLACEHOLDER.finditer(head) if m.group(1) not in ("mask", "prompt")]
        if not ends:
            raise ValueError(f"task {task.name}: its template has no column before {SLOT} to put the prompt after")
        template = template[: ends[-1]] + PROMPT_SLOT + template[ends[-1] :]
    return replace(task, causal_template=template)
