"""A client process: claim its partition where told `auto/N`, register, then work each round it is sampled
for, until the run is done."""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from fedbpt_wire.federation import RunConfig
from fedbpt_wire.metrics import label_cross_entropy
from fedbpt_wire.served import ServedChoice, choose
from fedbpt_wire.tensors import decode_tensor, encode_tensor

from .aggregator_client import AggregatorClient
from .client import FedBPTClient
from .credentials import TokenFile, default_state_dir
from .data import DataError, Example, load_splits
from .errors import FatalError, service_refused, unreachable
from .evaluation import fit_calibration
from .http import RequestFailed
from .partition import few_shot, partition, train_val_split
from .preflight import check_service
from .prompt_file import prompt_payload, write_prompt
from .service_client import PROMPT_WIRE_FORMS, ServiceClient
from .tasks import Task, get_task, parse_label_words

# Tries (about 4 s in all) before a server that does not answer at the start is reported: a wrong URL should not
# make a user wait, whereas a server that goes away mid-run is waited for (--retry-for).
START_RETRIES = 3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientData:
    train: list[Example]
    val: list[Example]


def client_shard(
    examples: list[Example],
    index: int,
    n_clients: int,
    alpha: float | None,
    seed: int,
    per_class: int | None = None,
    val_fraction: float = 0.25,
) -> ClientData:
    """Client `index`'s part of a shared pool: few-shot sample, IID or Dirichlet split, local train/val.

    Every client computes the same partition from the same seed, so no one hands out data.
    """
    labels = np.array([ex.label for ex in examples])
    pool = few_shot(labels, per_class, seed) if per_class else np.arange(len(examples))
    parts = partition(labels[pool], n_clients, alpha, seed)
    mine = pool[parts[index]]
    train_idx, val_idx = train_val_split(mine, val_fraction, seed + index)
    return ClientData([examples[i] for i in train_idx], [examples[i] for i in val_idx])


@dataclass
class RunOutcome:
    """What a client saw of a run: enough for its final summary and its prompt file."""

    rounds_worked: int
    config: RunConfig | None = None
    last_val_accuracy: float | None = None  # the global prompt's, on this client's validation split
    served: ServedChoice | None = None  # what the prompt file serves, and why
    round_queries: int = 0  # the service queries of its accepted updates: what the aggregator's costs sum


def run_client(
    service: ServiceClient,
    aggregator: AggregatorClient,
    client_id: str,
    data: ClientData,
    task: Task,
    *,
    enroll_key: str | None = None,
    batch_size: int = 16,
    poll_s: float = 0.25,
    max_poll_s: float = 2.0,
    long_poll_s: float = 10.0,
    max_idle_s: float = 3600.0,
    state_dir: Path | None = None,
    outcome: RunOutcome | None = None,
) -> int:
    """Returns the number of rounds this client worked; exits when the run is done.

    The aggregator token is kept under `state_dir` (default: `default_state_dir()`), so that this client,
    restarted, re-binds its own id. `outcome`, where given, is filled in as the run goes.
    """
    outcome = outcome or RunOutcome(0)
    saved = TokenFile(state_dir or default_state_dir(), aggregator.http.base_url, client_id)
    reg = aggregator.register(client_id, len(data.train), enroll_key, token=saved.read())
    saved.write(reg.token)
    outcome.config = reg.config
    client = FedBPTClient(client_id, service, task, data.train, data.val, reg.config, batch_size)
    log.info(
        "%s registered: %d train / %d val examples, strategy %s, %d rounds",
        client_id,
        len(data.train),
        len(data.val),
        reg.config.strategy,
        reg.config.rounds,
    )
    worked = 0
    started = time.monotonic()
    idle_since = time.monotonic()
    wait = poll_s
    while True:
        round_task = aggregator.round(wait=long_poll_s)
        if round_task.state == "done":
            return worked
        if round_task.state == "open" and round_task.selected and not round_task.submitted:
            update = client.run_round(round_task)
            try:
                aggregator.submit(update)
                worked += 1
                outcome.round_queries += update.costs.queries
            except RequestFailed as exc:
                if exc.status != 409:
                    raise
                log.warning(
                    "%s round %d: update refused (%s); the round closed without it",
                    client_id,
                    round_task.round,
                    exc.detail,
                )
            outcome.rounds_worked = worked
            if update.metrics.global_val_accuracy is not None:
                outcome.last_val_accuracy = update.metrics.global_val_accuracy
            _progress(
                client_id, round_task.round, reg.config.rounds, time.monotonic() - started, outcome.last_val_accuracy
            )
            idle_since = time.monotonic()
            wait = poll_s
            continue
        if time.monotonic() - idle_since > max_idle_s:
            raise TimeoutError(f"{client_id}: no work for {max_idle_s:.0f} s")
        time.sleep(wait)
        # Back off while idle: every poll is bytes on the aggregator link, and they are counted.
        wait = min(wait * 1.5, max_poll_s)


