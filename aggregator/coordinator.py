"""The run's round lifecycle: partition claims, registration, client sampling, updates, deadlines and merges.

Every change happens under one lock and is committed to the store before it is answered, and the
in-memory state only follows a commit, so memory never runs ahead of what a restart would load. Only
writes (registration, updates) and `tick` (the deadline task's) change the run; reads never do. Every
change calls `on_change` (cheap, under the lock), which wakes whatever waits on the run. The strategy's
class decides which clients a round samples, what each starts from and whether it perturbs;
validation.py what an update may hold.

Decisions:
- a round opens when `min_clients` have registered (round 0) or when the previous round closes;
- it merges as soon as every selected client has reported, or at its deadline with at least
  `min_updates` reports; with fewer it is recorded `failed` and the next round opens from the same
  global state. Failed rounds count toward `config.rounds`, so a run with dead clients still ends
  after rounds x round_timeout_s;
- a partition claim keeps its index for good (keyed by the client's instance name, stored), so a client
  restarted in the same container takes its own part again; a new instance takes the lowest free one;
- a restart gives the open round a fresh timeout: clients could not reach a stopped aggregator;
- every merge starts from the last-committed strategy state, loaded as a restarted aggregator would
  load it (strategy_state.py), so a restarted run computes bit for bit what an uninterrupted one would.

Who may do what is auth.py's; what the run reports of itself, history.py's. A refusal is a domain error
(errors.py); statuses.py turns it into HTTP.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import numpy as np

from fedbpt_wire.federation import (
    ClientRoundRecord,
    GlobalState,
    PartitionAssignment,
    PartitionClaim,
    RegisterRequest,
    RegisterResponse,
    RoundTask,
    RunConfig,
    RunStatus,
    UpdateRequest,
    UpdateResponse,
)
from fedbpt_wire.schemas import Tensor
from fedbpt_wire.tensors import encode_tensor

from .auth import Auth, Caller, RegistrationPace, sha256
from .errors import Conflict, InvalidRequest, Unauthorized
from .history import client_rounds, round_metrics, run_status, served_choice
from .store import RoundRow, Store
from .strategies import Strategy, make_strategy, merge_round, strategy_class
from .strategy_state import dump_strategy, load_strategy
from .validation import Invalid, check_parts, check_samples, check_update

log = logging.getLogger(__name__)

MAX_CLIENTS = 10_000  # default cap on registered identities: every one is sampled, and a round waits for it
# New ids registered per minute at most, whoever asks: one enroll key registered 10,000 ids in 46 s (issue 24), after
# which every honest registration got 409; at this rate filling 10,000 takes over an hour.
MAX_REGISTRATIONS_PER_MINUTE = 120


def _valid(check: Callable, *args) -> None:
    try:
        check(*args)
    except Invalid as exc:
        raise InvalidRequest(str(exc)) from None


class Coordinator:
    """The one object every endpoint goes through; the store is its memory across restarts."""

    def __init__(
        self,
        config: RunConfig,
        store: Store,
        *,
        enroll_key: str | None = None,
        operator_key: str | None = None,
        max_clients: int = MAX_CLIENTS,
        max_registrations_per_minute: int = MAX_REGISTRATIONS_PER_MINUTE,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] = lambda: None,
    ):
        self._lock = threading.RLock()
        self.store = store
        self.clock = clock
        self.on_change = on_change
        self.auth = Auth(store, enroll_key, operator_key)
        self.max_clients = max_clients
        self._pace = RegistrationPace(max_registrations_per_minute)
        stored = store.load_config()
        if stored is None:
            store.save_config(config)
        elif stored != config:
            changed = sorted(k for k in RunConfig.model_fields if getattr(stored, k) != getattr(config, k))
            log.warning(
                "resuming the run stored in the database; its config wins over the given one (differs in %s)",
                ", ".join(changed),
            )
        self.config = stored or config
        self.rules = strategy_class(self.config)
        self.strategy: Strategy | None = None
        self._blob: bytes | None = None
        blob = store.load_strategy()
        if blob is not None:
            self.strategy = load_strategy(blob, self.config)
            self._blob = dump_strategy(self.strategy, self.config)  # as arrays, where an older version pickled it
        self._started = len(store.rounds())
        self._open = store.open_round()
        if self._open is not None:
            self._open.deadline_at = clock() + self.config.round_timeout_s
            store.set_deadline(self._open.round, self._open.deadline_at)
            log.info(
                "resumed round %d with %d accepted updates", self._open.round, store.update_count(self._open.round)
            )
        self._accounting = self._accounting_round()

    # ------------------------------------------------------------------ state

    def state(self) -> str:
        if self._open is not None:
            return "running"
        return "done" if self._started >= self.config.rounds else "waiting"

    def current_round(self) -> int:
        """The open round; before round 0 opens 0, after the last round `config.rounds`."""
        return self._open.round if self._open is not None else self._started

    def _accounting_round(self) -> int:
        return min(self.current_round(), self.config.rounds - 1)

    def accounting_round(self) -> int:
        """The round a request arriving now is charged to: the open one, round 0 before it opens, the
        last round after the run ends. Read without the lock so metering never waits on a merge."""
        return self._accounting

    def add_traffic(self, round_: int, bytes_up: int, bytes_down: int) -> None:
        self.store.add_traffic(round_, bytes_up, bytes_down)

    def close(self) -> None:
        with self._lock:  # waits for a deadline check still running in its thread
            self.store.close()

    def mint_enroll_codes(self, count: int, caller: Caller) -> list[str]:
        with self._lock:
            codes = self.auth.mint_codes(count, caller, self.clock())
        log.info("minted %d enroll codes", count)
        return codes

    # ------------------------------------------------------------------ endpoints

    def register(self, req: RegisterRequest, caller: Caller) -> RegisterResponse:
        """A new id needs the enroll key (where one is set); an existing id only its own current token or the
        operator key, so holding the enroll key, which every client does, cannot take over another's id."""
        _valid(check_samples, req.num_samples)
        token = secrets.token_urlsafe(32)
        with self._lock:
            known = self.store.client_ids()
            if req.client_id in known:
                own = caller.client_id == req.client_id and self.auth.holds_token(caller)
                if not (own or caller.role == "operator"):
                    raise Conflict(
                        f"client_id: {req.client_id!r} is already registered; re-register it with "
                        "its own token (Authorization: Bearer <token>) or choose another id",
                    )
            else:
                self.auth.check_enroll(caller)
                if len(known) >= self.max_clients:
                    raise Conflict(
                        f"client_id: registration is closed, the run has its {self.max_clients} "
                        "clients (aggregator --max-clients)",
                    )
                self._pace.charge(caller, self.clock())
            now = self.clock()
            with self.store.transaction():
                if caller.role == "code" and req.client_id not in known:
                    self.auth.take_code(caller, req.client_id)
                # Re-registering replaces the token: a restarted client rejoins, its old token stops working.
                self.store.upsert_client(req.client_id, sha256(token), req.num_samples, now)
            self._tick(now)
        return RegisterResponse(client_id=req.client_id, token=token, config=self.config)

    def claim_partition(self, req: PartitionClaim, caller: Caller) -> PartitionAssignment:
        self.auth.check_enroll(caller)
        _valid(check_parts, req.parts)
        with self._lock:
            claims = self.store.partition_claims()
            stored = {parts for _, parts in claims.values()}
            if stored and stored != {req.parts}:
                # Clients with different N would compute different splits of the pool: overlapping parts.
                raise InvalidRequest(f"parts: {req.parts} differs from the {stored.pop()} parts already claimed")
            if req.instance in claims:
                return PartitionAssignment(index=claims[req.instance][0], parts=req.parts)
            taken = {idx for idx, _ in claims.values()}
            index = next((i for i in range(req.parts) if i not in taken), None)
            if index is None:
                raise Conflict(f"parts: all {req.parts} parts are claimed")
            self.store.add_partition_claim(req.instance, index, req.parts)
        log.info("partition %d/%d claimed by %s", index, req.parts, req.instance)
        return PartitionAssignment(index=index, parts=req.parts)

    def task(self, caller: Caller) -> RoundTask:
        with self._lock:
            client_id = self.auth.client(caller)
            now = self.clock()
            base = {"run_id": self.config.run_id, "round": self.current_round()}
            o = self._open
            if o is None:
                return RoundTask(**base, state=self.state(), selected=False)
            deadline_s = max(0.0, o.deadline_at - now)
            if client_id not in o.selected:
                return RoundTask(**base, state="open", selected=False, deadline_s=deadline_s)
            strategy = self.strategy
            assert strategy is not None, "round 0 opens only once the strategy exists"
            t = strategy.local_start(client_id)
            return RoundTask(
                **base,
                state="open",
                selected=True,
                submitted=self.store.update_digest(o.round, client_id) is not None,
                mean=encode_tensor(t.mean),
                sigma=t.sigma,
                local_sigma=t.local_sigma,
                deadline_s=deadline_s,
                perturb=strategy.clients_perturb(self.config),
            )

    def submit(self, caller: Caller, req: UpdateRequest) -> UpdateResponse:
        with self._lock:
            client_id = self.auth.client(caller)
            _valid(check_update, req, self.config)
            if req.round >= self.config.rounds:
                raise Conflict(f"round: {req.round} is past the run's last round ({self.config.rounds - 1})")
            body = req.model_dump_json()
            digest = sha256(body)
            prior = self.store.update_digest(req.round, client_id)
            if prior is not None:
                if prior == digest:
                    return UpdateResponse(accepted=True, duplicate=True, round=req.round)
                raise Conflict(f"round: client {client_id} already submitted a different update for round {req.round}")
            now = self.clock()
            self._tick(now)  # a deadline that has passed closes the round before a late update lands
            o = self._open
            if o is None or req.round != o.round:
                open_ = f"round {o.round} is open" if o is not None else f"the run is {self.state()}"
                raise Conflict(f"round: {req.round} is not the open round ({open_})")
            if client_id not in o.selected:
                raise Conflict(f"round: client {client_id} is not selected for round {o.round}")
            self.store.insert_update(o.round, client_id, digest, body, now)
            self.on_change()
            self._tick(now)
            return UpdateResponse(accepted=True, round=req.round)

    def global_state(self, caller: Caller) -> GlobalState:
        with self._lock:
            # The operator reads every client's mean; the enroll key, which every client holds, only the
            # global distribution (the final prompt is what a run is for); a client its own mean besides.
            if caller.role == "operator":
                reader = None
            elif caller.role == "enroll":
                reader = ""
            else:
                reader = self.auth.client(caller)
            base = {"run_id": self.config.run_id, "round": self.current_round(), "state": self.state()}
            if self.strategy is None:
                start = np.zeros(self.config.intrinsic_dim)
                local: dict[str, Tensor] | None = {} if self.rules.own_prompts else None
                return GlobalState(**base, mean=encode_tensor(start), sigma=self.config.sigma0, client_means=local)
            own = self.strategy.client_means()
            if own is not None and reader is not None:
                # local-only: a client's prompt is learnt from its data alone; other clients see only their own.
                own = {cid: m for cid, m in own.items() if cid == reader}
            return GlobalState(
                **base,
                mean=encode_tensor(self.strategy.mean),
                sigma=self.strategy.sigma,
                client_means=None if own is None else {cid: encode_tensor(m) for cid, m in own.items()},
                served=None if self.rules.own_prompts else served_choice(self.store),
            )

    def status(self, caller: Caller) -> RunStatus:
        with self._lock:
            details = self.auth.sees_details(caller)
            return run_status(self.store, self.config, self.state(), self.current_round(), details)

    def client_rounds(self, caller: Caller) -> list[ClientRoundRecord]:
        """Every accepted update's costs and metrics: per-client detail, so the operator's (as status details)."""
        if not self.auth.sees_details(caller):
            raise Unauthorized("Authorization: per-client records take the operator key")
        with self._lock:
            return client_rounds(self.store)

    def tick(self) -> None:
        """Enforce the open round's deadline (and open round 0 once enough clients registered)."""
        with self._lock:
            self._tick(self.clock())

    def next_deadline(self) -> float | None:
        """When the open round closes at the latest, by `clock`; None while no round is open."""
        o = self._open
        return o.deadline_at if o is not None else None

    # ------------------------------------------------------------------ lifecycle

    def _tick(self, now: float) -> None:
        o = self._open
        if o is None:
            if self._started == 0 and len(self.store.client_ids()) >= self.config.min_clients:
                self._open_first(now)
            return
        reported = self.store.update_count(o.round)
        if reported == len(o.selected):
            self._close(o, now, merge=True)
        elif now >= o.deadline_at:
            self._close(o, now, merge=reported >= self.config.min_updates)

    def _sample(self, round_: int, closing: RoundRow | None = None) -> list[str]:
        return self.rules.select(self.config, self.store.client_ids(), round_, self._silent(closing))

    def _silent(self, closing: RoundRow | None) -> frozenset[str]:
        """Ids that did not report in the last round they were selected for (`closing` counts as closed): a
        round samples them only where the others are too few, so ids that never report cannot crowd out the
        clients that do."""
        reporters = self.store.reporters()
        reported_last: dict[str, bool] = {}
        for r in self.store.rounds():
            if r.state == "open" and (closing is None or r.round != closing.round):
                continue
            got = set(reporters.get(r.round, ()))
            for cid in r.selected:
                reported_last[cid] = cid in got
        return frozenset(cid for cid, reported in reported_last.items() if not reported)

    def _round_row(self, round_: int, selected: list[str], now: float, strategy: Strategy) -> RoundRow:
        return RoundRow(
            round=round_,
            state="open",
            selected=selected,
            opened_at=now,
            deadline_at=now + self.config.round_timeout_s,
            sigma_before=strategy.sigma,
            local_sigma=strategy.local_sigma,
        )

    def _open_first(self, now: float) -> None:
        selected = self._sample(0)
        strategy = make_strategy(self.config, popsize=len(selected))
        blob = dump_strategy(strategy, self.config)
        row = self._round_row(0, selected, now, strategy)
        with self.store.transaction():
            self.store.save_strategy(blob)
            self.store.insert_round(row)
            self.store.save_round_mean(0, strategy.mean)
        self._blob, self.strategy = blob, strategy
        self._set_open(row, started=1)
        log.info("round 0 open: %s", ", ".join(selected))

    def _close(self, o: RoundRow, now: float, merge: bool) -> None:
        updates = self.store.updates(o.round)
        strategy, blob, result = self.strategy, self._blob, None
        assert strategy is not None and blob is not None, "a round is open only once the strategy exists"
        clipped = 0
        if merge:
            candidate = load_strategy(blob, self.config)
            try:
                newcomers = self.store.newcomers(o.round, self.config.newcomer_rounds)
                result, clipped = merge_round(candidate, updates, self.config, newcomers)
                if clipped:
                    log.warning("round %d: %d of %d updates bounded before the merge", o.round, clipped, len(updates))
            except Exception:
                # Recorded failed rather than retried on every check: the run goes on from the state before.
                log.exception("round %d: the merge failed; the round is recorded as failed", o.round)
            else:
                strategy, blob = candidate, dump_strategy(candidate, self.config)
        merged = result is not None
        nxt = o.round + 1
        row = self._round_row(nxt, self._sample(nxt, o), now, strategy) if nxt < self.config.rounds else None
        with self.store.transaction():
            self.store.close_round(
                o.round,
                "merged" if merged else "failed",
                now,
                round_metrics([u for _, u in updates]) | {"clipped": clipped},
                result.sigma_merged if result else None,
                result.sigma_after if result else None,
            )
            if merged:
                self.store.save_strategy(blob)
            if row is not None:
                self.store.insert_round(row)
                self.store.save_round_mean(nxt, strategy.mean)
        self._blob, self.strategy = blob, strategy
        self._set_open(row, started=nxt + 1 if row is not None else nxt)
        if result is not None:
            log.info(
                "round %d merged %d/%d updates: sigma %.4g -> %.4g",
                o.round,
                len(updates),
                len(o.selected),
                o.sigma_before,
                result.sigma_after,
            )
        elif not merge:
            log.warning(
                "round %d failed at its deadline: %d/%d updates, %d needed",
                o.round,
                len(updates),
                len(o.selected),
                self.config.min_updates,
            )

    def _set_open(self, row: RoundRow | None, started: int) -> None:
        self._open = row
        self._started = started
        self._accounting = self._accounting_round()
        self.on_change()
