"""The one place the trio loop hands blocking work (SDK calls, disk copies) to worker threads.

Metadata calls and transfers get separate limiters so a big upload never starves `ls`. Streaming uploads
(which wait for their writer) get their own, so that they can never hold up a download that writer waits for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


class Workers:
    def __init__(self, metadata_threads: int = 32, transfer_threads: int = 8, stream_threads: int = 4) -> None:
        self._metadata = trio.CapacityLimiter(metadata_threads)
        self._transfers = trio.CapacityLimiter(transfer_threads)
        self._streams = trio.CapacityLimiter(stream_threads)

    async def metadata(self, fn: Callable[..., T], *args: object) -> T:
        """A short request: HEAD, LIST, DELETE, small PUT."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._metadata)

    async def transfer(self, fn: Callable[..., T], *args: object) -> T:
        """A download or upload of object data."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._transfers)

    @property
    def stream_threads(self) -> int:
        return int(self._streams.total_tokens)

    async def stream(self, fn: Callable[..., T], *args: object) -> T:
        """An upload fed while its file is being written (at most `stream_threads` at once)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._streams)
