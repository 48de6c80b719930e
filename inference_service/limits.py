"""Request and batch limits of the service (published in `GET /v1/model`), and fair scheduling across keys."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_prompt_length: int = 128  # L
    max_population: int = 64  # P
    max_texts: int = 256  # N
    max_text_tokens: int = 256  # tokens of one text
    max_label_words: int = 256  # C
    max_body_bytes: int = 32 * 2**20
    # d x L x D of a seed + z request's projection matrix: 2**26 float32 values = 256 MiB, enough for
    # d = 500 to 50 x 1024 (RoBERTa-large as in the paper) and a cap on what one request can make us build.
    max_projection_values: int = 2**26
    # Padded positions per forward, bounding activation memory; None = 8192 on CPU, 65536 on a GPU.
    max_batch_tokens: int | None = None
    max_inflight_per_key: int = 2  # score requests of one key past its gate (see FairScheduler)
    max_queued_per_key: int = 64  # requests of one key waiting at its gate; beyond them, 429


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
