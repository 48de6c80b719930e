"""The FastAPI app of the inference service (contract: docs/design.md, section 3): its routes, their auth, the
middleware around them, and the mapping of scoring's errors to statuses. What a score request does is
scoring.py's; `create_app` only assembles."""

from __future__ import annotations

import dataclasses
import hmac
import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.responses import JSONResponse, Response
from fastapi.security.base import SecurityBase

from fedbpt_wire.asgi import BodyLimit, body_paths, install_error_handlers, send_error
from fedbpt_wire.bearer import bearer_token, header_authorization
from fedbpt_wire.schemas import ErrorBody, ModelInfo, ScoreRequest, ScoreResponse

from .auth import KeyStore
from .engine import Engine, InputError, ModelFacts
from .limits import Limits
from .metrics import CONTENT_TYPE, ServiceMetrics
from .scoring import ClientGone, EngineFailed, Refused, Scorer, TimedOut, TooLarge, TooMany, Unauthorized

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 413, 422, 429, 503)}
_STATUS: dict[type[Refused], int] = {TooLarge: 413, TooMany: 429, Unauthorized: 401, TimedOut: 503, EngineFailed: 500}
_UNKNOWN_KEY = "missing or unknown API key (Authorization: Bearer <key>)"


@dataclasses.dataclass(frozen=True)
class Service:
    """What the routes share: one per app, on `app.state.service`."""

    engine: Engine
    keys: KeyStore
    scorer: Scorer
    model_info: ModelInfo
    operator_key: str | None
    public_metrics: bool

    @property
    def metrics(self) -> ServiceMetrics:
        return self.scorer.metrics


def service(request: Request) -> Service:
    return request.app.state.service


class BearerToken(SecurityBase):
    """The request's Bearer token, read as the pre-body gate reads it (fedbpt_wire.bearer); OpenAPI documents it
    as HTTP bearer auth."""

    def __init__(self) -> None:
        self.model = HTTPBearerModel()
        self.scheme_name = "HTTPBearer"

    async def __call__(self, request: Request) -> str | None:
        return bearer_token(header_authorization(request.scope["headers"]))


bearer = BearerToken()


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, {"WWW-Authenticate": "Bearer"})


async def api_key(token: str | None = Depends(bearer), svc: Service = Depends(service)) -> str | None:
    if not svc.keys.known(token):
        raise unauthorized(_UNKNOWN_KEY)
    return token


router = APIRouter()


@router.get("/healthz")
async def healthz(svc: Service = Depends(service)) -> dict:
    return {"status": "ok", "model": svc.engine.info.name}


@router.get("/v1/model", response_model=ModelInfo)
async def model_info(svc: Service = Depends(service)) -> ModelInfo:
    return svc.model_info


@router.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
async def score(
    req: ScoreRequest, request: Request, key: str | None = Depends(api_key), svc: Service = Depends(service)
) -> ScoreResponse:
    return await svc.scorer.score(req, key, request.is_disconnected)


@router.get("/metrics")
async def prometheus(token: str | None = Depends(bearer), svc: Service = Depends(service)) -> Response:
    operator_key = svc.operator_key
    if not svc.public_metrics and not (
        operator_key and token and hmac.compare_digest(token.encode(), operator_key.encode())
    ):
        raise unauthorized(
            "/metrics takes the operator key (Authorization: Bearer <key>); "
            "the server's --metrics-public makes it public"
        )
    svc.metrics.observe_prefix_cache(getattr(svc.engine, "prefix_cache", None))
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)


async def _input_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputError)
    return JSONResponse(
        status_code=422, content={"detail": str(exc), "errors": [{"field": exc.field, "message": str(exc)}]}
    )


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(status_code=_STATUS[type(exc)], content={"detail": exc.detail}, headers=headers or None)


async def _client_gone(request: Request, exc: Exception) -> Response:
    log.info("client went away; its request stopped before finishing")
    return Response(status_code=499)


