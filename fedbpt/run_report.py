"""`fedbpt status` and `fedbpt report`: any run, hand-run or not, read from its aggregator or its database.

The aggregator holds every round's merged metrics and costs and every accepted update; these commands put them
in a terminal line, CSVs and plots, which before only `fedbpt demo` wrote for its own runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

from fedbpt_wire.round_table import round_table


def _aggregator_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--aggregator", required=required, default=None, help="aggregator URL")
    parser.add_argument(
        "--operator-key",
        default=os.environ.get("FEDBPT_OPERATOR_KEY"),
        help="the aggregator's operator key, for client ids, reporters, validation accuracy and "
        "per-client costs (env FEDBPT_OPERATOR_KEY)",
    )
    parser.add_argument("--ca-cert", default=None, metavar="FILE", help="CA certificate (PEM) to trust for HTTPS")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per request, seconds")


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _aggregator_arguments(parser, required=True)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    _aggregator_arguments(parser, required=False)
    parser.add_argument("--db", default=None, metavar="FILE", help="the aggregator's SQLite file, instead of its URL")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write rounds.csv, clients.csv and plots")


def _fetch(args: argparse.Namespace, path: str):
    import httpx

    from fed_clients.errors import unreachable
    from fed_clients.http import RequestFailed, RetryingClient

    http = RetryingClient(
        args.aggregator, args.operator_key, timeout=args.timeout, verify=args.ca_cert or True, retries=2
    )
    try:
        return http.request("GET", path)
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise unreachable("aggregator", args.aggregator, exc) from None
    except RequestFailed as exc:
        from fed_clients.errors import FatalError

        hint = "; pass the operator key (--operator-key or FEDBPT_OPERATOR_KEY)" if exc.status == 401 else ""
        raise FatalError(
            f"the aggregator at {args.aggregator} refused {path} (HTTP {exc.status}: {exc.detail}){hint}"
        ) from None
    finally:
        http.close()


def _eta(history: list, rounds: int, now: float) -> tuple[float, float | None]:
    """Seconds since the run's first round opened, and the time left at the closed rounds' mean pace."""
    if not history:
        return 0.0, None
    elapsed = now - history[0].opened_at
    closed = [r for r in history if r.closed_at is not None]
    if not closed:
        return elapsed, None
    pace = (closed[-1].closed_at - history[0].opened_at) / len(closed)
    return elapsed, pace * (rounds - len(closed))


def status(args: argparse.Namespace) -> int:
    from fedbpt_wire.federation import RunStatus

    st = RunStatus.model_validate(_fetch(args, "/v1/status"))
    cfg = st.config
    print(
        f"run {cfg.run_id}: {st.state}, strategy {cfg.strategy}, d {cfg.intrinsic_dim}, L {cfg.prompt_length}, "
        f"{len(st.clients) if not st.redacted else '?'} clients registered (min {cfg.min_clients})"
    )
    merged = [r for r in st.history if r.state == "merged"]
    failed = [r for r in st.history if r.state == "failed"]
    current = next((r for r in st.history if r.state == "open"), None)
    if current is not None:
        who = f": {', '.join(current.reporters)}" if current.reporters else ""
        reported = "?" if st.redacted else f"{len(current.reporters)}/{len(current.selected)}"
        print(
            f"round {current.round + 1}/{cfg.rounds} open, {reported} selected clients reported{who}; "
            f"sigma {current.sigma_before:.4g}"
        )
    elif st.state == "waiting":
        print(f"round 1/{cfg.rounds} not yet open: waiting for {cfg.min_clients} clients to register")
    last = merged[-1] if merged else None
    if last is not None:
        acc = (
            "hidden (pass --operator-key)"
            if st.redacted
            else ("n/a" if last.val_accuracy is None else f"{last.val_accuracy:.4f}")
        )
        print(f"last merged round {last.round + 1}: global validation accuracy {acc}, sigma {last.sigma_after:.4g}")
    print(f"{len(merged)} rounds merged, {len(failed)} failed, of {cfg.rounds}")
    elapsed, left = _eta(st.history, cfg.rounds, time.time())
    if st.history:
        print(f"elapsed {elapsed:.0f} s" + ("" if left is None or st.state == "done" else f", ETA ~{left:.0f} s"))
    if st.state == "done" and not merged:
        print("no round merged: the run tuned nothing")
        return 1
    return 0


ROUND_COLUMNS = [
    "round",
    "state",
    "selected",
    "reported",
    "val_accuracy",
    "val_loss",
    "sigma_before",
    "sigma_after",
    "queries",
    "sequences",
    "tokens",
    "service_bytes_up",
    "service_bytes_down",
    "bytes_up",
    "bytes_down",
    "seconds",
    "cumulative_queries",
    "cumulative_bytes",
]


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _from_db(path: str):
    from aggregator.history import client_rounds, run_history
    from aggregator.store import Store

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such aggregator database (the file given to `fedbpt aggregator --db`)")
    store = Store(path)
    try:
        config = store.load_config()
        if config is None:
            raise ValueError(f"{path}: holds no run")
        return config, run_history(store), client_rounds(store)
    finally:
        store.close()


def report(args: argparse.Namespace) -> int:
    from fedbpt_wire.federation import ClientRoundRecord, RunStatus

    if bool(args.aggregator) == bool(args.db):
        raise ValueError("give one of --aggregator URL and --db FILE")
    if args.db:
        config, history, clients = _from_db(args.db)
    else:
        st = RunStatus.model_validate(_fetch(args, "/v1/status"))
        if st.redacted:
            raise ValueError(
                f"the aggregator at {args.aggregator} hides per-client data: pass its operator key "
                "(--operator-key or FEDBPT_OPERATOR_KEY), or read its database with --db"
            )
        config, history = st.config, st.history
        clients = [ClientRoundRecord.model_validate(c) for c in _fetch(args, "/v1/report/clients")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = round_table(history, ROUND_COLUMNS)
    _write_csv(out / "rounds.csv", rows, ROUND_COLUMNS)
    client_columns = list(ClientRoundRecord.model_fields)
    _write_csv(out / "clients.csv", [c.model_dump() for c in clients], client_columns)
    per_client: dict[str, dict] = {}
    for c in clients:
        agg = per_client.setdefault(
            c.client_id,
            {
                "client_id": c.client_id,
                "rounds": 0,
                "queries": 0,
                "sequences": 0,
                "tokens": 0,
                "service_bytes_up": 0,
                "service_bytes_down": 0,
                "update_bytes": 0,
            },
        )
        agg["rounds"] += 1
        for k in ("queries", "sequences", "tokens", "service_bytes_up", "service_bytes_down", "update_bytes"):
            agg[k] += getattr(c, k)
    totals = list(per_client.values())
    _write_csv(out / "client_totals.csv", totals, list(totals[0]) if totals else ["client_id"])
    plot_run(rows, config, out / "accuracy.png")
    merged = [r for r in rows if r["state"] == "merged"]
    print(
        f"run {config.run_id}: {len(history)} of {config.rounds} rounds, {len(merged)} merged, "
        f"{len(per_client)} clients; wrote {out / 'rounds.csv'}, {out / 'clients.csv'}, "
        f"{out / 'client_totals.csv'}, {out / 'accuracy.png'}"
    )
    return 0


def plot_run(rows: list[dict], config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["val_accuracy"] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in (
        (axes[0], "round", "round"),
        (axes[1], "cumulative_queries", "cumulative service queries"),
        (axes[2], "cumulative_bytes", "cumulative bytes, both links"),
    ):
        xs = [r[key] + 1 if key == "round" else r[key] for r in points]
        ax.plot(xs, [r["val_accuracy"] for r in points], marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("global prompt, clients' validation accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{config.run_id}: {config.strategy}, d {config.intrinsic_dim}, L {config.prompt_length}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
