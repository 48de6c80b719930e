"""Converted models that transformers 4.x (which vLLM 0.11 runs on) reads as 5.x does: the field names 4.x
knows, written beside 5.x's."""

from __future__ import annotations

import json
from pathlib import Path


def rope_fields_for_transformers_4(config: dict) -> dict:
    """The flat rope fields transformers 4.x reads in place of 5.x's `rope_parameters`; none already set.

    Flat `rope_parameters` (Llama, SmolLM2): `rope_theta`, and `rope_scaling` for a non-default rope type.
    Nested per attention type (Gemma 3): 4.x reads the full-attention layers' `rope_theta` and `rope_scaling`
    and the sliding-window layers' base as `rope_local_base_freq`, always with default (unscaled) rope.
    """
    rope = config.get("rope_parameters") or {}
    if not rope:
        return {}
    if "rope_theta" in rope or "rope_type" in rope:
        full, local = rope, None
    else:
        unknown = set(rope) - {"full_attention", "sliding_attention"}
        if unknown or "full_attention" not in rope:
            raise ValueError(f"rope_parameters per {sorted(rope)}: no transformers 4.x equivalent is known")
        full, local = rope["full_attention"], rope.get("sliding_attention")
    fields: dict = {}
    if "rope_theta" in full:
        fields["rope_theta"] = full["rope_theta"]
    if full.get("rope_type", "default") != "default":
        fields["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"sliding-window rope {local}: transformers 4.x applies only default rope there")
        if "rope_theta" in local:
            fields["rope_local_base_freq"] = local["rope_theta"]
    return {k: v for k, v in fields.items() if config.get(k) is None}


def readable_by_transformers_4(directory: Path) -> None:
    """Add the field names transformers 4.x reads (vLLM 0.11 runs on it) beside the 5.x ones.

    4.x ignores `rope_parameters` and would silently fall back to its defaults: rope_theta 10000 for Llama
    (SmolLM2 uses 100000); for Gemma 3 its defaults (1e6 full, 1e4 sliding) happen to match 270M's, but
    are written all the same. 4.x also cannot resolve the tokenizer class name 5.x writes.
    """
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    fields = rope_fields_for_transformers_4(config)
    if fields:
        config.update(fields)
        config_path.write_text(json.dumps(config, indent=2))
    tok_path = directory / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    if tok_config.get("tokenizer_class") == "TokenizersBackend":
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_path.write_text(json.dumps(tok_config, indent=2))
