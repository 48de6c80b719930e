"""The FastAPI app of the inference service (contract: docs/design.md, section 3)."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import time
from typing import Any

import numpy as np
from anyio import to_thread
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedbpt_wire.asgi import BodyLimit, body_paths, install_error_handlers, send_error
from fedbpt_wire.bearer import bearer_token, header_authorization
from fedbpt_wire.metrics import label_cross_entropy
from fedbpt_wire.schemas import ErrorBody, ModelInfo, ScoreRequest, ScoreResponse, Usage
from fedbpt_wire.tensors import TensorDecodeError, decode_tensor, encode_tensor

from .auth import KeyRevoked, KeyStore, QuotaExceeded
from .engine import Engine, InputError, ModelFacts, ScoreBatch, ScoreResult
from .limits import Busy, FairScheduler, Limits, SliceBudget, TokenRate, plan_slices
from .metrics import CONTENT_TYPE, ServiceMetrics
from .projected import ProjectionCache

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 413, 422, 429, 503)}

# No vocabulary we know has a token over ~80 characters, so a text longer than this many characters
# per allowed token is over the token limit for sure: rejected before the tokenizer spends time and
# memory on a body-sized string.
_MAX_CHARS_PER_TOKEN = 128


def _check_strings(field: str, values: list[str], max_chars: int, what: str) -> None:
    for i, value in enumerate(values):
        if len(value) > max_chars:
            raise InputError(f"{field}[{i}]", f"is {len(value)} characters, longer than any {what} can be")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A JSON escape like "\ud800" decodes to a lone surrogate: not text any tokenizer accepts.
            raise InputError(f"{field}[{i}]", "holds a lone UTF-16 surrogate; it must be valid Unicode text") from None


def _check_population(field: str, n_pop: int, limits: Limits) -> None:
    if n_pop < 1:
        raise InputError(field, "P must be at least 1")
    if n_pop > limits.max_population:
        raise HTTPException(413, f"{field}: population P = {n_pop} over the limit of {limits.max_population}")


def _check_prompt_length(field: str, n_prompt: int, limits: Limits) -> None:
    if n_prompt > limits.max_prompt_length:
        raise InputError(field, f"prompt length L = {n_prompt} over the limit of {limits.max_prompt_length}")


def _dense_prompts(req: ScoreRequest, engine: Engine, limits: Limits) -> np.ndarray:
    assert req.prompts is not None, "called for the dense form only"
    shape = req.prompts.shape
    if len(shape) != 3:
        raise InputError("prompts.shape", f"must be [P, L, D], got {shape}")
    n_pop, n_prompt, dim = shape
    _check_population("prompts.shape", n_pop, limits)
    _check_prompt_length("prompts.shape", n_prompt, limits)
    if dim != engine.info.hidden_size:
        raise InputError("prompts.shape", f"D = {dim} does not match the model's hidden size {engine.info.hidden_size}")
    try:
        return decode_tensor(req.prompts, "prompts")
    except TensorDecodeError as exc:
        raise InputError("prompts", str(exc)) from None


def _projected_prompts(req: ScoreRequest, engine: Engine, limits: Limits, projections: ProjectionCache) -> np.ndarray:
    assert req.projected is not None, "called for the seed + z form only"
    z_tensor, spec = req.projected.z, req.projected.projection
    shape = z_tensor.shape
    if len(shape) != 2:
        raise InputError("projected.z.shape", f"must be [P, d], got {shape}")
    n_pop, dim = shape
    _check_population("projected.z.shape", n_pop, limits)
    _check_prompt_length("projected.projection.prompt_length", spec.prompt_length, limits)
    if dim < 1:
        raise InputError("projected.z.shape", "d must be at least 1")
    size = dim * spec.prompt_length * engine.info.hidden_size
    if size > limits.max_projection_values:
        raise InputError(
            "projected.z.shape",
            f"a projection of d = {dim} to L = {spec.prompt_length} x D = "
            f"{engine.info.hidden_size} has {size} values, over the limit of "
            f"{limits.max_projection_values}",
        )
    try:
        z = decode_tensor(z_tensor, "projected.z")
    except TensorDecodeError as exc:
        raise InputError("projected.z", str(exc)) from None
    return projections.expand(spec, z)


# Values of a projection matrix drawn per position charged: at the projection limit (d 910, L 128, D 576) a build
# took 1.5-2.2 s on 2 cores, where 141 positions scored in 0.26 s; 2**16 values a position charges ~1,000 for it.
PROJECTION_VALUES_PER_POSITION = 2**16


def _projection_build(req: ScoreRequest, engine: Engine, projections: ProjectionCache) -> int:
    """Positions charged for the projection a seed + z request makes the service draw (0: none, or cached)."""
    if req.projected is None or len(req.projected.z.shape) != 2:
        return 0
    spec, dim = req.projected.projection, req.projected.z.shape[1]
    if dim < 1 or projections.holds(spec, dim):
        return 0
    values = dim * spec.prompt_length * engine.info.hidden_size
    return -(-values // PROJECTION_VALUES_PER_POSITION)


def validate_request(
    req: ScoreRequest, engine: Engine, limits: Limits, projections: ProjectionCache
) -> tuple[ScoreBatch, np.ndarray | None]:
    """Shape, size, dtype and label checks as InputError (422) or HTTPException (413).

    Text layout errors (slot, length) come from the engine itself, which tokenizes once.
    """
    if (req.prompts is None) == (req.projected is None):
        raise InputError("prompts", "give exactly one of `prompts` ([P, L, D]) and `projected` (seed + z)")
    if len(req.texts) > limits.max_texts:
        raise HTTPException(413, f"texts: {len(req.texts)} texts over the limit of {limits.max_texts}")
    if len(req.label_words) > limits.max_label_words:
        raise HTTPException(
            413, f"label_words: {len(req.label_words)} words over the limit of {limits.max_label_words}"
        )
    if req.prompts is not None:
        prompts = _dense_prompts(req, engine, limits)
    else:
        prompts = _projected_prompts(req, engine, limits, projections)
    _check_strings(
        "texts", req.texts, limits.max_text_tokens * _MAX_CHARS_PER_TOKEN, f"text of {limits.max_text_tokens} tokens"
    )
    _check_strings("label_words", req.label_words, _MAX_CHARS_PER_TOKEN, "single token")
    engine.label_token_ids(req.label_words)
    labels = None
    if req.labels is not None:
        if len(req.labels) != len(req.texts):
            raise InputError("labels", f"{len(req.labels)} labels for {len(req.texts)} texts")
        bad = [i for i, y in enumerate(req.labels) if not 0 <= y < len(req.label_words)]
        if bad:
            raise InputError(f"labels[{bad[0]}]", f"{req.labels[bad[0]]} is not in 0..{len(req.label_words) - 1}")
        labels = np.asarray(req.labels)
    return ScoreBatch(prompts=prompts, texts=req.texts, label_words=req.label_words), labels


def _declared_shape(req: ScoreRequest) -> tuple[int, int] | None:
    """(P, L) as the request declares them, read without decoding anything; None where malformed (the full
    validation then names the field)."""
    try:
        if req.prompts is not None:
            n_pop, n_prompt, _ = req.prompts.shape
        elif req.projected is not None:
            n_pop, n_prompt = req.projected.z.shape[0], req.projected.projection.prompt_length
        else:
            return None
        return int(n_pop), int(n_prompt)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _over_budget(what: str, tokens: int, limits: Limits) -> HTTPException:
    return HTTPException(
        413,
        f"prompts: {what} {tokens} positions, over the request budget of "
        f"{limits.max_request_tokens} (GET /v1/model: max_request_tokens); send fewer candidates "
        "or texts per request",
    )


class _ClientGone(Exception):
    pass


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
            return await send_error(
                send,
                401,
                "missing or unknown API key (Authorization: Bearer <key>)",
                [(b"www-authenticate", b"Bearer")],
            )
        try:
            used, quota = self.keys.usage(key)
        except KeyError:  # revoked since `known`: the endpoint answers it
            used, quota = 0, None
        if quota is not None and used >= quota:
            self.metrics.requests.labels("/v1/score", "429").inc()
            return await send_error(send, 429, f"quota of {quota} queries used up for this key")
        return await self.app(scope, receive, send)


def projection_cache(engine: Engine) -> ProjectionCache:
    return ProjectionCache(
        engine.info.hidden_size,
        engine.info.embedding_std,
        token_embeddings=engine.token_embeddings,
        vocab_size=engine.info.vocab_size,
    )


def public_model_info(facts: ModelFacts, limits: Limits) -> ModelInfo:
    """GET /v1/model: the engine's facts about its model and the limits this service enforces."""
    return ModelInfo(
        **dataclasses.asdict(facts),
        max_prompt_length=limits.max_prompt_length,
        max_texts=limits.max_texts,
        max_population=limits.max_population,
        max_text_tokens=limits.max_text_tokens,
        max_projection_values=limits.max_projection_values,
        max_request_tokens=limits.max_request_tokens,
        max_request_seconds=limits.max_request_seconds,
    )


