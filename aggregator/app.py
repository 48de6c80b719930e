"""The aggregator's HTTP API (FastAPI): the endpoints of fedbpt_wire/federation.py over a Coordinator.

POST /v1/partitions/claim  a part K of N of a shared pool for a client instance (enroll key, like /v1/clients)
POST /v1/clients           register (enroll key as Bearer, where one is set) -> a per-client token
GET  /v1/round             the caller's task in the open round (client token)
POST /v1/round/update      the caller's local result for a round (client token)
GET  /v1/global            the global search distribution (client token; enroll key: no client means;
                           operator key: every client's mean under local-only)
GET  /v1/status            the run and its per-round history (client ids, selections and validation metrics
                           only with the operator key, where one is set)
GET  /v1/report/clients    every accepted update's costs and metrics (operator key, where one is set)
GET  /healthz

`create_app` assembles the coordinator, the routes (`_add_routes`) and the middleware; a domain error (errors.py)
is answered through statuses.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from fedbpt_wire.asgi import BodyLimit, body_paths, install_error_handlers
from fedbpt_wire.federation import (
    ClientRoundRecord,
    EnrollCodes,
    EnrollCodesRequest,
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
from fedbpt_wire.logs import warn_example_keys
from fedbpt_wire.schemas import ErrorBody

from .auth import Caller
from .callers import caller, client, reader
from .coordinator import MAX_CLIENTS, MAX_REGISTRATIONS_PER_MINUTE, Coordinator
from .errors import Refused
from .events import RunEvents, close_rounds_at_deadlines
from .gate import AuthGate
from .metering import TrafficMeter
from .statuses import http_answer
from .store import Store
from .strategies import strategy_class

log = logging.getLogger(__name__)

MAX_WAIT_S = 30.0  # longest a `GET /v1/round?wait=` may be held

_ERROR_TEXT = {
    401: "missing or wrong client token or enroll key",
    409: "refused by the run's state: round not open, client not selected, a different update already in",
    413: "request body over the limit",
    422: "invalid input; `detail` names the field",
}


def _errors(*codes: int) -> dict:
    """The rejections a route documents, in the `{"detail": str}` shape the handlers give them. 422 always:
    FastAPI would otherwise document its own list-of-errors shape, which this app never sends."""
    return {code: {"model": ErrorBody, "description": _ERROR_TEXT[code]} for code in (*codes, 422)}


def _actionable(task: RoundTask) -> bool:
    return task.state == "done" or (task.state == "open" and task.selected and not task.submitted)


def _add_routes(app: FastAPI, coordinator: Coordinator, events: RunEvents) -> None:
    @app.post("/v1/partitions/claim", response_model=PartitionAssignment, responses=_errors(401, 409, 413))
    def claim_partition(req: PartitionClaim, who: Caller = Depends(caller)):
        return coordinator.claim_partition(req, who)

    @app.post("/v1/enroll-codes", response_model=EnrollCodes, responses=_errors(401, 413, 422))
    def enroll_codes(req: EnrollCodesRequest, who: Caller = Depends(caller)):
        return EnrollCodes(codes=coordinator.mint_enroll_codes(req.count, who))

    @app.post("/v1/clients", response_model=RegisterResponse, responses=_errors(401, 413))
    def register(req: RegisterRequest, who: Caller = Depends(caller)):
        return coordinator.register(req, who)

    @app.get("/v1/round", response_model=RoundTask, responses=_errors(401))
    async def round_task(
        wait: float = Query(
            default=0.0,
            ge=0.0,
            le=MAX_WAIT_S,
            allow_inf_nan=False,
            description="long poll: hold the answer up to this many seconds until there is work "
            "for this client or the run's state changes",
        ),
        who: Caller = Depends(client),
    ):
        # A waiting client costs a request per change instead of one per poll interval: on the aggregator
        # link, polls of a client that waits for the others used to outweigh its update many times over.
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        change = events.next_change()
        task = await asyncio.to_thread(coordinator.task, who)
        seen = (task.round, task.state, task.selected, task.submitted)
        while not _actionable(task) and await events.wait_change(change, max(0.0, end - loop.time())):
            change = events.next_change()
            task = await asyncio.to_thread(coordinator.task, who)
            if (task.round, task.state, task.selected, task.submitted) != seen:
                break
        return task

    @app.post("/v1/round/update", response_model=UpdateResponse, responses=_errors(401, 409, 413))
    def update(req: UpdateRequest, who: Caller = Depends(client)):
        return coordinator.submit(who, req)

    @app.get("/v1/global", response_model=GlobalState, responses=_errors(401))
    def global_state(who: Caller = Depends(reader)):
        return coordinator.global_state(who)

    @app.get("/v1/status", response_model=RunStatus)
    def status(who: Caller = Depends(caller)):
        return coordinator.status(who)

    @app.get("/v1/report/clients", response_model=list[ClientRoundRecord], responses=_errors(401))
    def client_report(who: Caller = Depends(caller)):
        return coordinator.client_rounds(who)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "run_id": coordinator.config.run_id, "state": coordinator.state()}


async def refused(request: Request, exc: Refused):
    status, headers = http_answer(exc)
    return JSONResponse(status_code=status, content={"detail": exc.detail}, headers=headers or None)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    coordinator, events = app.state.coordinator, app.state.events
    events.bind(asyncio.get_running_loop())
    task = asyncio.create_task(close_rounds_at_deadlines(coordinator, events))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        coordinator.close()


def _warn_open_doors(enroll_key: str | None, operator_key: str | None) -> None:
    warn_example_keys(log, FEDBPT_ENROLL_KEY=enroll_key, FEDBPT_OPERATOR_KEY=operator_key)
    if enroll_key is None:
        log.warning(
            "enrollment is OPEN: anyone who reaches this port can register a new client id "
            "(set --enroll-key or FEDBPT_ENROLL_KEY)"
        )
    if operator_key is None:
        log.warning(
            "no operator key: /v1/status shows client ids and metrics to anyone "
            "(set --operator-key or FEDBPT_OPERATOR_KEY)"
        )


def create_app(
    config: RunConfig,
    db_path: str,
    *,
    enroll_key: str | None = None,
    operator_key: str | None = None,
    max_clients: int = MAX_CLIENTS,
    max_registrations_per_minute: int = MAX_REGISTRATIONS_PER_MINUTE,
    clock: Callable[[], float] = time.time,
    body_timeout: float | None = 60.0,
    docs: bool = False,
) -> FastAPI:
    """The aggregator app; a database that already holds a run resumes it (its config wins). `docs` serves /docs
    and /redoc, pages that load their scripts from a CDN (/openapi.json is served either way)."""
    events = RunEvents()
    coordinator = Coordinator(
        strategy_class(config).configure(config),
        Store(db_path),
        enroll_key=enroll_key,
        operator_key=operator_key,
        max_clients=max_clients,
        max_registrations_per_minute=max_registrations_per_minute,
        clock=clock,
        on_change=events.wake,
    )
    _warn_open_doors(enroll_key, operator_key)

    # No slash redirects: they echo the request's Host header into a Location.
    app = FastAPI(
        title="FedBPT aggregator",
        version="1",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.coordinator = coordinator
    app.state.events = events
    install_error_handlers(app)
    app.exception_handler(Refused)(refused)
    _add_routes(app, coordinator, events)

    # An update is about 5.4 bytes per dimension in base64 float32, plus up to 10k local sigmas.
    app.add_middleware(
        BodyLimit,
        max_bytes=1024 * 1024 + 16 * coordinator.config.intrinsic_dim,
        read_timeout=body_timeout,
        body_paths=body_paths(app),
    )
    app.add_middleware(TrafficMeter, coordinator=coordinator)  # it sees 413s too, of authenticated callers
    app.add_middleware(AuthGate, coordinator=coordinator)  # outermost: unauthenticated requests are not metered
    return app
