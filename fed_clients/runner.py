"""`fedbpt client`: its flags, this client's data (its partition claimed where told `auto/N`), the checks before any
round, then its part in the run (`session`) and a one-line error for what a user can fix."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import httpx
import numpy as np

from .aggregator_client import AggregatorClient
from .data import ClientData, Example, check_data, client_shard, load_splits
from .errors import FatalError, service_refused, unreachable
from .http import RequestFailed
from .partition import train_val_split
from .preflight import check_service
from .service_client import PROMPT_WIRE_FORMS, ServiceClient
from .session import RunOutcome, finish, run_client
from .tasks import Task, get_task

# Tries (about 4 s in all) before a server that does not answer at the start is reported: a wrong URL should not
# make a user wait, whereas a server that goes away mid-run is waited for (--retry-for).
START_RETRIES = 3

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, help="inference service URL")
    parser.add_argument("--api-key", default=os.environ.get("FEDBPT_API_KEY"), help="service key (env FEDBPT_API_KEY)")
    parser.add_argument("--aggregator", required=True, help="aggregator URL")
    parser.add_argument("--enroll-key", default=os.environ.get("FEDBPT_ENROLL_KEY"))
    parser.add_argument("--client-id", default=None, help="default: client-<partition index> or the host name")
    parser.add_argument(
        "--data",
        default="default",
        help="'default' (embedded), a CSV/TSV/JSONL file of this client's own examples, "
        "a directory with train/validation files, or 'hf'",
    )
    parser.add_argument(
        "--task",
        default="rotten_tomatoes",
        metavar="NAME|FILE",
        help="a built-in task or a task spec file (JSON: template and label words; docs/formats.md)",
    )
    parser.add_argument(
        "--label-words",
        default=None,
        help="comma-separated verbalizer replacing the task's, in class order, each word with its "
        "leading space, e.g. ' bad, good' (every client of a run must give the same)",
    )
    parser.add_argument(
        "--partition",
        default=None,
        metavar="K/N",
        help="take part K (0-based) of N of a shared pool instead of the whole file; "
        "auto/N: the aggregator hands out K, the same one again to the same --client-id "
        "or host name",
    )
    parser.add_argument("--alpha", type=float, default=None, help="Dirichlet alpha for --partition (default IID)")
    parser.add_argument("--per-class", type=int, default=None, help="few-shot: examples per class in the whole pool")
    parser.add_argument("--partition-seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=16, help="texts per CMA-ES iteration")
    parser.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout per request, seconds")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where this client keeps its aggregator token, so that it re-binds its own id when "
        "restarted (default: $FEDBPT_STATE_DIR or ~/.local/state/fedbpt/clients)",
    )
    parser.add_argument(
        "--ca-cert",
        default=None,
        metavar="FILE",
        help="CA certificate (PEM) to trust for HTTPS to the service and the aggregator",
    )
    parser.add_argument(
        "--retry-for",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to keep retrying, with backoff, a service or aggregator that stops answering "
        "mid-run (a restart); at the start a server that does not answer is an error at once "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--prompt-out",
        default=None,
        metavar="FILE",
        help="where to write the tuned prompt at the end of the run "
        "(default: prompt-<run id>-<client id>.json in the current directory)",
    )
    parser.add_argument(
        "--prompt-wire",
        choices=PROMPT_WIRE_FORMS,
        default="float32",
        help="how prompts travel to the service: dense [P, L, D] float32 or float16, or 'seed': "
        "z [P, d] and the projection seed, expanded by the service (d floats per prompt)",
    )


def task_from(args: argparse.Namespace) -> Task:
    return get_task(args.task, args.label_words)


def parse_partition(spec: str) -> tuple[int | None, int]:
    """'K/N' -> (K, N); 'auto/N' -> (None, N), K then to be claimed from the aggregator."""
    head, _, tail = spec.partition("/")
    try:
        n = int(tail)
        k = None if head == "auto" else int(head)
    except ValueError:
        raise ValueError(f"--partition must be K/N or auto/N with integers K and N, got {spec!r}") from None
    if n < 1:
        raise ValueError(f"--partition {spec}: need N >= 1")
    if k is not None and not 0 <= k < n:
        raise ValueError(f"--partition {spec}: need 0 <= K < N")
    return k, n


def _client_data(
    args: argparse.Namespace, aggregator: AggregatorClient, splits: dict[str, list[Example]] | None = None
) -> tuple[str, ClientData]:
    """This client's id and examples: its part of the shared pool, or the whole of its own data (`splits`, where
    the caller loaded them already)."""
    k, n = parse_partition(args.partition) if args.partition else (None, None)
    if splits is None:
        splits = load_splits(args.data, task_from(args))
    if n is not None:
        if k is None:
            # Compose replicas get no index; the host name is the container's and survives its restarts.
            instance = args.client_id or os.uname().nodename
            k = aggregator.claim_partition(instance, n, args.enroll_key).index
            log.info("%s claimed partition %d/%d", instance, k, n)
        data = client_shard(splits["train"], k, n, args.alpha, args.partition_seed, args.per_class, args.val_fraction)
        return args.client_id or f"client-{k}", data
    if splits["validation"]:
        data = ClientData(splits["train"], splits["validation"])
    else:
        train_idx, val_idx = train_val_split(np.arange(len(splits["train"])), args.val_fraction, args.partition_seed)
        data = ClientData([splits["train"][i] for i in train_idx], [splits["train"][i] for i in val_idx])
    return args.client_id or os.uname().nodename, data


def _refused(url: str, exc: RequestFailed) -> FatalError:
    if exc.path.startswith(("/v1/clients", "/v1/partitions")) and exc.status == 401:
        return FatalError(
            f"the aggregator at {url} refused the enroll key ({exc.detail}); check --enroll-key or "
            "FEDBPT_ENROLL_KEY with the aggregator's operator"
        )
    if exc.path.startswith("/v1/clients") and exc.status == 409:
        return FatalError(
            f"the aggregator at {url} refused the registration ({exc.detail}); use another "
            "--client-id, or the --state-dir that holds this id's token"
        )
    return FatalError(f"the aggregator at {url} refused {exc.path} (HTTP {exc.status}: {exc.detail})")


def _ping_aggregator(aggregator: AggregatorClient, url: str) -> None:
    try:
        aggregator.http.request("GET", "/healthz")
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise unreachable("aggregator", url, exc) from None


def run(args: argparse.Namespace) -> None:
    task = task_from(args)
    if args.partition:
        parse_partition(args.partition)
    # The files first: a malformed one is reported before any server is contacted.
    splits = load_splits(args.data, task)
    seen = {ex.label for ex in splits["train"] + splits["validation"]}
    if len(seen) < task.num_classes:
        missing = [task.names[c] for c in range(task.num_classes) if c not in seen]
        log.warning(
            "%s: no example of %s among the task %s's %d classes: right task? (fine where another client holds them)",
            args.data,
            ", ".join(missing),
            task.name,
            task.num_classes,
        )
    verify = args.ca_cert or True
    options = dict(timeout=args.timeout, verify=verify, retries=START_RETRIES)
    service = ServiceClient(args.service, args.api_key, prompt_wire=args.prompt_wire, name="service", **options)
    aggregator = AggregatorClient(args.aggregator, name="aggregator", **options)
    outcome = RunOutcome(0)
    started = time.monotonic()
    try:
        try:
            if args.partition and args.partition.startswith("auto"):
                _ping_aggregator(aggregator, args.aggregator)
            client_id, data = _client_data(args, aggregator, splits)
            check_data(client_id, data, args.data, args.batch_size)
            info = check_service(service, task)
            log.info(
                "service %s: %s (%s, hidden size %d); key and label words %s accepted",
                args.service,
                info.name,
                info.kind,
                info.hidden_size,
                list(task.label_words),
            )
            _ping_aggregator(aggregator, args.aggregator)
            service.http.retry_for = aggregator.http.retry_for = args.retry_for
            rounds = run_client(
                service,
                aggregator,
                client_id,
                data,
                task,
                enroll_key=args.enroll_key,
                batch_size=args.batch_size,
                state_dir=args.state_dir,
                outcome=outcome,
            )
            path = finish(service, aggregator, client_id, data, task, outcome, args.prompt_out)
        except RequestFailed as exc:
            if exc.path.startswith(("/v1/score", "/v1/model")):
                raise service_refused(args.service, exc) from None
            raise _refused(args.aggregator, exc) from None
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise FatalError(
                f"lost the service or the aggregator for more than --retry-for {args.retry_for:.0f} s "
                f"({exc}); restart this client with the same --client-id to rejoin the run"
            ) from None
    finally:
        service.close()
        aggregator.close()
    acc = "n/a" if outcome.last_val_accuracy is None else f"{outcome.last_val_accuracy:.3f}"
    served = "n/a" if outcome.served is None else f"{outcome.served.served} ({outcome.served.reason})"
    spent = service.usage()
    print(
        f"{client_id} done in {time.monotonic() - started:.0f} s: worked {rounds} rounds; {spent.queries} "
        f"service queries ({outcome.round_queries} in its accepted round updates, which the run's costs sum; "
        f"{spent.queries - outcome.round_queries} besides: start-up check, final prompt, any refused update), "
        f"{spent.tokens} tokens, {(spent.bytes_up + spent.bytes_down) / 1024:.1f} KiB to "
        f"and from the service, {(aggregator.http.wire.bytes_up + aggregator.http.wire.bytes_down) / 1024:.1f} KiB "
        f"to and from the aggregator; last global val accuracy {acc}; served: {served}; prompt file: {path}",
        flush=True,
    )
