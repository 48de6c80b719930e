"""Command-line flags of the aggregator (`fedbpt aggregator`): where to listen and the RunConfig.

Run-config flags default to "not given", so a resumed run can tell a deliberate change (warned
about, then overridden by the stored config) from a default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from fedbpt_wire.asgi import add_connection_arguments, add_docs_argument, uvicorn_options
from fedbpt_wire.federation import RunConfig
from fedbpt_wire.logs import setup_logging
from fedbpt_wire.options import add_setting_flags, given
from fedbpt_wire.presets import EMBEDDED_RUN

from .coordinator import MAX_CLIENTS, MAX_REGISTRATIONS_PER_MINUTE
from .store import Store
from .strategies import strategy_class

log = logging.getLogger(__name__)

# A bench config names the local population `popsize`.
_CONFIG_FILE_ALIASES = {"popsize": "local_popsize"}


DEFAULT_DB = "runs/aggregator.db"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--db",
        default=DEFAULT_DB,
        help="SQLite file; one that holds a run resumes it (default %(default)s: a path git ignores, so that no "
        "checkout carries a run that a new aggregator would resume)",
    )
    parser.add_argument(
        "--enroll-key",
        default=None,
        help="clients register with it as Bearer token (default: $FEDBPT_ENROLL_KEY; unset = open)",
    )
    parser.add_argument(
        "--operator-key",
        default=None,
        help="the operator's key, never given to clients: full /v1/status, every client's mean "
        "(default: $FEDBPT_OPERATOR_KEY; unset = /v1/status is public)",
    )
    parser.add_argument(
        "--max-clients",
        type=int,
        default=None,
        help="registered client ids at most; further registrations are refused (default: 10 x --min-clients, "
        f"at least 100; at most {MAX_CLIENTS} by default)",
    )
    parser.add_argument(
        "--max-registrations-per-minute",
        type=int,
        default=MAX_REGISTRATIONS_PER_MINUTE,
        help="new client ids registered per minute at most; beyond, 429 with Retry-After (default %(default)s)",
    )
    parser.add_argument(
        "--exit-when-done",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop SECONDS after the run's last round closed (time for the clients to fetch the final "
        "prompt), with exit status 1 when no round merged (default: serve on)",
    )
    add_docs_argument(parser)
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key, if not in --ssl-certfile")
    add_connection_arguments(parser)
    group = parser.add_argument_group("run config (ignored, with a warning, when --db already holds a run)")
    group.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a JSON file of run-config fields (e.g. configs/paper-roberta-large.json; keys that are "
        "not run-config fields are ignored); flags given beside it win",
    )
    # Where no flag or --config file says otherwise: the embedded model's search space (fedbpt_wire.presets), not
    # RunConfig's paper-sized d = 500 and L = 50, which are one file away (--config configs/paper-roberta-large.json).
    add_setting_flags(group, RunConfig, defaults={**EMBEDDED_RUN, "run_id": "the database file's stem"}, not_given=True)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config: the stored one when the database holds a run, else the flags over the defaults."""
    values = given(args, RunConfig.model_fields)
    if getattr(args, "config", None):
        values = {**config_file(args.config), **values}
    stored = Store.peek_config(args.db)
    if stored is not None:
        differs = sorted(k for k, v in values.items() if getattr(stored, k) != v)
        if differs:
            log.warning(
                "%s holds run %r: its config wins, ignoring %s",
                args.db,
                stored.run_id,
                ", ".join(f"{k}={values[k]!r} (stored {getattr(stored, k)!r})" for k in differs),
            )
        return stored
    values = {**EMBEDDED_RUN, **values}
    values.setdefault("run_id", Path(args.db).stem)
    config = RunConfig(**values)
    return strategy_class(config).configure(config)


def config_file(path: str) -> dict:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of run-config fields")
    data = {_CONFIG_FILE_ALIASES.get(k, k): v for k, v in data.items()}
    return {k: v for k, v in data.items() if k in RunConfig.model_fields and k != "run_id"}


def run(args: argparse.Namespace) -> int:
    from .server import serve  # fastapi, uvicorn and cma only once there is something to serve

    setup_logging()
    if args.ssl_keyfile and not args.ssl_certfile:
        print("--ssl-keyfile needs --ssl-certfile", file=sys.stderr)
        return 2
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        print(f"invalid run config: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return serve(
        config,
        args.db,
        host=args.host,
        port=args.port,
        enroll_key=args.enroll_key or os.environ.get("FEDBPT_ENROLL_KEY") or None,
        operator_key=args.operator_key or os.environ.get("FEDBPT_OPERATOR_KEY") or None,
        max_clients=args.max_clients or min(MAX_CLIENTS, max(100, 10 * config.min_clients)),
        max_registrations_per_minute=args.max_registrations_per_minute,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        options=uvicorn_options(args),
        allowed_hosts=args.allowed_hosts,
        exit_when_done=args.exit_when_done,
        body_timeout=args.body_timeout,
        docs=args.docs,
    )
