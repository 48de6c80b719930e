"""One client's part in a run: register, work each round it is sampled for until the run is done, then keep the
final prompt as a file."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbpt_wire.federation import RunConfig
from fedbpt_wire.metrics import label_cross_entropy
from fedbpt_wire.served import ServedChoice, choose
from fedbpt_wire.tensors import decode_tensor, encode_tensor

from .aggregator_client import AggregatorClient
from .client import FedBPTClient
from .credentials import TokenFile, default_state_dir
from .data import ClientData
from .errors import FatalError
from .evaluation import fit_calibration
from .http import RequestFailed
from .prompt_file import prompt_payload, write_prompt
from .service_client import ServiceClient
from .tasks import Task

log = logging.getLogger(__name__)


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
