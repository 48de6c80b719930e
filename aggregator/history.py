"""What a run reports of itself, read from its store: per-round records, per-client records, the status (redacted
for whoever may not see details) and the served prompt.

Reads only: the coordinator calls these under its lock, `fedbpt report` on a stopped run's database, and the
Flower app's history takes `round_metrics` so both hosts record a round alike.
"""

from __future__ import annotations

from fedbpt_wire.federation import ClientRoundRecord, RoundRecord, RunConfig, RunStatus, UpdateRequest
from fedbpt_wire.served import ServedChoice, ValidationComparison, choose, pool
from fedbpt_wire.tensors import encode_tensor

from .store import Store

# What a status without details shows of a round: its shape and costs, not who took part or how they scored.
_HIDDEN: dict[str, object] = {
    "selected": [],
    "reporters": [],
    "val_accuracy": None,
    "val_loss": None,
    "clipped": None,
    "vs_baseline": None,
}


def round_metrics(updates: list[UpdateRequest]) -> dict:
    """A round's record: validation metrics weighted by each client's val_samples, costs summed."""

    def weighted(name: str) -> float | None:
        pairs = [
            (u.metrics.val_samples, getattr(u.metrics, name))
            for u in updates
            if u.metrics.val_samples > 0 and getattr(u.metrics, name) is not None
        ]
        total = sum(n for n, _ in pairs)
        return sum(n * v for n, v in pairs) / total if total else None

    pooled = pool(u.metrics.vs_baseline for u in updates if u.metrics.vs_baseline is not None)
    return {
        "val_accuracy": weighted("global_val_accuracy"),
        "val_loss": weighted("global_val_loss"),
        "vs_baseline": pooled.model_dump() if pooled is not None else None,
        "queries": sum(u.costs.queries for u in updates),
        "sequences": sum(u.costs.sequences for u in updates),
        "tokens": sum(u.costs.tokens for u in updates),
        "service_bytes": sum(u.costs.service_bytes_up + u.costs.service_bytes_down for u in updates),
        "service_bytes_up": sum(u.costs.service_bytes_up for u in updates),
        "service_bytes_down": sum(u.costs.service_bytes_down for u in updates),
    }


def run_history(store: Store) -> list[RoundRecord]:
    """Every round of the run in the store, with its merged metrics and costs (details included)."""
    reporters = store.reporters()
    traffic = store.traffic()
    history = []
    for r in store.rounds():
        metrics = r.metrics if r.metrics is not None else round_metrics([u for _, u in store.updates(r.round)])
        up, down = traffic.get(r.round, (0, 0))
        history.append(
            RoundRecord(
                round=r.round,
                state=r.state,
                selected=r.selected,
                reporters=reporters.get(r.round, []),
                sigma_before=r.sigma_before,
                sigma_after=r.sigma_after,
                local_sigma=r.local_sigma,
                sigma_merged=r.sigma_merged,
                opened_at=r.opened_at,
                closed_at=r.closed_at,
                bytes_up=up,
                bytes_down=down,
                **metrics,
            )
        )
    return history


def client_rounds(store: Store) -> list[ClientRoundRecord]:
    """Every accepted update's costs and metrics, round by round in client-id order."""
    out = []
    for r in store.rounds():
        for cid, body_bytes, u in store.update_records(r.round):
            m, c = u.metrics, u.costs
            out.append(
                ClientRoundRecord(
                    round=r.round,
                    client_id=cid,
                    num_samples=u.num_samples,
                    fitness=u.fitness,
                    local_loss=m.local_loss,
                    local_accuracy=m.local_accuracy,
                    global_val_loss=m.global_val_loss,
                    global_val_accuracy=m.global_val_accuracy,
                    val_samples=m.val_samples,
                    queries=c.queries,
                    sequences=c.sequences,
                    tokens=c.tokens,
                    service_bytes_up=c.service_bytes_up,
                    service_bytes_down=c.service_bytes_down,
                    update_bytes=body_bytes,
                )
            )
    return out


def run_status(store: Store, config: RunConfig, state: str, round_: int, details: bool) -> RunStatus:
    """The run and its history; without `details`, no client ids, selections or validation metrics."""
    history = run_history(store)
    if not details:
        history = [r.model_copy(update=_HIDDEN) for r in history]
    return RunStatus(
        config=config,
        state=state,
        round=round_,
        clients=store.client_ids() if details else [],
        history=history,
        redacted=not details,
    )


def served_choice(store: Store) -> ServedChoice | None:
    """The best validated global prompt of the closed rounds against the baseline; None before any closed
    round was validated against it (clients from before `vs_baseline`)."""
    candidates, means = {}, {}
    for r in store.rounds():
        if r.state == "open" or not r.metrics or not r.metrics.get("vs_baseline"):
            continue
        mean = store.round_mean(r.round)
        if mean is not None:  # rounds of a run begun before means were kept cannot be served
            candidates[r.round] = ValidationComparison.model_validate(r.metrics["vs_baseline"])
            means[r.round] = mean
    if not candidates:
        return None
    best, choice = choose(candidates)
    if best is None:
        return choice
    return choice.model_copy(update={"mean": encode_tensor(means[best])})
