"""`fedbpt`: one entry point, a subcommand per role. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import logging
import sys


def _assets(args: argparse.Namespace) -> None:
    from . import assets

    paths = assets.fetch_all()
    for what, path in paths.items():
        print(f"{what}: {path}")


def _serve(args: argparse.Namespace) -> None:
    from inference_service.server import run

    run(args)


def _client(args: argparse.Namespace) -> None:
    from fed_clients.runner import run

    run(args)


def _aggregator(args: argparse.Namespace) -> None:
    from aggregator.cli import run

    run(args)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbpt", description="Federated black-box prompt tuning")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p_assets = sub.add_parser("assets", help="the embedded default model and data")
    p_assets.add_argument("action", choices=["fetch"])
    p_assets.set_defaults(func=_assets)

    from inference_service.server import add_arguments as serve_arguments

    p_serve = sub.add_parser("serve", help="run the black-box inference service")
    serve_arguments(p_serve)
    p_serve.set_defaults(func=_serve)

    from aggregator.cli import add_arguments as aggregator_arguments

    p_agg = sub.add_parser("aggregator", help="run the aggregator")
    aggregator_arguments(p_agg)
    p_agg.set_defaults(func=_aggregator)

    from fed_clients.runner import add_arguments as client_arguments

    p_client = sub.add_parser("client", help="run one client against a service and an aggregator")
    client_arguments(p_client)
    p_client.set_defaults(func=_client)

    from .demo import add_arguments as demo_arguments

    p_demo = sub.add_parser("demo", help="end-to-end federated run on loopback, with a report")
    demo_arguments(p_demo)
    p_demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
