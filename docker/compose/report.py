"""The compose stack's one-shot `report`: waits for the aggregator's run to finish, then writes its report.

<out>/<run id>/report.json holds the run config, the clients, one row per round (the global prompt's
accuracy and loss on the clients' validation data, the service queries, tokens and bytes, the aggregator's
bytes), the totals, the final prompt (z; the run config rebuilds its projection) and, unless --test-size is
0, the manual prompt's (zero-shot) and the tuned prompt's accuracy on held-out test examples, scored through
the service as the clients score. <out>/<run id>/rounds.csv has the rows. Run again on a finished run, it
writes the same report: everything comes from the aggregator's database and the service.

It reads the aggregator with its operator key (FEDBPT_OPERATOR_KEY): without it /v1/status hides the clients
and the metrics. The service queries it sums are those of the clients' round updates; each client's own
count adds its start-up check and the scoring of its final prompt.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from fedbpt_wire.round_table import SUMMARY, round_table

log = logging.getLogger(__name__)

COSTS = ("queries", "sequences", "tokens", "service_bytes", "bytes_up", "bytes_down")
# The aggregator link's bytes of a finished run's last round still grow: replicas started again claim, register
# and poll, and that is metered there. The rest of a finished run does not change.
LINK = ("bytes_up", "bytes_down")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", required=True, help="aggregator URL")
    parser.add_argument("--service", required=True, help="inference service URL (for the test accuracies)")
    parser.add_argument("--out", default="/reports", help="the report goes to <out>/<run id>/")
    parser.add_argument("--data", default="default", help="as the clients' --data")
    parser.add_argument("--task", default="rotten_tomatoes", help="as the clients' --task")
    parser.add_argument("--label-words", default=None, help="as the clients' --label-words")
    parser.add_argument(
        "--test-size",
        type=int,
        default=1000,
        help="held-out test examples to score the zero-shot and the tuned prompt on; 0: none",
    )
    parser.add_argument(
        "--wait", type=float, default=24 * 3600.0, help="seconds to wait for the run to finish before giving up"
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the test split again even where a report of this finished run is stored already",
    )


def wait_for_done(url: str, operator_key: str | None, wait_s: float, poll_s: float = 5.0) -> dict:
    deadline = time.monotonic() + wait_s
    last = "no answer yet"
    headers = {"Authorization": f"Bearer {operator_key}"} if operator_key else {}
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/v1/status", headers=headers, timeout=30).json()
        except httpx.HTTPError as exc:  # the aggregator restarting: keep waiting
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status.get("redacted"):
                sys.exit(
                    "report: the aggregator hides the run's clients and metrics from this caller: "
                    "give report its operator key (FEDBPT_OPERATOR_KEY)"
                )
            if status["state"] == "done":
                return status
            last = f"round {status['round'] + 1}/{status['config']['rounds']}, state {status['state']}"
        time.sleep(poll_s)
    sys.exit(f"report: the run did not finish within {wait_s:.0f} s ({last})")


def test_accuracies(args: argparse.Namespace, status: dict, operator_key: str | None, api_key: str | None) -> dict:
    from fed_clients.aggregator_client import AggregatorClient
    from fed_clients.client import PromptScorer
    from fed_clients.data import load_splits
    from fed_clients.runner import task_from
    from fed_clients.service_client import ServiceClient
    from fedbpt_wire.federation import RunConfig
    from fedbpt_wire.tensors import decode_tensor

    task = task_from(args)
    config = RunConfig.model_validate(status["config"])
    aggregator = AggregatorClient(args.aggregator)
    if operator_key:
        aggregator.http.set_token(operator_key)
    final = aggregator.global_state()
    aggregator.close()
    z = decode_tensor(final.mean)
    out: dict = {"prompt": {"z": [float(x) for x in z], "sigma": final.sigma}}
    if final.served is not None:
        # What the clients' prompt files serve: the aggregator's choice on their pooled validation splits
        # (each client applies it with a bias fitted on its own labelled examples).
        out["served"] = final.served.served
        out["served_selection"] = final.served.model_dump(mode="json", exclude={"mean"})
    test = load_splits(args.data, task)["test"][: args.test_size]
    if not test:
        log.warning("no test split in --data %s: no test accuracies", args.data)
        return out
    service = ServiceClient(args.service, api_key, prompt_wire="seed")
    try:
        info = service.model_info()
        labels = np.array([ex.label for ex in test])
        zero = PromptScorer.manual(service, task, info).logits(None, test)[0]
        tuned = PromptScorer.for_run(service, task, config, info).logits(z[None], test)[0]
    finally:
        service.close()
    return {
        **out,
        "model": info.name,
        "test_examples": len(test),
        "label_words": list(task.label_words),
        "zero_shot_test_accuracy": float((zero.argmax(-1) == labels).mean()),
        "tuned_test_accuracy": float((tuned.argmax(-1) == labels).mean()),
    }


def _settled(report: dict) -> dict:
    """The report without what still moves after the run ended (LINK)."""
    return {
        **report,
        "rounds": [{k: v for k, v in r.items() if k not in LINK} for r in report["rounds"] or []],
        "totals": {k: v for k, v in (report["totals"] or {}).items() if k not in LINK},
    }


def _stored(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from fedbpt_wire.logs import setup_logging

    setup_logging()

    operator_key = os.environ.get("FEDBPT_OPERATOR_KEY")
    status = wait_for_done(args.aggregator, operator_key, args.wait)
    rows = round_table(status["history"])
    merged = [r for r in rows if r["state"] == "merged"]
    report = {
        "run_id": status["config"]["run_id"],
        "state": status["state"],
        "run_config": status["config"],
        "clients": status["clients"],
        "rounds_done": len(merged),
        "final_val_accuracy": merged[-1]["val_accuracy"] if merged else None,
        "totals": {k: sum(r[k] for r in rows) for k in COSTS},
        "rounds": rows,
    }
    out = Path(args.out) / report["run_id"]
    stored = _stored(out / "report.json")
    current = stored is not None and _settled({k: stored.get(k) for k in report}) == _settled(report)
    if current and not args.rescore and (args.test_size == 0 or "test_examples" in (stored or {})):
        # A finished run does not change: its stored report stands, and `up` again costs no test scoring.
        print(f"run {report['run_id']}: the stored report is current | {out / 'report.json'}", flush=True)
        return
    if args.test_size > 0:
        report |= test_accuracies(args, status, operator_key, os.environ.get("FEDBPT_API_KEY"))

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=SUMMARY)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "rounds.csv", table.getvalue())
    tested = (
        (
            f" | test accuracy on {report['test_examples']}: zero-shot {report['zero_shot_test_accuracy']:.4f}, "
            f"tuned {report['tuned_test_accuracy']:.4f}"
        )
        if "test_examples" in report
        else ""
    )
    if "served" in report:
        tested += f" | served: {report['served']} ({report['served_selection']['reason']})"
    print(
        f"run {report['run_id']}: {report['rounds_done']}/{status['config']['rounds']} rounds merged, "
        f"{len(report['clients'])} clients, {report['totals']['queries']} service queries in their round updates "
        "(a client's own count adds its start-up check and final prompt), "
        f"{report['totals']['tokens']} tokens{tested} | {out / 'report.json'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
