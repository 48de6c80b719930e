"""Request and batch limits of the service (published in `GET /v1/model`), and fair scheduling across keys."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field


def limit(default, help: str):
    """A field of Limits: its default and the help of its `fedbpt serve` flag (inference_service/server.py derives
    the flag from the field). A None default's meaning is said in `help`; any other default is appended to it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """Every limit of the service, each written once: its default and its help. `fedbpt serve` has one flag per
    field, and `GET /v1/model` publishes those of them that ModelInfo names."""

    max_prompt_length: int = limit(128, "soft tokens L of a prompt at most")
    max_population: int = limit(64, "candidates P of one request at most; more get 413")
    max_texts: int = limit(256, "texts N of one request at most; more get 413")
    max_text_tokens: int = limit(256, "tokens of one text at most")
    max_label_words: int = limit(256, "label words C of one request at most; more get 413")
    max_body_bytes: int = limit(32 * 2**20, "bytes of a request body at most; a larger one gets 413 unread")
    # 2**26 float32 values = 256 MiB, enough for d = 500 to 50 x 1024 (RoBERTa-large as in the paper) and a cap on
    # what one request can make us build.
    max_projection_values: int = limit(
        2**26, "d x L x D of the largest projection a seed + z request may ask the service to build"
    )
    max_batch_tokens: int | None = limit(
        None,
        "padded positions per forward pass; bounds activation memory (default 8192 on CPU, 65536 on a GPU)",
    )
    max_inflight_per_key: int = limit(
        2,
        "score requests of one key handled at once; more wait their turn in a FIFO per key, and the engine is "
        "handed to keys round-robin, so a flooding key cannot starve the others",
    )
    max_queued_per_key: int = limit(
        64, "requests of one key that may wait beyond --max-inflight-per-key; further ones get 429 with Retry-After"
    )
    # The published per-dimension maxima multiply to ~6M positions, half an hour on two CPU cores; this budget is
    # ~1-2 minutes there. A request is run in slices of max_batch_tokens positions, one engine turn each, so other
    # keys' requests interleave with a long one.
    max_request_tokens: int = limit(
        2**17,
        "work budget of one request: P x the sum over its texts of the sequence length (specials, soft prompt and "
        "text tokens); a request over it gets 413 before any work",
    )
    max_request_seconds: float = limit(
        600.0, "a request still running after this long stops at its next slice with 503"
    )
    max_key_tokens_per_minute: int | None = limit(
        None, "positions one key may have scored per minute; beyond, 429 with Retry-After (default: no cap)"
    )
    # On two CPU cores a slice of 8,192 positions took ~5 s, and another key's one-text request waited two of them.
    max_slice_seconds: float = limit(
        0.5,
        "seconds one engine turn should take at most, by the engine's measured speed: a long request is cut into "
        "turns this short, so another key's request waits for one of them",
    )
    max_prefix_cache_bytes: int | None = limit(
        None,
        "memory for the keys and values of text heads kept across requests, so that a text sent again with a "
        "prompt after it costs only the prompt and the cue (torch engine, causal LMs; per API key, least recently "
        "used out first; default 256 MiB on CPU, 4 GiB on a GPU; 0: off)",
    )

    @property
    def slice_tokens(self) -> int:
        return self.max_batch_tokens or 8192


class SliceBudget:
    """Positions per engine turn: `limits.slice_tokens` at most, fewer where the engine's measured speed (positions
    per second, a moving average over its recent turns) would make a turn take longer than `max_slice_seconds`.
    So a small request from another key waits for one short turn, not for a slice sized for a GPU."""

    FLOOR = 256  # below this, per-turn overheads dominate: a turn is at least this many positions

    def __init__(self, limits: Limits):
        self.ceiling = limits.slice_tokens
        self.seconds = limits.max_slice_seconds
        self.rate: float | None = None  # positions per second

    def observe(self, positions: int, engine_ms: float) -> None:
        if positions <= 0 or engine_ms <= 0:
            return
        rate = positions / (engine_ms / 1e3)
        self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate

    @property
    def tokens(self) -> int:
        if self.rate is None or self.seconds <= 0:
            return self.ceiling
        return int(min(self.ceiling, max(self.FLOOR, self.rate * self.seconds)))


def plan_slices(n_pop: int, lengths: list[int], budget: int) -> list[tuple[slice, slice]]:
    """(candidates, texts) blocks of a P x N request, each of at most `budget` positions where it can be.

    Whole candidates are kept together (a candidate's texts share its soft prompt, which the engine reuses);
    only a candidate whose texts alone pass the budget is split by texts. A single text over the budget is
    a block of its own.
    """
    n = len(lengths)
    per_candidate = sum(lengths)
    if per_candidate <= budget:
        k = max(1, budget // max(per_candidate, 1))
        return [(slice(p, min(p + k, n_pop)), slice(0, n)) for p in range(0, n_pop, k)]
    chunks, start, acc = [], 0, 0
    for i, length in enumerate(lengths):
        if acc and acc + length > budget:
            chunks.append(slice(start, i))
            start, acc = i, 0
        acc += length
    chunks.append(slice(start, n))
    return [(slice(p, p + 1), c) for p in range(n_pop) for c in chunks]


class TokenRate:
    """Positions scored per key in the current minute; refuses a request that would pass `per_minute`."""

    def __init__(self, per_minute: int | None, clock=None):
        self.per_minute = per_minute
        self.clock = clock or time.monotonic
        self._window: dict[str, tuple[float, int]] = {}

    def charge(self, key: str, tokens: int) -> float | None:
        """None if `tokens` fit this key's minute (and they are counted), else seconds until the window resets."""
        if self.per_minute is None:
            return None
        now = self.clock()
        start, used = self._window.get(key, (now, 0))
        if now - start >= 60.0:
            start, used = now, 0
        if used + tokens > self.per_minute:
            return max(0.0, 60.0 - (now - start))
        self._window[key] = (start, used + tokens)
        return None


class Busy(Exception):
    """A key has more requests waiting than its queue holds."""


class FairScheduler:
    """Per-key admission and a round-robin turn at the engine, so one key's flood cannot starve others.

    Admission: at most `max_inflight` requests of a key are admitted at once (validating, waiting for
    the engine, running); further ones wait in that key's FIFO, and beyond `max_queued` waiting ones a
    request is refused with Busy (429). Waiting rather than refusing keeps clients that share a key
    and do not retry 429 (the demo's) working, while the queue bound keeps one key from holding
    unbounded request bodies in memory.

    Turns: one admitted request at a time runs on the engine (which serialises forwards anyway), and
    turns go round-robin over the keys with a request waiting, FIFO within a key. A request thus
    waits for at most the running one plus one per other active key, however many another key sends.

    All state lives on the event loop thread; no locks.
    """

    def __init__(self, max_inflight: int, max_queued: int):
        if max_inflight < 1 or max_queued < 0:
            raise ValueError("max_inflight must be at least 1 and max_queued at least 0")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self._admitted: dict[str, int] = {}
        self._gates: dict[str, deque[asyncio.Future]] = {}
        self._engine_busy = False
        self._turns: dict[str, deque[asyncio.Future]] = {}
        self._ring: deque[str] = deque()  # keys with a request waiting for a turn, in serving order

    @contextlib.asynccontextmanager
    async def admit(self, key: str):
        if self._admitted.get(key, 0) < self.max_inflight:
            self._admitted[key] = self._admitted.get(key, 0) + 1
        else:
            gate = self._gates.setdefault(key, deque())
            if len(gate) >= self.max_queued:
                raise Busy(f"{self.max_inflight} requests of this key in flight and {len(gate)} waiting")
            await self._wait(gate, abandon=lambda: self._drop_gate(key), release=lambda: self._leave(key))
        try:
            yield
        finally:
            self._leave(key)

    def _leave(self, key: str) -> None:
        gate = self._gates.get(key)
        if gate is not None:
            handed = _hand_over(gate)  # the slot passes straight to the next waiter
            self._drop_gate(key)
            if handed:
                return
        self._admitted[key] -= 1
        if not self._admitted[key]:
            del self._admitted[key]

    def _drop_gate(self, key: str) -> None:
        if key in self._gates and not self._gates[key]:
            del self._gates[key]

    @contextlib.asynccontextmanager
    async def turn(self, key: str):
        if not self._engine_busy:
            self._engine_busy = True
        else:
            queue = self._turns.get(key)
            if queue is None:
                queue = self._turns[key] = deque()
                self._ring.append(key)
            await self._wait(queue, abandon=lambda: self._drop_turn(key), release=self._next_turn)
        try:
            yield
        finally:
            self._next_turn()

    def _next_turn(self) -> None:
        while self._ring:
            key = self._ring.popleft()
            queue = self._turns[key]
            handed = _hand_over(queue)
            if queue:
                self._ring.append(key)
            else:
                del self._turns[key]
            if handed:
                return
        self._engine_busy = False

    def _drop_turn(self, key: str) -> None:
        if key in self._turns and not self._turns[key]:
            del self._turns[key]
            self._ring.remove(key)

    @staticmethod
    async def _wait(queue: deque[asyncio.Future], abandon, release) -> None:
        """Wait in `queue` until handed the slot. A waiter cancelled (client gone, server stopping)
        before its turn leaves the queue; one cancelled just after being handed the slot passes it on."""
        waiter = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                release()
            else:
                with contextlib.suppress(ValueError):  # already skipped over by a hand-over
                    queue.remove(waiter)
                abandon()
            raise


def _hand_over(queue: deque[asyncio.Future]) -> bool:
    """Wake the first waiter still waiting; cancelled ones are skipped (their task cleans up after itself)."""
    while queue:
        waiter = queue.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False
