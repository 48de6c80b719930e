"""What `POST /v1/score` does between a parsed request and its response, with no HTTP in it: admission per key,
the quota, validation, the work budget, the engine turns a request is sliced into, the refund when the engine
fails, and the per-key cache salt. The app (app.py) maps the errors raised here to statuses."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
from anyio import to_thread

from fedbpt_wire.metrics import label_cross_entropy
from fedbpt_wire.schemas import ScoreRequest, ScoreResponse, Usage
from fedbpt_wire.tensors import TensorDecodeError, decode_tensor, encode_tensor

from .auth import KeyRevoked, KeyStore, QuotaExceeded
from .engine import Engine, InputError, ScoreBatch, ScoreResult
from .limits import Busy, FairScheduler, Limits, SliceBudget, TokenRate, plan_slices
from .metrics import ServiceMetrics
from .projected import ProjectionCache

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request the service does not score; the subclass says why, `retry_after` (seconds) when to try again."""

    def __init__(self, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class TooLarge(Refused):
    """Over a size limit or the work budget."""


class TooMany(Refused):
    """The key's quota or rate is spent, or its queue is full."""


class Unauthorized(Refused):
    """The key was revoked while the request waited."""


class TimedOut(Refused):
    """Past `max_request_seconds`."""


class EngineFailed(Refused):
    """The engine raised on a batch that passed validation; the query is refunded."""


class ClientGone(Exception):
    """The client disconnected; the request stopped at a slice boundary."""


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
        raise TooLarge(f"{field}: population P = {n_pop} over the limit of {limits.max_population}")


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
    """Shape, size, dtype and label checks as InputError or TooLarge.

    Text layout errors (slot, length) come from the engine itself, which tokenizes once.
    """
    if (req.prompts is None) == (req.projected is None):
        raise InputError("prompts", "give exactly one of `prompts` ([P, L, D]) and `projected` (seed + z)")
    if len(req.texts) > limits.max_texts:
        raise TooLarge(f"texts: {len(req.texts)} texts over the limit of {limits.max_texts}")
    if len(req.label_words) > limits.max_label_words:
        raise TooLarge(f"label_words: {len(req.label_words)} words over the limit of {limits.max_label_words}")
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


def _over_budget(what: str, tokens: int, limits: Limits) -> TooLarge:
    return TooLarge(
        f"prompts: {what} {tokens} positions, over the request budget of "
        f"{limits.max_request_tokens} (GET /v1/model: max_request_tokens); send fewer candidates "
        "or texts per request",
    )


def projection_cache(engine: Engine) -> ProjectionCache:
    return ProjectionCache(
        engine.info.hidden_size,
        engine.info.embedding_std,
        token_embeddings=engine.token_embeddings,
        vocab_size=engine.info.vocab_size,
    )


class Scorer:
    """Scores requests against one engine, sharing it fairly between keys (FairScheduler), each request within
    the work budget and sliced into engine turns (SliceBudget), and counting queries against quotas."""

    def __init__(self, engine: Engine, keys: KeyStore, limits: Limits, metrics: ServiceMetrics | None = None):
        self.engine = engine
        self.keys = keys
        self.limits = limits
        self.metrics = metrics or ServiceMetrics()
        self.scheduler = FairScheduler(limits.max_inflight_per_key, limits.max_queued_per_key)
        self.slice_budget = SliceBudget(limits)
        self.rate = TokenRate(limits.max_key_tokens_per_minute)
        self.projections = projection_cache(engine)

    async def score(self, req: ScoreRequest, key: str | None, gone: Callable[[], Awaitable[bool]]) -> ScoreResponse:
        """The response to `req` from `key` (None on an open service); `gone` tells whether the client left."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.limits.max_request_seconds
        who = key or ""  # an open service's callers share one queue
        try:
            async with self.scheduler.admit(who):
                # Charged first, whatever follows: a request that fails validation after the work of decoding
                # it has cost that work. Only the engine's own failure is refunded.
                self._reserve(key)
                self._check_declared_work(req)
                batch, labels, lengths = await self._admit_work(req, who)
                result = await self._run_or_refund(key, batch, lengths, deadline, gone)
        except Busy as exc:
            raise TooMany(f"too many concurrent requests for this key ({exc}); retry later", retry_after=1) from None
        return self._respond(key, result, labels, t0)

    def _reserve(self, key: str | None) -> None:
        try:
            self.keys.reserve(key)
        except QuotaExceeded as exc:
            raise TooMany(str(exc)) from None
        except KeyRevoked as exc:
            raise Unauthorized(str(exc)) from None

    def _check_declared_work(self, req: ScoreRequest) -> None:
        """TooLarge for a request whose declared shape alone passes the work budget, before anything is decoded.
        Only shapes within every per-dimension limit: past one, validation names that dimension."""
        declared, limits = _declared_shape(req), self.limits
        if (
            declared is not None
            and 1 <= declared[0] <= limits.max_population
            and 0 <= declared[1] <= limits.max_prompt_length
            and len(req.texts) <= limits.max_texts
        ):
            floor = declared[0] * len(req.texts) * (declared[1] + 1)
            if floor > limits.max_request_tokens:
                raise _over_budget("P x N x (L + 1) is at least", floor, limits)

    async def _admit_work(self, req: ScoreRequest, who: str) -> tuple[ScoreBatch, np.ndarray | None, list[int]]:
        """The validated batch, its labels and its texts' sequence lengths, once its cost fits the request budget
        and the key's rate (which it is charged to)."""
        engine, limits = self.engine, self.limits
        build = _projection_build(req, engine, self.projections)
        # Drawing a new A takes longer than scoring a small request (2 s at the limits on 2 cores): it takes an
        # engine turn, so builds run one at a time and in turn with other keys' work, and it is charged (one
        # position per PROJECTION_VALUES_PER_POSITION values drawn). Off the event loop: decoding a body-sized
        # tensor would stall every other connection.
        async with self.scheduler.turn(who) if build else contextlib.nullcontext():
            batch, labels = await to_thread.run_sync(validate_request, req, engine, limits, self.projections)
        n_pop, n_prompt = batch.prompts.shape[:2]
        lengths = await to_thread.run_sync(engine.positions, batch.texts, n_prompt)
        cost = n_pop * sum(lengths) + build
        if cost > limits.max_request_tokens:
            raise _over_budget("it takes", cost, limits)
        wait = self.rate.charge(who, cost)
        if wait is not None:
            raise TooMany(
                f"this key's {limits.max_key_tokens_per_minute} positions per minute are used up; "
                f"retry in {wait:.0f} s",
                retry_after=int(wait) + 1,
            )
        return batch, labels, lengths

    async def _run_or_refund(
        self,
        key: str | None,
        batch: ScoreBatch,
        lengths: list[int],
        deadline: float,
        gone: Callable[[], Awaitable[bool]],
    ) -> ScoreResult:
        try:
            result = await self._run_in_slices(batch, lengths, key or "", deadline, gone)
            if not np.isfinite(result.logits).all():
                raise InputError(
                    "prompts",
                    "the model's logits are not finite for these prompts; "
                    "are their values far outside the embedding scale?",
                )
        except (InputError, Refused, ClientGone):
            raise
        except Exception:
            self.keys.refund(key)
            log.exception("engine failed")
            raise EngineFailed("the engine failed on this batch; see the service log") from None
        return result

    async def _run_in_slices(
        self, batch: ScoreBatch, lengths: list[int], who: str, deadline: float, gone: Callable[[], Awaitable[bool]]
    ) -> ScoreResult:
        """The request in blocks of at most `slice_budget.tokens` positions, one engine turn each: other keys'
        requests interleave with a long one, and a client gone or a deadline passed stops it at the next block."""
        n_pop = batch.prompts.shape[0]
        slices = plan_slices(n_pop, lengths, self.slice_budget.tokens)
        logits = np.empty((n_pop, len(batch.texts), len(batch.label_words)), np.float32)
        sequences = tokens = 0
        engine_ms = 0.0
        salt = self.keys.key_id(who) if who else ""
        for done, (cands, texts) in enumerate(slices):
            if done and await gone():
                raise ClientGone()
            if done and time.monotonic() > deadline:
                raise TimedOut(
                    f"the request ran past its {self.limits.max_request_seconds:g} s deadline after "
                    f"{done} of {len(slices)} slices (GET /v1/model: max_request_seconds); "
                    "send smaller requests"
                )
            part = ScoreBatch(batch.prompts[cands], batch.texts[texts], batch.label_words, cache_salt=salt)
            async with self.scheduler.turn(who):
                result = await to_thread.run_sync(self.engine.score, part)
            # Planned positions, as the budget counts them (the engine may run fewer, reusing keys and values).
            self.slice_budget.observe(len(range(n_pop)[cands]) * sum(lengths[texts]), result.engine_ms)
            logits[cands, texts] = result.logits
            sequences += result.sequences
            tokens += result.tokens
            engine_ms += result.engine_ms
        return ScoreResult(logits=logits, sequences=sequences, tokens=tokens, engine_ms=engine_ms)

    def _respond(self, key: str | None, result: ScoreResult, labels: np.ndarray | None, t0: float) -> ScoreResponse:
        loss = acc = None
        if labels is not None:
            loss_arr, acc_arr = label_cross_entropy(result.logits, labels)
            loss, acc = loss_arr.tolist(), acc_arr.tolist()
        metrics = self.metrics
        metrics.sequences.inc(result.sequences)
        metrics.tokens.inc(result.tokens)
        metrics.key_queries.labels(self.keys.key_id(key) if key else "open").inc()
        metrics.engine_latency.observe(result.engine_ms / 1e3)
        metrics.latency.observe(time.perf_counter() - t0)
        return ScoreResponse(
            logits=encode_tensor(result.logits),
            loss=loss,
            accuracy=acc,
            usage=Usage(sequences=result.sequences, tokens=result.tokens, engine_ms=result.engine_ms),
        )
