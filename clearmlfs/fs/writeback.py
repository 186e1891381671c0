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
        self.pending: set[str] = set()  # URLs whose local content is not on the server yet
        self._locks: dict[str, trio.Lock] = {}  # one upload of a URL at a time

    async def load(self) -> None:
        """Learn what earlier mounts left dirty (called once at start)."""
        self.pending |= {s.url for s in await self.workers.metadata(self.cache.dirty_entries)}

    async def mark_dirty(self, url: str) -> None:
        self.pending.add(url)

        def bump() -> None:
            state = self.cache.state(url) or EntryState(url)
            state.dirty, state.version = True, state.version + 1
            self.cache.save_state(state)

        await self.workers.metadata(bump)

    def _lock(self, url: str) -> trio.Lock:
        return self._locks.setdefault(url, trio.Lock())

    async def upload(self, url: str, source: Path) -> ObjectInfo:
        """Upload `source` (the cache file, or /proc/self/fd/N of an open one) as `url`."""
        async with self._lock(url):
            return await self._upload_locked(url, source)

    async def _upload_locked(self, url: str, source: Path) -> ObjectInfo:
        parsed = parse_url(url)
        backend = self.backends.get(parsed)
        before = await self.workers.metadata(self.cache.state, url)
        info = await self.workers.transfer(backend.upload, source, parsed.key)
        after = await self.workers.metadata(self.cache.state, url)
        # Dirtied again while uploading (another writer): stays dirty for that writer's upload.
        if (after.version if after else 0) == (before.version if before else 0):
            clean = EntryState(url, info.etag, info.size, version=after.version if after else 0)
            await self.workers.metadata(self.cache.save_state, clean)
            self.pending.discard(url)
        return info

    async def upload_pending(self) -> int:
        """Upload every dirty entry nobody has open; returns how many are still dirty."""
        remaining = 0
        for state in await self.workers.metadata(self.cache.dirty_entries):
            async with self._lock(state.url):
                if state.url in self.busy:
                    continue  # an open writer's flush uploads it
                try:
                    await self._retry_one(state.url)
                except StorageError as exc:
                    remaining += 1
                    log.warning("upload of %s failed again (%s); will retry", state.url, exc)
        return remaining

    async def _retry_one(self, url: str) -> None:
        state = await self.workers.metadata(self.cache.state, url)
        if state is None or not state.dirty:  # uploaded meanwhile by a writer's flush
            self.pending.discard(url)
            return
        path = self.cache.path_for(url)
        if not path.exists():
            log.error("dirty entry for %s has no cache file; nothing to upload", url)
            self.pending.discard(url)
            await self.workers.metadata(self.cache.forget, url)
            return
        await self._upload_locked(url, path)
        log.info("uploaded pending changes to %s", url)

    async def run(self, interval: float = RETRY_INTERVAL) -> None:
        """Retry dirty entries forever (started in the mount's nursery)."""
        while True:
            await self.upload_pending()
            await trio.sleep(interval)


def fd_path(fd: int) -> Path:
    # Uploading through the descriptor reads exactly the file the writer wrote, even if the
    # cache entry's name was replaced meanwhile.
    return Path(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else Path(f"/dev/fd/{fd}")
