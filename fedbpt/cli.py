"""`fedbpt`: one entry point, a subcommand per role. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import logging
import sys


def _assets(args: argparse.Namespace) -> None:
    from . import assets

    if args.model:
        paths = {name: assets.ensure_model(name=name) for name in args.model}
    else:
        paths = assets.fetch_all()
    for what, path in paths.items():
        print(f"{what}: {path}")


def _serve(args: argparse.Namespace) -> None:
    from inference_service.server import run

    run(args)


def _client(args: argparse.Namespace) -> None:
    from fed_clients.http import RequestFailed
    from fed_clients.runner import run

    try:
        run(args)
    except RequestFailed as exc:  # a refusal (a wrong key, a bad request) is the user's to fix: no traceback
        sys.exit(f"fedbpt client: error: {exc}")


def _aggregator(args: argparse.Namespace) -> None:
    from aggregator.cli import run

    run(args)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run

    run(args)


def _bench(args: argparse.Namespace) -> None:
    from bench.grid import run

    run(args)


# subcommand -> (module with add_arguments, help, runner); modules are imported only to build the parser,
# and a role installed without another's extras still gets its own subcommands.
_SUBCOMMANDS = {
    "serve": ("inference_service.server", "run the black-box inference service", _serve),
    "aggregator": ("aggregator.cli", "run the aggregator", _aggregator),
    "client": ("fed_clients.runner", "run one client against a service and an aggregator", _client),
    "demo": ("fedbpt.demo", "end-to-end federated run on loopback, with a report", _demo),
    "bench": ("bench.grid", "every method on the same data and seeds: accuracy vs queries and bytes", _bench),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="fedbpt", description="Federated black-box prompt tuning")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    from .assets import DEFAULT_MODEL, EMBEDDED_MODELS

    p_assets = sub.add_parser("assets", help="the embedded models and data")
    p_assets.add_argument("action", choices=["fetch"])
    p_assets.add_argument("--model", action="append", choices=sorted(EMBEDDED_MODELS), metavar="NAME",
                          help=f"fetch this embedded model only (repeatable; one of {', '.join(sorted(EMBEDDED_MODELS))}); "
                               f"default: {DEFAULT_MODEL} and every embedded data set")
    p_assets.set_defaults(func=_assets)

    for name, (module, help_text, func) in _SUBCOMMANDS.items():
        try:
            add_arguments = importlib.import_module(module).add_arguments
        except ImportError as exc:
            sub.add_parser(name, help=f"unavailable: {exc}").set_defaults(func=_missing(name, exc))
            continue
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def _missing(name: str, exc: ImportError):
    def fail(args: argparse.Namespace) -> None:
        sys.exit(f"fedbpt {name} needs a package that is not installed ({exc}); "
                 "install the matching extra, e.g. pip install 'fedbpt[service,client,aggregator]'")

    return fail


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request would drown the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
