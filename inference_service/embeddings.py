"""The scale of the input embeddings that soft prompts must match.

A soft prompt enters the model as `inputs_embeds`, beside the outputs of the model's input embedding module,
so its scale is that of the module's OUTPUT, not of its weight matrix. The two differ where the module scales
its lookup: Gemma (1-3) multiplies by sqrt(hidden_size) inside the embedding's forward
(`Gemma3TextScaledWordEmbedding.embed_scale`, 25.3 for Gemma 3 270M), and `inputs_embeds` skips that module,
so a prompt drawn at the weight's std would be 25x too small there.
"""

from __future__ import annotations

from typing import cast

import torch

# Ids per forward when an embedding must be measured by running it (bounds the temporary to ~64 MiB at D = 4096).
_CHUNK = 4096


def embedding_weight(embed: torch.nn.Module) -> torch.Tensor:
    """The [vocab, hidden] table of an input embedding module (typed as a Module attribute by torch)."""
    return cast(torch.Tensor, embed.weight)


def embedding_std(embed: torch.nn.Module) -> float:
    """The standard deviation of what `embed` outputs over the whole vocabulary.

    A plain `nn.Embedding` outputs its weight rows: the weight's std. A scaled embedding (an `embed_scale`
    attribute, as Gemma's and BART's) outputs weight * embed_scale, the scale cast to the weight's dtype as
    their forwards do. Any other embedding subclass is run over every id, since its forward may do anything.
    """
    weight = embedding_weight(embed).detach()
    if type(embed) is torch.nn.Embedding:
        return float(weight.float().std())
    scale = getattr(embed, "embed_scale", None)
    if scale is not None:
        if torch.is_tensor(scale):
            scale = scale.detach().to(weight.dtype).float().item()
        return float(weight.float().std()) * abs(float(scale))
    return measured_embedding_std(embed)


@torch.inference_mode()
def measured_embedding_std(embed: torch.nn.Module, chunk: int = _CHUNK) -> float:
    """The std of `embed` applied to every id, in chunks, accumulated in float64 (unbiased, as `Tensor.std`)."""
    weight = embedding_weight(embed)
    vocab = weight.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    count = 0
    for lo in range(0, vocab, chunk):
        ids = torch.arange(lo, min(lo + chunk, vocab), device=weight.device)
        out = embed(ids).double()
        total += out.sum().cpu()
        squares += (out * out).sum().cpu()
        count += out.numel()
    mean = total / count
    return float(((squares - count * mean * mean) / (count - 1)).clamp_min(0).sqrt())