def _progress(client_id: str, round_: int, rounds: int, elapsed: float, val_accuracy: float | None) -> None:
    done = round_ + 1
    acc = "n/a" if val_accuracy is None else f"{val_accuracy:.3f}"
    eta = elapsed / done * (rounds - done)
    log.info(
        "%s round %d/%d | %.0f s elapsed, ~%.0f s to go | global prompt's val accuracy %s (this client's split)",
        client_id,
        done,
        rounds,
        elapsed,
        eta,
        acc,
    )


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
    task = get_task(args.task)
    if args.label_words:
        task = task.with_label_words(parse_label_words(args.label_words))
    return task


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


def check_data(client_id: str, data: ClientData, source: str, batch_size: int) -> None:
    """Refuses a client with nothing to train on; warns where its updates will be noise."""
    n = len(data.train) + len(data.val)
    if not data.train or not data.val:
        raise DataError(
            f"{source}: client {client_id} has {n} example(s); at least 2 are needed, one to train on and one "
            "to validate (better: one batch or more)"
        )
    # A shard just under one batch is scored whole each iteration, which is no worse: the demo's clients hold 15
    # examples for batches of 16. Under half a batch, the search fits a handful of examples.
    if len(data.train) < batch_size / 2:
        log.warning(
            "%s: only %d training examples, under half a batch (--batch-size %d): its updates will be "
            "noisy and it weighs little in the merge",
            client_id,
            len(data.train),
            batch_size,
        )


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


def finish(
    service: ServiceClient,
    aggregator: AggregatorClient,
    client_id: str,
    data: ClientData,
    task: Task,
    outcome: RunOutcome,
    prompt_out: str | None,
) -> Path:
    """After the run: the final global prompt scored on this client's validation split and kept as a file.
    A run in which no round merged has no prompt to keep, and is an error."""
    status = aggregator.status()
    merged = [r for r in status.history if r.state == "merged"]
    if not merged:
        raise FatalError(
            f"run {status.config.run_id} ended with none of its {len(status.history)} rounds merged "
            "(each closed with too few updates before its deadline): no prompt was tuned; see the "
            "aggregator's and the clients' logs"
        )
    final = aggregator.global_state()
    z = decode_tensor(final.mean)
    if final.client_means and client_id in final.client_means:
        z = decode_tensor(final.client_means[client_id])  # local-only: this client's own prompt
    config = outcome.config or status.config
    info = service.model_info()
    client = FedBPTClient(client_id, service, task, data.train, data.val, config)
    choice = final.served
    if choice is not None and choice.mean is not None:
        z = decode_tensor(choice.mean)
    examples = data.train + data.val
    labels = np.array([ex.label for ex in examples])
    tuned = client.scorer.logits(z[None], examples)[0]
    if choice is None:
        # No choice from the aggregator (one from before it made one, or local-only): the same rule on this
        # client's own validation split, between the final prompt and the baseline.
        _, comparison = client.compare_logits(tuned)
        _, choice = choose({len(status.history): comparison})  # the prompt after the last round
        choice = choice.model_copy(update={"mean": encode_tensor(z)})
    baseline = client.baseline_logits()
    # The read-out is part of what is served: its bias fitted on every labelled example this client holds.
    bias = fit_calibration(baseline if choice.served == "baseline" else tuned, labels)
    n = len(data.train)
    loss, acc = label_cross_entropy(tuned[None, n:], labels[n:])
    metrics = {
        "val_accuracy": float(acc[0]),
        "val_loss": float(loss[0]),
        "zero_shot_val_accuracy": float((baseline[n:].argmax(-1) == labels[n:]).mean()),
        "val_examples": len(data.val),
        "train_examples": len(data.train),
        "rounds_merged": len(merged),
        "rounds": len(status.history),
        "rounds_worked": outcome.rounds_worked,
    }
    outcome.served = choice
    # A run id is the operator's free text: it must not turn into directories here.
    path = Path(prompt_out or re.sub(r"[^A-Za-z0-9_.-]", "_", f"prompt-{config.run_id}-{client_id}") + ".json")
    payload = prompt_payload(info, config, task, z, metrics, f"fedbpt client {client_id}", choice=choice, bias=bias)
    write_prompt(path, payload)
    return path


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
