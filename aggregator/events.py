"""What waits on the run, woken when it changes instead of polling it.

The coordinator commits in worker threads and calls `RunEvents.wake` after every change; long polls and the
deadline task wait on the event loop for the next change, or for the open round's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

RETRY_S = 1.0  # after a deadline check failed (the database, say), before trying again


class RunEvents:
    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._change = asyncio.Event()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def wake(self) -> None:
        """From any thread: every waiter looks again. After the run changed, or after a logical clock jumped."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    def next_change(self) -> asyncio.Event:
        """Set at the next wake; take it before reading the state, so a change in between is not missed."""
        return self._change

    async def wait_change(self, change: asyncio.Event, timeout: float | None) -> bool:
        """Whether `change` came within `timeout` seconds (None: no limit)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(change.wait(), timeout)
            return True
        return False


async def close_rounds_at_deadlines(coordinator, events: RunEvents) -> None:
    """Closes the open round at its deadline even when no client calls in, so a silent client cannot stall a
    run: one check per change or deadline, sleeping until whichever comes first."""
    while True:
        change = events.next_change()
        try:
            await asyncio.to_thread(coordinator.tick)
        except Exception:
            log.exception("deadline check failed; retrying")
            await asyncio.sleep(RETRY_S)
            continue
        due = coordinator.next_deadline()
        await events.wait_change(change, None if due is None else max(0.0, due - coordinator.clock()))
