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
- every merge starts from the unpickled last-committed strategy, the same object a restarted
  aggregator would load, so a restarted run computes bit for bit what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedbpt_wire.bearer import bearer_token
from fedbpt_wire.federation import (
    ClientRoundRecord,
    GlobalState,
    PartitionAssignment,
    PartitionClaim,
    RegisterRequest,
    RegisterResponse,
    RoundRecord,
    RoundTask,
    RunConfig,
    RunStatus,
    UpdateRequest,
    UpdateResponse,
)
from fedbpt_wire.schemas import Tensor
from fedbpt_wire.served import ServedChoice, ValidationComparison, choose, pool
from fedbpt_wire.tensors import encode_tensor

from .store import RoundRow, Store
from .strategies import Strategy, make_strategy, merge_round, strategy_class
from .validation import Invalid, check_parts, check_samples, check_update

log = logging.getLogger(__name__)

MAX_CLIENTS = 10_000  # default cap on registered identities: every one is sampled, and a round waits for it
# New ids registered per minute at most, whoever asks: one enroll key registered 10,000 ids in 46 s (issue 24), after
# which every honest registration got 409; at this rate filling 10,000 takes over an hour.
MAX_REGISTRATIONS_PER_MINUTE = 120
MAX_CODES_PER_REQUEST = 1000


