"""Uploading what was written: on flush/fsync of a dirty file, and later for whatever is still dirty.

A dirty entry is recorded in the cache state (durably) before its first byte is
written, so a failed upload, an unmount or a crash never loses it: the retry
loop, and the next mount, upload every dirty entry they find.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from ..backends import BackendPool, ObjectInfo
from ..cache import CacheContext, EntryState
from ..errors import StorageError
from ..urls import parse_url
from .workers import Workers

log = logging.getLogger(__name__)

RETRY_INTERVAL = 30.0


class WriteBack:
    def __init__(self, backends: BackendPool, cache: CacheContext, workers: Workers) -> None:
        self.backends, self.cache, self.workers = backends, cache, workers
        self.busy: set[str] = set()  # URLs with an open dirty handle: their flush uploads them

    async def mark_dirty(self, url: str) -> None:
        state = self.cache.state(url) or EntryState(url)
        if not state.dirty:
            state.dirty = True
            await self.workers.metadata(self.cache.save_state, state)

    async def upload(self, url: str, source: Path) -> ObjectInfo:
        """Upload `source` (the cache file, or /proc/self/fd/N of an open one) as `url`; clears dirty."""
        parsed = parse_url(url)
        backend = self.backends.get(parsed)
        info = await self.workers.transfer(backend.upload, source, parsed.key)
        await self.workers.metadata(self.cache.save_state, EntryState(url, info.etag, info.size))
        return info

    async def upload_pending(self) -> int:
        """Upload every dirty entry nobody has open; returns how many are still dirty."""
        remaining = 0
        for state in await self.workers.metadata(self.cache.dirty_entries):
            if state.url in self.busy:
                continue
            path = self.cache.path_for(state.url)
            if not path.exists():
                log.error("dirty entry for %s has no cache file; nothing to upload", state.url)
                await self.workers.metadata(self.cache.forget, state.url)
                continue
            try:
                await self.upload(state.url, path)
                log.info("uploaded pending changes to %s", state.url)
            except StorageError as exc:
                remaining += 1
                log.warning("upload of %s failed again (%s); will retry", state.url, exc)
        return remaining

    async def run(self, interval: float = RETRY_INTERVAL) -> None:
        """Retry dirty entries forever (started in the mount's nursery)."""
        while True:
            await self.upload_pending()
            await trio.sleep(interval)


def fd_path(fd: int) -> Path:
    # Uploading through the descriptor reads exactly the file the writer wrote, even if the
    # cache entry's name was replaced meanwhile.
    return Path(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else Path(f"/dev/fd/{fd}")
