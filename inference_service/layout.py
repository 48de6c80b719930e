"""How a (soft prompt, text) pair becomes one token sequence; shared by every engine.

Layout (DESIGN.md section 3): the tokenizer's leading special tokens, the L prompt vectors, the
text before the slot tokenized on its own, then for a masked LM the mask token, the text after the
slot and the trailing special tokens. A causal LM reads the next-token logits at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbpt_wire.schemas import SLOT

from .engine import InputError

_PROBE = "hello world"


@dataclass(frozen=True)
class Layout:
    kind: str  # "causal" | "masked"
    prefix_ids: list[int]
    suffix_ids: list[int]
    mask_id: int | None
    strip_before_mask: bool  # the mask token swallows the space before it (RoBERTa's lstrip)


@dataclass(frozen=True)
class TextIds:
    ids: list[int]  # the text's tokens with the mask token in place for a masked LM, no specials
    slot: int  # index in `ids` whose output gives the label logits


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids `tokenizer(text)` adds before and after the text's own tokens."""
    full = tokenizer(_PROBE)["input_ids"]
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise RuntimeError("cannot locate the text's tokens inside the tokenizer's output")


def make_layout(tokenizer, kind: str) -> Layout:
    prefix, suffix = special_tokens_around(tokenizer)
    mask_id = None
    strip = False
    if kind == "masked":
        if tokenizer.mask_token_id is None:
            raise RuntimeError("a masked LM needs a tokenizer with a mask token")
        mask_id = tokenizer.mask_token_id
        added = tokenizer.added_tokens_decoder.get(mask_id)
        strip = bool(getattr(added, "lstrip", False))
    # A causal LM reads the next token: trailing specials (an EOS) would sit between text and label.
    return Layout(kind, prefix, suffix if kind == "masked" else [], mask_id, strip)


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    ids = []
    for i, word in enumerate(label_words):
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise InputError(f"label_words[{i}]", f"{word!r} is {len(toks)} tokens {pieces}, must be exactly one")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise InputError("label_words", "two label words map to the same token")
    return ids


def tokenize_text(tokenizer, layout: Layout, text: str, index: int, max_tokens: int) -> TextIds:
    field = f"texts[{index}]"
    if text.count(SLOT) != 1:
        raise InputError(field, f"must hold the slot {SLOT!r} exactly once, found {text.count(SLOT)}")
    before, after = text.split(SLOT)
    if layout.kind == "causal":
        if after.strip():
            raise InputError(field, f"for a causal LM the slot {SLOT!r} must end the text")
        ids = tokenizer(before, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(field, "a causal LM needs text before the slot to read the next token from")
        slot = len(ids) - 1
    else:
        if layout.strip_before_mask:
            before = before.rstrip()
        head = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        tail = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        ids = head + [layout.mask_id] + tail
        slot = len(head)
    if len(ids) > max_tokens:
        raise InputError(field, f"is {len(ids)} tokens long, over the limit of {max_tokens}")
    return TextIds(ids, slot)