class _CountRequests:
    """Requests by route and status. Plain ASGI, not Starlette's BaseHTTPMiddleware: behind that, a route's
    `request.is_disconnected()` never saw its client go, so a long request ran on for nobody."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def noted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            # Unmatched paths share one label: a label per path a scanner tries would grow without bound.
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status[0] if status else 500)).inc()


class _AuthGate:
    """401 for /v1/score from the Authorization header alone, before the body is read or parsed (FastAPI reads
    a body before it resolves a route's dependencies); 429 likewise for a key whose quota is spent."""

    def __init__(self, app, keys: KeyStore, metrics: ServiceMetrics):
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/score" or self.keys.open:
            return await self.app(scope, receive, send)
        key = bearer_token(header_authorization(scope["headers"]))
        if key is None or not self.keys.known(key):
            self.metrics.requests.labels("/v1/score", "401").inc()
            return await send_error(send, 401, _UNKNOWN_KEY, [(b"www-authenticate", b"Bearer")])
        try:
            used, quota = self.keys.usage(key)
        except KeyError:  # revoked since `known`: the endpoint answers it
            used, quota = 0, None
        if quota is not None and used >= quota:
            self.metrics.requests.labels("/v1/score", "429").inc()
            return await send_error(send, 429, f"quota of {quota} queries used up for this key")
        return await self.app(scope, receive, send)


def published_limits(limits: Limits) -> dict[str, Any]:
    """The limits GET /v1/model publishes: those ModelInfo has a field for."""
    return {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits) if f.name in ModelInfo.model_fields}


def public_model_info(facts: ModelFacts, limits: Limits) -> ModelInfo:
    """GET /v1/model: the engine's facts about its model and the limits this service enforces."""
    return ModelInfo(**dataclasses.asdict(facts), **published_limits(limits))


def _describe_published_limits(app: FastAPI, limits: Limits) -> None:
    """The OpenAPI schema of ModelInfo, its published limits described by their help in Limits (where it is
    written once). Built now, and cached on the app as FastAPI caches it."""
    properties = app.openapi()["components"]["schemas"]["ModelInfo"]["properties"]
    for f in dataclasses.fields(limits):
        if f.name in properties:
            properties[f.name]["description"] = f.metadata["help"]


def create_app(
    engine: Engine,
    keys: KeyStore | None = None,
    limits: Limits | None = None,
    *,
    operator_key: str | None = None,
    metrics_public: bool | None = None,
    body_timeout: float | None = 60.0,
    docs: bool = False,
) -> FastAPI:
    """The service app. `/metrics` needs `operator_key` as Bearer token unless `metrics_public`; by default it
    is public only where no operator key is set. `docs` serves /docs and /redoc, pages that load their scripts from
    a CDN (/openapi.json is served either way)."""
    keys = keys or KeyStore({})
    limits = limits or Limits()
    scorer = Scorer(engine, keys, limits, ServiceMetrics())
    app = FastAPI(
        title="FedBPT inference service",
        version="1",
        description="Label-word logits and losses for soft prompts; never weights, hidden states or gradients.",
        redirect_slashes=False,  # a slash redirect echoes the request's Host header into its Location
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    public_metrics = operator_key is None if metrics_public is None else metrics_public
    info = public_model_info(engine.info, limits)
    app.state.service = Service(engine, keys, scorer, info, operator_key, public_metrics)
    install_error_handlers(app)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(ClientGone, _client_gone)
    app.include_router(router)
    _describe_published_limits(app, limits)
    app.add_middleware(_CountRequests, metrics=scorer.metrics)
    app.add_middleware(
        BodyLimit, max_bytes=limits.max_body_bytes, read_timeout=body_timeout, body_paths=body_paths(router)
    )
    app.add_middleware(_AuthGate, keys=keys, metrics=scorer.metrics)  # outermost: a stranger's body is never read
    return app
