"""A client process: claim its partition where told `auto/N`, register, then work each round it is sampled
for, until the run is done."""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .aggregator_client import AggregatorClient
from .client import FedBPTClient
from .credentials import TokenFile, default_state_dir
from .data import Example, load_splits
from .http import RequestFailed
from .partition import few_shot, partition, train_val_split
from .service_client import PROMPT_WIRE_FORMS, ServiceClient
from .tasks import Task, get_task, parse_label_words

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientData:
    train: list[Example]
    val: list[Example]


def client_shard(examples: list[Example], index: int, n_clients: int, alpha: float | None, seed: int,
                 per_class: int | None = None, val_fraction: float = 0.25) -> ClientData:
    """Client `index`'s part of a shared pool: few-shot sample, IID or Dirichlet split, local train/val.

    Every client computes the same partition from the same seed, so no one hands out data.
    """
    labels = np.array([ex.label for ex in examples])
    pool = few_shot(labels, per_class, seed) if per_class else np.arange(len(examples))
    parts = partition(labels[pool], n_clients, alpha, seed)
    mine = pool[parts[index]]
    train_idx, val_idx = train_val_split(mine, val_fraction, seed + index)
    return ClientData([examples[i] for i in train_idx], [examples[i] for i in val_idx])


def run_client(service: ServiceClient, aggregator: AggregatorClient, client_id: str, data: ClientData,
               task: Task, *, enroll_key: str | None = None, batch_size: int = 16, poll_s: float = 0.25,
               max_poll_s: float = 2.0, long_poll_s: float = 10.0, max_idle_s: float = 3600.0,
               state_dir: Path | None = None) -> int:
    """Returns the number of rounds this client worked; exits when the run is done.

    The aggregator token is kept under `state_dir` (default: `default_state_dir()`), so that this client,
    restarted, re-binds its own id.
    """
    saved = TokenFile(state_dir or default_state_dir(), str(aggregator.http.http.base_url), client_id)
    reg = aggregator.register(client_id, len(data.train), enroll_key, token=saved.read())
    saved.write(reg.token)
    client = FedBPTClient(client_id, service, task, data.train, data.val, reg.config, batch_size)
    log.info("%s registered: %d train / %d val examples, strategy %s", client_id, len(data.train), len(data.val),
             reg.config.strategy)
    worked = 0
    idle_since = time.monotonic()
    wait = poll_s
    while True:
        task = aggregator.round(wait=long_poll_s)
        if task.state == "done":
            return worked
        if task.state == "open" and task.selected and not task.submitted:
            update = client.run_round(task)
            try:
                aggregator.submit(update)
                worked += 1
            except RequestFailed as exc:
                if exc.status != 409:
                    raise
                log.warning("%s round %d: update refused (%s); the round closed without it", client_id, task.round,
                            exc.detail)
            idle_since = time.monotonic()
            wait = poll_s
            continue
        if time.monotonic() - idle_since > max_idle_s:
            raise TimeoutError(f"{client_id}: no work for {max_idle_s:.0f} s")
        time.sleep(wait)
        # Back off while idle: every poll is bytes on the aggregator link, and they are counted.
        wait = min(wait * 1.5, max_poll_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, help="inference service URL")
    parser.add_argument("--api-key", default=os.environ.get("FEDBPT_API_KEY"), help="service key (env FEDBPT_API_KEY)")
    parser.add_argument("--aggregator", required=True, help="aggregator URL")
    parser.add_argument("--enroll-key", default=os.environ.get("FEDBPT_ENROLL_KEY"))
    parser.add_argument("--client-id", default=None, help="default: client-<partition index> or the host name")
    parser.add_argument("--data", default="default",
                        help="'default' (embedded), a CSV/TSV/JSONL file of this client's own examples, "
                             "a directory with train/validation files, or 'hf'")
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--label-words", default=None,
                        help="comma-separated verbalizer replacing the task's, in class order, each word with its "
                             "leading space, e.g. ' bad, good' (every client of a run must give the same)")
    parser.add_argument("--partition", default=None, metavar="K/N",
                        help="take part K (0-based) of N of a shared pool instead of the whole file; "
                             "auto/N: the aggregator hands out K, the same one again to the same --client-id "
                             "or host name")
    parser.add_argument("--alpha", type=float, default=None, help="Dirichlet alpha for --partition (default IID)")
    parser.add_argument("--per-class", type=int, default=None, help="few-shot: examples per class in the whole pool")
    parser.add_argument("--partition-seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=16, help="texts per CMA-ES iteration")
    parser.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout per request, seconds")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where this client keeps its aggregator token, so that it re-binds its own id when "
                             "restarted (default: $FEDBPT_STATE_DIR or ~/.local/state/fedbpt/clients)")
    parser.add_argument("--prompt-wire", choices=PROMPT_WIRE_FORMS, default="float32",
                        help="how prompts travel to the service: dense [P, L, D] float32 or float16, or 'seed': "
                             "z [P, d] and the projection seed, expanded by the service (d floats per prompt)")


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


def _client_data(args: argparse.Namespace, aggregator: AggregatorClient) -> tuple[str, ClientData]:
    """This client's id and examples: its part of the shared pool, or the whole of its own data."""
    k, n = parse_partition(args.partition) if args.partition else (None, None)
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


def run(args: argparse.Namespace) -> None:
    service = ServiceClient(args.service, args.api_key, prompt_wire=args.prompt_wire, timeout=args.timeout)
    aggregator = AggregatorClient(args.aggregator, timeout=args.timeout)
    try:
        client_id, data = _client_data(args, aggregator)
        rounds = run_client(service, aggregator, client_id, data, task_from(args), enroll_key=args.enroll_key,
                            batch_size=args.batch_size, state_dir=args.state_dir)
    finally:
        service.close()
        aggregator.close()
    log.info("%s done after %d rounds; %d service queries", client_id, rounds, service.costs.queries)
