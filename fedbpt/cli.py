"""`fedbpt`: one entry point, a subcommand per role. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import sys


def _assets(args: argparse.Namespace) -> None:
    import fedbpt_assets as assets

    if args.model:
        paths = {name: assets.ensure_model(name=name) for name in args.model}
    else:
        paths = assets.fetch_all()
    for what, path in paths.items():
        print(f"{what}: {path}")


def _runner(module: str, name: str = "run"):
    def call(args: argparse.Namespace):
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return call


# subcommand -> (module[:function adding its arguments, default add_arguments], help, runner); modules are
# imported only to build the parser,
# and a role installed without another's extras still gets its own subcommands.
_SUBCOMMANDS = {
    "serve": ("inference_service.server", "run the black-box inference service", _runner("inference_service.server")),
    "aggregator": ("aggregator.cli", "run the aggregator", _runner("aggregator.cli")),
    "client": (
        "fed_clients.runner",
        "run one client against a service and an aggregator",
        _runner("fed_clients.runner"),
    ),
    "demo": ("fedbpt.demo", "end-to-end federated run on loopback, with a report", _runner("fedbpt.demo")),
    "bench": (
        "fedbpt.bench.command",
        "every method on the same data and seeds: accuracy vs queries and bytes",
        _runner("fedbpt.bench.command"),
    ),
    "task": ("fedbpt.task_cmd", "the built-in tasks, and checking a task spec file", _runner("fedbpt.task_cmd")),
    "predict": (
        "fedbpt.use:add_predict_arguments",
        "classify new texts with a tuned prompt file",
        _runner("fedbpt.use", "predict"),
    ),
    "evaluate": (
        "fedbpt.use:add_evaluate_arguments",
        "accuracy, macro-F1 and confusion matrix of a tuned prompt on labelled data",
        _runner("fedbpt.use", "evaluate"),
    ),
    "status": (
        "fedbpt.run_report:add_status_arguments",
        "where a run stands: round i/N, reporters, validation accuracy, ETA",
        _runner("fedbpt.run_report", "status"),
    ),
    "enroll-codes": (
        "fedbpt.enroll_cmd",
        "one-time enroll codes from the aggregator, one per data owner (operator key)",
        _runner("fedbpt.enroll_cmd"),
    ),
    "report": (
        "fedbpt.run_report:add_report_arguments",
        "per-round and per-client CSVs and plots of any run",
        _runner("fedbpt.run_report", "report"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="fedbpt", description="Federated black-box prompt tuning")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    from fedbpt_assets import DEFAULT_MODEL, EMBEDDED_MODELS

    p_assets = sub.add_parser("assets", help="the embedded models and data")
    p_assets.add_argument("action", choices=["fetch"])
    p_assets.add_argument(
        "--model",
        action="append",
        choices=sorted(EMBEDDED_MODELS),
        metavar="NAME",
        help=f"fetch this embedded model only (repeatable; one of {', '.join(sorted(EMBEDDED_MODELS))}); "
        f"default: {DEFAULT_MODEL} and every embedded data set",
    )
    p_assets.set_defaults(func=_assets)

    for name, (module, help_text, func) in _SUBCOMMANDS.items():
        try:
            module, _, function = module.partition(":")
            add_arguments = getattr(importlib.import_module(module), function or "add_arguments")
        except ImportError as exc:
            sub.add_parser(name, help=f"unavailable: {exc}").set_defaults(func=_missing(name, exc))
            continue
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        # Also after the subcommand, where users put it; SUPPRESS keeps the top-level value when absent.
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log more, and show the traceback of an error",
        )
        p.set_defaults(func=func)
    return parser


def _missing(name: str, exc: ImportError):
    def fail(args: argparse.Namespace) -> None:
        sys.exit(
            f"fedbpt {name} needs a package that is not installed ({exc}); "
            "install the matching extra, e.g. pip install 'fedbpt[service,client,aggregator]'"
        )

    return fail


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from fedbpt_wire.logs import setup_logging

    setup_logging(args.verbose)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if args.verbose:
            raise
        sys.exit(f"fedbpt {args.command}: error: {describe(exc)}")
    if isinstance(code, int) and code:
        sys.exit(code)


def describe(exc: Exception) -> str:
    """One line for the user: our own errors already say what to do; anything else gets its type and a hint."""
    from fed_clients.errors import FatalError

    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, (ValueError, FileNotFoundError, FatalError)):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text} (run with --verbose for the traceback)"


if __name__ == "__main__":
    main()