class Rejected(Exception):
    """A request the run cannot accept; `detail` names the field or the rule at fault."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


@dataclass(frozen=True)
class Caller:
    """What an Authorization header proves: a role (None: nothing), and for a client its id and token digest."""

    role: Literal["operator", "enroll", "code", "client"] | None = None  # "code": an unused one-time enroll code
    client_id: str | None = None
    token_digest: str | None = None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _valid(check: Callable, *args) -> None:
    try:
        check(*args)
    except Invalid as exc:
        raise Rejected(422, str(exc)) from None


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
        self.enroll_key = enroll_key
        self.operator_key = operator_key
        self.max_clients = max_clients
        self.max_registrations_per_minute = max_registrations_per_minute
        self._registered_at: deque[float] = deque()  # when the last minute's new ids registered
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
        self._blob = store.load_strategy()
        self.strategy: Strategy | None = pickle.loads(self._blob) if self._blob else None
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

    @staticmethod
    def _matches(authorization: str | None, secret: str | None) -> bool:
        if secret is None or not authorization:
            return False
        token = bearer_token(authorization)
        if token is None:
            return False
        return hmac.compare_digest(token.encode(), secret.encode())

    def is_operator(self, authorization: str | None) -> bool:
        return self._matches(authorization, self.operator_key)

    def caller(self, authorization: str | None) -> Caller:
        """What the header proves, without reading any body."""
        if self.is_operator(authorization):
            return Caller("operator")
        if self._matches(authorization, self.enroll_key):
            return Caller("enroll")
        token = bearer_token(authorization)
        if token is None:
            return Caller()
        digest = _sha256(token)
        client_id = self.store.client_by_token(digest)
        if client_id is not None:
            return Caller("client", client_id, digest)
        return Caller("code", None, digest) if self.store.enroll_code_unused(digest) else Caller()

    def sees_details(self, caller: Caller) -> bool:
        """Client ids, selections and metrics: for the operator, or for anyone where no operator key is set."""
        return self.operator_key is None or caller.role == "operator"

    def _check_enroll_key(self, caller: Caller) -> None:
        if caller.role == "code":
            return  # checked unused; the registration that takes it consumes it
        if (self.enroll_key is not None or self._codes_only) and caller.role not in ("enroll", "operator"):
            raise Rejected(401, "Authorization: wrong enroll key or enroll code")

    @property
    def _codes_only(self) -> bool:
        """No enroll key but codes minted: enrollment is closed to whoever holds no code."""
        return self.enroll_key is None and self.store.has_enroll_codes()

    def mint_enroll_codes(self, count: int, caller: Caller) -> list[str]:
        """`count` one-time enroll codes, each registering one new client id; the operator's alone."""
        if caller.role != "operator":
            raise Rejected(401, "Authorization: enroll codes take the operator key")
        if not 1 <= count <= MAX_CODES_PER_REQUEST:
            raise Rejected(422, f"count: between 1 and {MAX_CODES_PER_REQUEST}, got {count}")
        codes = [secrets.token_urlsafe(24) for _ in range(count)]
        with self._lock:
            self.store.add_enroll_codes([_sha256(c) for c in codes], self.clock())
        log.info("minted %d enroll codes", count)
        return codes

    def _holds_token(self, caller: Caller) -> bool:
        """Under the lock: the client's token is still its current one (a re-registration retires the old)."""
        return (
            caller.role == "client"
            and caller.token_digest is not None
            and self.store.client_by_token(caller.token_digest) == caller.client_id
        )

    def _client(self, caller: Caller) -> str:
        if caller.client_id is None or not self._holds_token(caller):
            raise Rejected(401, "Authorization: unknown client token (register at POST /v1/clients)")
        return caller.client_id

    # ------------------------------------------------------------------ endpoints

    def register(self, req: RegisterRequest, caller: Caller) -> RegisterResponse:
        """A new id needs the enroll key (where one is set); an existing id only its own current token or the
        operator key, so holding the enroll key, which every client does, cannot take over another's id."""
        _valid(check_samples, req.num_samples)
        token = secrets.token_urlsafe(32)
        with self._lock:
            known = self.store.client_ids()
            if req.client_id in known:
                own = caller.client_id == req.client_id and self._holds_token(caller)
                if not (own or caller.role == "operator"):
                    raise Rejected(
                        409,
                        f"client_id: {req.client_id!r} is already registered; re-register it with "
                        "its own token (Authorization: Bearer <token>) or choose another id",
                    )
            else:
                self._check_enroll_key(caller)
                if len(known) >= self.max_clients:
                    raise Rejected(
                        409,
                        f"client_id: registration is closed, the run has its {self.max_clients} "
                        "clients (aggregator --max-clients)",
                    )
                self._charge_registration(caller)
            now = self.clock()
            with self.store.transaction():
                if caller.role == "code" and req.client_id not in known:
                    if caller.token_digest is None or not self.store.enroll_code_unused(caller.token_digest):
                        raise Rejected(401, "Authorization: this enroll code was used already")
                    self.store.use_enroll_code(caller.token_digest, req.client_id)
                # Re-registering replaces the token: a restarted client rejoins, its old token stops working.
                self.store.upsert_client(req.client_id, _sha256(token), req.num_samples, now)
            self._tick(now)
        return RegisterResponse(client_id=req.client_id, token=token, config=self.config)

    def _charge_registration(self, caller: Caller) -> None:
        """New ids at most `max_registrations_per_minute` a minute (the operator's own are not counted)."""
        if caller.role == "operator":
            return
        now = self.clock()
        window = self._registered_at
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= self.max_registrations_per_minute:
            wait = 60.0 - (now - window[0])
            raise Rejected(
                429,
                f"client_id: {self.max_registrations_per_minute} new ids registered in the last minute (aggregator "
                f"--max-registrations-per-minute); retry in {wait:.0f} s",
                retry_after=wait,
            )
        window.append(now)

    def claim_partition(self, req: PartitionClaim, caller: Caller) -> PartitionAssignment:
        self._check_enroll_key(caller)
        _valid(check_parts, req.parts)
        with self._lock:
            claims = self.store.partition_claims()
            stored = {parts for _, parts in claims.values()}
            if stored and stored != {req.parts}:
                # Clients with different N would compute different splits of the pool: overlapping parts.
                raise Rejected(422, f"parts: {req.parts} differs from the {stored.pop()} parts already claimed")
            if req.instance in claims:
                return PartitionAssignment(index=claims[req.instance][0], parts=req.parts)
            taken = {idx for idx, _ in claims.values()}
            index = next((i for i in range(req.parts) if i not in taken), None)
            if index is None:
                raise Rejected(409, f"parts: all {req.parts} parts are claimed")
            self.store.add_partition_claim(req.instance, index, req.parts)
        log.info("partition %d/%d claimed by %s", index, req.parts, req.instance)
        return PartitionAssignment(index=index, parts=req.parts)

    def task(self, caller: Caller) -> RoundTask:
        with self._lock:
            client_id = self._client(caller)
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
            t = strategy.task(client_id)
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
            client_id = self._client(caller)
            _valid(check_update, req, self.config)
            if req.round >= self.config.rounds:
                raise Rejected(409, f"round: {req.round} is past the run's last round ({self.config.rounds - 1})")
            body = req.model_dump_json()
            digest = _sha256(body)
            prior = self.store.update_digest(req.round, client_id)
            if prior is not None:
                if prior == digest:
                    return UpdateResponse(accepted=True, duplicate=True, round=req.round)
                raise Rejected(
                    409, f"round: client {client_id} already submitted a different update for round {req.round}"
                )
            now = self.clock()
            self._tick(now)  # a deadline that has passed closes the round before a late update lands
            o = self._open
            if o is None or req.round != o.round:
                open_ = f"round {o.round} is open" if o is not None else f"the run is {self.state()}"
                raise Rejected(409, f"round: {req.round} is not the open round ({open_})")
            if client_id not in o.selected:
                raise Rejected(409, f"round: client {client_id} is not selected for round {o.round}")
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
                reader = self._client(caller)
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
                served=None if self.rules.own_prompts else self._served(),
            )

    def _served(self) -> ServedChoice | None:
        """The best validated global prompt of the closed rounds against the baseline; None before any closed
        round was validated against it (clients from before `vs_baseline`)."""
        candidates, means = {}, {}
        for r in self.store.rounds():
            if r.state == "open" or not r.metrics or not r.metrics.get("vs_baseline"):
                continue
            mean = self.store.round_mean(r.round)
            if mean is not None:  # rounds of a run begun before means were kept cannot be served
                candidates[r.round] = ValidationComparison.model_validate(r.metrics["vs_baseline"])
                means[r.round] = mean
        if not candidates:
            return None
        best, choice = choose(candidates)
        if best is None:
            return choice
        return choice.model_copy(update={"mean": encode_tensor(means[best])})

    def status(self, caller: Caller) -> RunStatus:
        with self._lock:
            details = self.sees_details(caller)
            history = run_history(self.store)
            if not details:
                hidden: dict[str, object] = {
                    "selected": [],
                    "reporters": [],
                    "val_accuracy": None,
                    "val_loss": None,
                    "clipped": None,
                    "vs_baseline": None,
                }
                history = [r.model_copy(update=hidden) for r in history]
            return RunStatus(
                config=self.config,
                state=self.state(),
                round=self.current_round(),
                clients=self.store.client_ids() if details else [],
                history=history,
                redacted=not details,
            )

    def client_rounds(self, caller: Caller) -> list[ClientRoundRecord]:
        """Every accepted update's costs and metrics: per-client detail, so the operator's (as status details)."""
        if not self.sees_details(caller):
            raise Rejected(401, "Authorization: per-client records take the operator key")
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
        blob = pickle.dumps(strategy)
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
            candidate = pickle.loads(blob)
            try:
                result, clipped = merge_round(candidate, updates, self.config)
                if clipped:
                    log.warning("round %d: %d of %d updates bounded before the merge", o.round, clipped, len(updates))
            except Exception:
                # Recorded failed rather than retried on every check: the run goes on from the state before.
                log.exception("round %d: the merge failed; the round is recorded as failed", o.round)
            else:
                strategy, blob = candidate, pickle.dumps(candidate)
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
