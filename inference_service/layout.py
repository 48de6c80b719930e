"""How a (soft prompt, text) pair becomes one token sequence; shared by every engine.

Layout (docs/design.md, section 3): the tokenizer's leading special tokens, the anchor token (only with a
soft prompt, see `make_layout`), the text before the prompt marker if the text holds one, the L
prompt vectors, the text up to the slot tokenized on its own, then for a masked LM the mask token,
the text after the slot and the trailing special tokens. A causal LM reads the next-token logits at
the slot, the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbpt_wire.schemas import PROMPT_SLOT, SLOT

from .engine import InputError

_PROBE = "hello world"


@dataclass(frozen=True)
class Layout:
    kind: str  # "causal" | "masked"
    prefix_ids: list[int]
    suffix_ids: list[int]
    mask_id: int | None
    strip_before_mask: bool  # the mask token swallows the space before it (RoBERTa's lstrip)
    anchor_ids: tuple[int, ...] = ()  # placed ahead of a soft prompt (L > 0) only


@dataclass(frozen=True)
class TextIds:
    ids: list[int]  # the text's tokens after the soft prompt, mask token in place for a masked LM, no specials
    slot: int  # index in `ids` whose output gives the label logits
    head: tuple[int, ...] = ()  # tokens before the soft prompt, where the text places it with the prompt marker


@dataclass(frozen=True)
class Sequence:
    """One text's sequence around a soft prompt of a given length: lead, then the prompt, then tail."""

    lead: list[int]  # leading specials, anchor, the text's head
    tail: list[int]  # the text after the prompt and the trailing specials
    slot: int  # index in `tail` of the position whose output gives the label logits


def sequence(layout: Layout, text: TextIds, prompt_length: int) -> Sequence:
    anchor = list(layout.anchor_ids) if prompt_length > 0 else []
    return Sequence(layout.prefix_ids + anchor + list(text.head), text.ids + layout.suffix_ids, text.slot)


def positions(layout: Layout, texts: list[TextIds], prompt_length: int) -> list[int]:
    """Each text's sequence length around a soft prompt of `prompt_length`: what scoring it costs."""
    out = []
    for t in texts:
        s = sequence(layout, t, prompt_length)
        out.append(len(s.lead) + prompt_length + len(s.tail))
    return out


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids `tokenizer(text)` adds before and after the text's own tokens."""
    full = tokenizer(_PROBE)["input_ids"]
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise RuntimeError("cannot locate the text's tokens inside the tokenizer's output")


def anchor_ids(tokenizer, kind: str, prefix: list[int], anchor: str) -> tuple[int, ...]:
    """The token ids placed ahead of a soft prompt: `auto`, `none`, or a token's text.

    A causal LM puts an outsized share of attention on the first position (the attention sink). Where the
    tokenizer adds no BOS, a soft prompt would take that place and disturb every later position; `auto`
    keeps a real token there instead: the tokenizer's BOS, else its EOS (what a document boundary looks
    like in pre-training). Masked LMs and tokenizers that add a BOS need none.
    """
    if anchor == "none":
        return ()
    if anchor == "auto":
        if kind != "causal" or prefix:
            return ()
        token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return () if token_id is None else (int(token_id),)
    token_id = tokenizer.convert_tokens_to_ids(anchor)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != anchor:
        raise ValueError(
            f"prompt anchor {anchor!r} is not a token of this tokenizer; give a token's text, 'auto' or 'none'"
        )
    return (int(token_id),)


def anchor_text(tokenizer, layout: Layout) -> str | None:
    return tokenizer.convert_ids_to_tokens(layout.anchor_ids[0]) if layout.anchor_ids else None


def make_layout(tokenizer, kind: str, anchor: str = "none") -> Layout:
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
    return Layout(
        kind, prefix, suffix if kind == "masked" else [], mask_id, strip, anchor_ids(tokenizer, kind, prefix, anchor)
    )


def tokenize_text(tokenizer, layout: Layout, text: str, index: int, max_tokens: int) -> TextIds:
    field = f"texts[{index}]"
    if text.count(SLOT) != 1:
        raise InputError(field, f"must hold the slot {SLOT!r} exactly once, found {text.count(SLOT)}")
    head_ids: list[int] = []
    if PROMPT_SLOT in text:
        if text.count(PROMPT_SLOT) != 1:
            raise InputError(field, f"may hold the prompt marker {PROMPT_SLOT!r} at most once")
        head, text = text.split(PROMPT_SLOT)
        if SLOT in head:
            raise InputError(field, f"the prompt marker {PROMPT_SLOT!r} must come before the slot {SLOT!r}")
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
    before, after = text.split(SLOT)
    if layout.kind == "causal":
        if after.strip():
            raise InputError(field, f"for a causal LM the slot {SLOT!r} must end the text")
        ids = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        if not ids:
            raise InputError(
                field, "a causal LM needs text between the prompt and the slot to read the next token from"
            )
        slot = len(ids) - 1
    else:
        if layout.strip_before_mask:
            before = before.rstrip()
        head = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        tail = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        ids = head + [layout.mask_id] + tail
        slot = len(head)
    if len(ids) + len(head_ids) > max_tokens:
        raise InputError(field, f"is {len(ids) + len(head_ids)} tokens long, over the limit of {max_tokens}")
    return TextIds(ids, slot, tuple(head_ids))
