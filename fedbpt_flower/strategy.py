"""A Flower strategy that hosts one of the project's strategies (aggregator.strategies) unchanged.

Flower owns what it is good at: which nodes are connected, the sampling wait (`sample_nodes` with min_clients),
sending, and the round's deadline (`send_and_receive(timeout=round_timeout_s)`, via `Strategy.start`). This class
owns the global search distribution and folds each round's replies into it with the same validation
(`check_update`), and bound and merge (`merge_round`) as the native coordinator, in the same client-id order.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from pydantic import ValidationError

from aggregator.history import round_metrics
from aggregator.strategies import Strategy, make_strategy, merge_round, strategy_class
from aggregator.validation import Invalid, check_update
from fedbpt_wire.federation import RunConfig, UpdateRequest

from .records import MESSAGE_TYPE, task_content, update_request

log = logging.getLogger("fedbpt_flower")


@dataclass
class RoundOutcome:
    """One round as the ServerApp saw it: what its report holds."""

    round: int
    state: str  # "merged" or "failed"
    selected: list[str]
    reporters: list[str]
    sigma_before: float
    sigma_after: float | None
    sigma_merged: float | None
    mean: list[float]  # the global mean after the round, float64 (float32 on the wire)
    rejected: dict[str, str] = field(default_factory=dict)  # client or node -> why its reply was dropped
    metrics: dict = field(default_factory=dict)
    opened_at: float = 0.0  # wall clock (time.time) when its tasks were sent and when its merge was done
    closed_at: float = 0.0


class FedBPTFlowerStrategy(FlowerStrategy):
    def __init__(self, config: RunConfig):
        # The strategy's own rules on the config (fedbpt-noperturb: no perturbation), as the native aggregator.
        self.config = strategy_class(config).configure(config)
        self.strategy: Strategy | None = None  # built at round 0's sampling: FedBPT's popsize is its sample
        self.names: dict[int, str] = {}  # node id -> the client id it first reported under
        self.history: list[RoundOutcome] = []
        self._selected: list[int] = []
        self._opened_at = 0.0

    def summary(self) -> None:
        c = self.config
        log.info(
            "FedBPT strategy %s: %d rounds, d=%d, participation %g, min clients %d, min updates %d, round timeout %g s",
            c.strategy,
            c.rounds,
            c.intrinsic_dim,
            c.participation,
            c.min_clients,
            c.min_updates,
            c.round_timeout_s,
        )

    def _name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    @property
    def _current(self) -> Strategy:
        assert self.strategy is not None, "the strategy exists from round 0's sampling on"
        return self.strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        connected = len(list(grid.get_node_ids()))
        # Rounded first, as the native coordinator does, so 0.3 x 10 samples 3 nodes, not 4.
        size = max(1, math.ceil(round(self.config.participation * connected, 9)))
        nodes, _ = sample_nodes(grid, self.config.min_clients, size)
        self._selected = sorted(nodes)
        self._opened_at = time.time()
        if self.strategy is None:
            self.strategy = make_strategy(self.config, popsize=len(nodes))
        round_ = server_round - 1  # Flower counts from 1; the clients' seeds take the native round number
        return [
            Message(
                task_content(
                    round_,
                    self.strategy.local_start(self._name(n)),
                    self.config.run_id,
                    self.strategy.clients_perturb(self.config),
                ),
                dst_node_id=n,
                message_type=MESSAGE_TYPE,
                group_id=str(round_),
            )
            for n in self._selected
        ]

    def _checked_updates(
        self, round_: int, replies: Iterable[Message]
    ) -> tuple[dict[str, UpdateRequest], dict[str, str]]:
        """The round's valid updates by client id, and why each other reply was dropped (as the native checks)."""
        updates: dict[str, UpdateRequest] = {}
        rejected: dict[str, str] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                rejected[self._name(node)] = f"client error: {msg.error.reason}"
                continue
            try:
                client_id, req = update_request(msg.content)
                check_update(req, self.config)
            except Invalid as exc:
                rejected[self._name(node)] = str(exc)
                continue
            except (KeyError, TypeError, ValueError, ValidationError) as exc:
                rejected[self._name(node)] = f"malformed reply: {exc}".splitlines()[0]
                continue
            # A node keeps the id it first reported: local-only keys each client's own prompt by it.
            owner = next((n for n, name in self.names.items() if name == client_id), node)
            if self.names.get(node, client_id) != client_id or owner != node or client_id in updates:
                rejected[f"node-{node}"] = f"client id {client_id!r} is another node's"
                continue
            if req.round != round_:
                rejected[client_id] = f"round {req.round} is not the open round {round_}"
                continue
            self.names[node] = client_id
            updates[client_id] = req
        for who, why in rejected.items():
            log.warning("round %d: dropped the reply of %s: %s", round_, who, why)
        return updates, rejected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = server_round - 1
        current = self._current
        updates, rejected = self._checked_updates(round_, replies)
        ordered = sorted(updates.items())  # the native store hands the merge its updates in client-id order
        outcome = RoundOutcome(
            round_,
            "failed",
            sorted(self._name(n) for n in self._selected),
            [c for c, _ in ordered],
            current.sigma,
            None,
            None,
            [],
            rejected,
            round_metrics([u for _, u in ordered]),
        )
        if len(ordered) >= self.config.min_updates:
            candidate = copy.deepcopy(current)
            try:
                result, clipped = merge_round(candidate, ordered, self.config)
                if not candidate.own_prompts:  # there a client's mean moves its own prompt only: nothing is bounded
                    outcome.metrics["clipped"] = clipped
            except Exception:
                # As natively: the round is recorded failed and the run goes on from the state before it.
                log.exception("round %d: the merge failed; the round is recorded as failed", round_)
            else:
                self.strategy = candidate
                outcome.state, outcome.sigma_after, outcome.sigma_merged = (
                    "merged",
                    result.sigma_after,
                    result.sigma_merged,
                )
        else:
            log.warning(
                "round %d failed: %d/%d updates, %d needed",
                round_,
                len(ordered),
                len(self._selected),
                self.config.min_updates,
            )
        outcome.mean = [float(x) for x in self._current.mean]
        outcome.opened_at, outcome.closed_at = self._opened_at, time.time()
        self.history.append(outcome)
        log.info(
            "round %d %s with %d/%d updates: sigma %.4g",
            round_,
            outcome.state,
            len(ordered),
            len(self._selected),
            self._current.sigma,
        )
        metrics: dict[str, Any] = {str(k): v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}
        mean = np.asarray(self._current.mean, dtype=np.float32)
        return ArrayRecord({"mean": Array(mean)}), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Each client scores the global mean on its validation split at the start of its next round, as natively.
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
