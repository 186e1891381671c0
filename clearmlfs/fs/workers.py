"""The one place the trio loop hands blocking work (SDK calls, disk copies) to worker threads, and the one place
that bounds how long a filesystem operation waits for them.

Metadata calls and transfers get separate limiters so a big upload never starves `ls`. Streaming uploads
(which wait for their writer) get their own, so that they can never hold up a download that writer waits for.

A FUSE request cannot be abandoned by its caller (it sleeps uninterruptibly until we answer), so a stalled
server must never hold one for long. A metadata call has a budget: past it the caller gets TimedOut and the
thread is left to end on its own (its requests have timeouts, and `retry` stops at the thread's deadline).
A transfer may take as long as it keeps moving: `Watch` is told of each byte sent, and the caller gives up when
nothing moved for a whole budget.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from ..backends.base import deadline
from ..config import DEFAULT_TIMEOUTS, Timeouts
from ..errors import TimedOut

T = TypeVar("T")


def _within(seconds: float | None, fn: Callable[..., T], *args: object) -> T:
    with deadline(seconds):
        return fn(*args)


class Watch:
    """When a transfer last moved (`tick`, from any thread), so that a caller waits for a stall, not a size."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def tick(self, *_: object) -> None:
        self.last = time.monotonic()  # one float store: safe from the SDK's threads without a lock


class Workers:
    def __init__(
        self, metadata_threads: int = 32, transfer_threads: int = 8, stream_threads: int = 4,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self._metadata = trio.CapacityLimiter(metadata_threads)
        self._transfers = trio.CapacityLimiter(transfer_threads)
        self._streams = trio.CapacityLimiter(stream_threads)
        self._disk = trio.CapacityLimiter(metadata_threads)
        self.timeouts = timeouts

    async def disk(self, fn: Callable[..., T], *args: object) -> T:
        """A call on a cache file (open, pin, truncate, close): off the loop, which a slow disk must not stall,
        and never abandoned, so that a descriptor it opens always reaches its owner."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._disk)

    async def metadata(self, fn: Callable[..., T], *args: object, budget: float | None = None) -> T:
        """A short request (HEAD, LIST, DELETE, small PUT) or a local file operation: TimedOut after `budget`
        seconds (default: the operation budget), waiting for a thread included."""
        seconds = budget or self.timeouts.operation
        with trio.move_on_after(seconds):
            call = functools.partial(_within, seconds, fn, *args)
            return await trio.to_thread.run_sync(call, limiter=self._metadata, abandon_on_cancel=True)
        raise TimedOut(f"no answer from the server within {seconds:g} s")

    async def transfer(self, fn: Callable[..., T], *args: object, retry_for: float | None = None) -> T:
        """A download or upload of object data, or a read of a direct-access file: as long as it takes (each
        request is bounded by its timeouts); with `retry_for`, no retry is started after that many seconds."""
        call = functools.partial(_within, retry_for, fn, *args)
        return await trio.to_thread.run_sync(call, limiter=self._transfers)

    async def watched(self, done: trio.Event, watch: Watch) -> None:
        """Wait until `done` is set, unless `watch` sees nothing move for a whole budget: then TimedOut, and
        the work goes on (it is the caller's to have made it safe to leave running)."""
        budget = self.timeouts.operation
        while not done.is_set():
            with trio.move_on_after(budget - (time.monotonic() - watch.last)):
                await done.wait()
            if not done.is_set() and time.monotonic() - watch.last >= budget:
                raise TimedOut(f"nothing sent to the server for {budget:g} s")

    @property
    def stream_threads(self) -> int:
        return int(self._streams.total_tokens)

    async def stream(self, fn: Callable[..., T], *args: object) -> T:
        """An upload fed while its file is being written (at most `stream_threads` at once)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._streams)
