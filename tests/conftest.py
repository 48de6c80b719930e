"""Real servers on loopback and real models built or fetched locally: the fixtures every test shares."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, port: int | None = None, **uvicorn_kwargs):
    """Run `app` under uvicorn on 127.0.0.1 in a thread; yields its base URL; stops it cleanly."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_kwargs)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


TINY_CORPUS = [
    "the movie was great and the actors were great",
    "the movie was bad and the plot was bad",
    "a great film with a great story",
    "a bad film with a bad ending",
    "it was great . it was bad . it was fine",
    "what a great day for a bad movie",
    "hello world , the story was long",
]


def build_tiny_roberta(out: Path) -> Path:
    """A random-init RoBERTa with a BPE tokenizer trained here: the real masked-LM loading path, offline."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS * 20, vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(out))
    tokenizer = RobertaTokenizerFast.from_pretrained(out)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=160, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1)
    RobertaForMaskedLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    return build_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from fedbpt.assets import ensure_model

    return ensure_model()


@pytest.fixture(scope="session")
def default_data_dir() -> Path:
    from fedbpt.assets import ensure_data

    return ensure_data()