def create_app(
    engine: Engine,
    keys: KeyStore | None = None,
    limits: Limits | None = None,
    *,
    operator_key: str | None = None,
    metrics_public: bool | None = None,
    body_timeout: float | None = 60.0,
) -> FastAPI:
    """The service app. `/metrics` needs `operator_key` as Bearer token unless `metrics_public`; by default it
    is public only where no operator key is set."""
    keys = keys or KeyStore({})
    limits = limits or Limits()
    metrics = ServiceMetrics()
    scheduler = FairScheduler(limits.max_inflight_per_key, limits.max_queued_per_key)
    slice_budget = SliceBudget(limits)
    rate = TokenRate(limits.max_key_tokens_per_minute)
    projections = projection_cache(engine)
    public_metrics = operator_key is None if metrics_public is None else metrics_public
    published_info = public_model_info(engine.info, limits)
    app = FastAPI(
        title="FedBPT inference service",
        version="1",
        description="Label-word logits and losses for soft prompts; never weights, hidden states or gradients.",
        redirect_slashes=False,  # a slash redirect echoes the request's Host header into its Location
    )
    install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return JSONResponse(
            status_code=422, content={"detail": str(exc), "errors": [{"field": exc.field, "message": str(exc)}]}
        )

    def unauthorized(message: str) -> HTTPException:
        return HTTPException(401, message, {"WWW-Authenticate": "Bearer"})

    async def api_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str | None:
        key = creds.credentials if creds else None
        if not keys.known(key):
            raise unauthorized("missing or unknown API key (Authorization: Bearer <key>)")
        return key

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": engine.info.name}

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info() -> ModelInfo:
        return published_info

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
    async def score(
        req: ScoreRequest, request: Request, key: str | None = Depends(api_key)
    ) -> ScoreResponse | Response:
        t0 = time.perf_counter()
        deadline = time.monotonic() + limits.max_request_seconds
        who = key or ""  # an open service's callers share one queue
        try:
            async with scheduler.admit(who):
                # Charged first, whatever follows: a request that fails validation after the work of decoding
                # it has cost that work. Only the engine's own failure is refunded.
                try:
                    keys.reserve(key)
                except QuotaExceeded as exc:
                    raise HTTPException(429, str(exc)) from None
                except KeyRevoked as exc:
                    raise unauthorized(str(exc)) from None
                declared = _declared_shape(req)
                # Only shapes within every per-dimension limit: past one, validation names that dimension.
                if (
                    declared is not None
                    and 1 <= declared[0] <= limits.max_population
                    and 0 <= declared[1] <= limits.max_prompt_length
                    and len(req.texts) <= limits.max_texts
                ):
                    floor = declared[0] * len(req.texts) * (declared[1] + 1)
                    if floor > limits.max_request_tokens:
                        raise _over_budget("P x N x (L + 1) is at least", floor, limits)
                # Off the event loop: decoding a body-sized tensor would stall every other connection.
                build = _projection_build(req, engine, projections)
                # Drawing a new A takes longer than scoring a small request (2 s at the limits on 2 cores): it takes
                # an engine turn, so builds run one at a time and in turn with other keys' work, and it is charged
                # (one position per PROJECTION_VALUES_PER_POSITION values drawn).
                async with scheduler.turn(who) if build else contextlib.nullcontext():
                    batch, labels = await to_thread.run_sync(validate_request, req, engine, limits, projections)
                n_pop, n_prompt = batch.prompts.shape[:2]
                lengths = await to_thread.run_sync(engine.positions, batch.texts, n_prompt)
                cost = n_pop * sum(lengths) + build
                if cost > limits.max_request_tokens:
                    raise _over_budget("it takes", cost, limits)
                wait = rate.charge(who, cost)
                if wait is not None:
                    raise HTTPException(
                        429,
                        f"this key's {limits.max_key_tokens_per_minute} positions per minute "
                        f"are used up; retry in {wait:.0f} s",
                        {"Retry-After": str(int(wait) + 1)},
                    )
                try:
                    result = await _run_in_slices(request, batch, lengths, who, deadline)
                    if not np.isfinite(result.logits).all():
                        raise InputError(
                            "prompts",
                            "the model's logits are not finite for these prompts; "
                            "are their values far outside the embedding scale?",
                        )
                except (InputError, HTTPException, _ClientGone):
                    raise
                except Exception:
                    keys.refund(key)
                    log.exception("engine failed")
                    raise HTTPException(500, "the engine failed on this batch; see the service log") from None
        except Busy as exc:
            raise HTTPException(
                429, f"too many concurrent requests for this key ({exc}); retry later", {"Retry-After": "1"}
            ) from None
        except _ClientGone:
            log.info("client went away; its request stopped before finishing")
            return Response(status_code=499)
        loss = acc = None
        if labels is not None:
            loss_arr, acc_arr = label_cross_entropy(result.logits, labels)
            loss, acc = loss_arr.tolist(), acc_arr.tolist()
        metrics.sequences.inc(result.sequences)
        metrics.tokens.inc(result.tokens)
        metrics.key_queries.labels(keys.key_id(key) if key else "open").inc()
        metrics.engine_latency.observe(result.engine_ms / 1e3)
        metrics.latency.observe(time.perf_counter() - t0)
        return ScoreResponse(
            logits=encode_tensor(result.logits),
            loss=loss,
            accuracy=acc,
            usage=Usage(sequences=result.sequences, tokens=result.tokens, engine_ms=result.engine_ms),
        )

    async def _run_in_slices(
        request: Request, batch: ScoreBatch, lengths: list[int], who: str, deadline: float
    ) -> ScoreResult:
        """The request in blocks of at most `slice_budget.tokens` positions, one engine turn each: other keys'
        requests interleave with a long one, and a client gone or a deadline passed stops it at the next block."""
        n_pop = batch.prompts.shape[0]
        slices = plan_slices(n_pop, lengths, slice_budget.tokens)
        logits = np.empty((n_pop, len(batch.texts), len(batch.label_words)), np.float32)
        sequences = tokens = 0
        engine_ms = 0.0
        salt = keys.key_id(who) if who else ""
        for done, (cands, texts) in enumerate(slices):
            if done and await request.is_disconnected():
                raise _ClientGone()
            if done and time.monotonic() > deadline:
                raise HTTPException(
                    503,
                    f"the request ran past its {limits.max_request_seconds:g} s deadline after "
                    f"{done} of {len(slices)} slices (GET /v1/model: max_request_seconds); "
                    "send smaller requests",
                )
            part = ScoreBatch(batch.prompts[cands], batch.texts[texts], batch.label_words, cache_salt=salt)
            async with scheduler.turn(who):
                result = await to_thread.run_sync(engine.score, part)
            # Planned positions, as the budget counts them (the engine may run fewer, reusing keys and values).
            slice_budget.observe(len(range(n_pop)[cands]) * sum(lengths[texts]), result.engine_ms)
            logits[cands, texts] = result.logits
            sequences += result.sequences
            tokens += result.tokens
            engine_ms += result.engine_ms
        return ScoreResult(logits=logits, sequences=sequences, tokens=tokens, engine_ms=engine_ms)

    @app.get("/metrics")
    async def prometheus(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Response:
        if not public_metrics and not (
            operator_key and creds and hmac.compare_digest(creds.credentials.encode(), operator_key.encode())
        ):
            raise unauthorized(
                "/metrics takes the operator key (Authorization: Bearer <key>); "
                "the server's --metrics-public makes it public"
            )
        metrics.observe_prefix_cache(getattr(engine, "prefix_cache", None))
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_CountRequests, metrics=metrics)
    app.add_middleware(
        BodyLimit, max_bytes=limits.max_body_bytes, read_timeout=body_timeout, body_paths=body_paths(app)
    )
    app.add_middleware(_AuthGate, keys=keys, metrics=metrics)  # outermost: a stranger's body is never read
    return app
