"""The black-box inference service: soft prompts and texts in, label-word logits and losses out."""
