"""Streaming downloads: an object is fetched range by range into a sparse cache file while it is read.

`open()` returns at once; a read waits only for the parts it covers. Parts are
fetched on demand, in parallel, with read-ahead while the reads are sequential,
and a read far away (the tail of a zip, a safetensors header) asks for its own
part first. Every reader of an object shares one `Download`. When every part is
present the file is renamed into the managed cache: the same complete, reusable
entry a whole-object fetch would have made. A download nobody reads any more is
abandoned and its partial file removed, so a partial file is never taken for a
complete one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from ..backends import Backend, ObjectInfo
from ..cache import PARTIAL_SUFFIX, CacheContext, EntryState
from .workers import Workers

log = logging.getLogger(__name__)

MISSING, FETCHING, PRESENT = 0, 1, 2


@dataclass(frozen=True)
class StreamSettings:
    part_size: int = 8 * 1024 * 1024
    concurrency: int = 8  # parts in flight per object
    readahead_parts: int = 8  # parts fetched ahead of a sequential reader


class Download:
    def __init__(
        self, url: str, backend: Backend, info: ObjectInfo, partial: Path, fd: int, lock_fd: int,
        settings: StreamSettings, workers: Workers, cleaner: Cleaner,
    ) -> None:
        self.url, self.backend, self.info, self.workers = url, backend, info, workers
        self._cleaner = cleaner
        self.partial, self.fd, self._lock_fd = partial, fd, lock_fd
        self.settings = settings
        count = -(-info.size // settings.part_size)
        self.parts = bytearray(count)  # MISSING / FETCHING / PRESENT per part
        self._present = 0
        self._events: dict[int, trio.Event] = {}
        self._errors: dict[int, BaseException] = {}
        self._slots = trio.Semaphore(settings.concurrency)
        self._inflight = 0  # fetches whose worker thread may still write to `fd`
        self._abandoned = False
        self._finishing = False
        self._next_expected = 0  # where a sequential reader will read next
        self.readers = 0
        self.done = trio.Event()
        self.path: Path | None = None  # the complete cache file, once done

    # -- reading -----------------------------------------------------------------------------------
    async def ensure(self, nursery: trio.Nursery, start: int, end: int) -> None:
        """Wait until bytes [start, end) are in the file (fetching them first if need be)."""
        end = min(end, self.info.size)
        if start >= end or self.done.is_set():
            return
        first, last = start // self.settings.part_size, (end - 1) // self.settings.part_size
        sequential = start <= self._next_expected <= end or start == 0
        self._next_expected = end
        self._request(nursery, range(first, last + 1))
        if sequential:
            self._request(nursery, range(last + 1, last + 1 + self.settings.readahead_parts))
        for index in range(first, last + 1):
            await self._wait(nursery, index)

    async def _wait(self, nursery: trio.Nursery, index: int) -> None:
        while self.parts[index] != PRESENT:
            if self.parts[index] == MISSING:  # an earlier attempt failed: try again for this reader
                self._request(nursery, [index])
            await self._events[index].wait()
            error = self._errors.pop(index, None)
            if error is not None:
                raise error

    def _request(self, nursery: trio.Nursery, indexes: range | list[int]) -> None:
        for index in indexes:
            if index < len(self.parts) and self.parts[index] == MISSING:
                self.parts[index] = FETCHING
                self._events[index] = trio.Event()
                nursery.start_soon(self._fetch, index)

    async def _fetch(self, index: int) -> None:
        start = index * self.settings.part_size
        length = min(self.settings.part_size, self.info.size - start)
        self._inflight += 1
        try:
            async with self._slots:
                if self._abandoned:
                    return
                info = self.info
                await self.workers.transfer(self.backend.read_to, self.fd, info.key, start, length, info.etag)
        except Exception as exc:  # handed to the waiting readers, who turn it into an errno
            self.parts[index] = MISSING
            self._errors[index] = exc
            log.warning("%s: part %d failed: %s", self.url, index, exc)
        else:
            self.parts[index] = PRESENT
            self._present += 1
        finally:
            self._events[index].set()
            self._inflight -= 1
            if self._abandoned and self._inflight == 0:
                os.close(self.fd)  # only now: a worker thread may have been writing to it

    @property
    def complete(self) -> bool:
        return self._present == len(self.parts)

    # -- ending ------------------------------------------------------------------------------------
    async def finish(self, cache: CacheContext, workers: Workers) -> None:
        """Move the complete file into the managed cache (once) and record its ETag."""
        if self._finishing:  # another reader is publishing it: wait for that
            await self.done.wait()
            return
        self._finishing = True
        final = cache.path_for(self.url)

        def publish() -> None:
            os.replace(self.partial, final)
            cache.save_state(EntryState(self.url, self.info.etag, self.info.size), durable=False)

        await workers.metadata(publish)
        await self._cleaner.added(self.info.size)
        self.path = final
        self._release_lock()
        self.done.set()

    def abandon(self) -> None:
        """Nobody reads it any more and it is incomplete: stop fetching and drop the partial file."""
        self._abandoned = True  # queued fetches return at once; running ones finish their part
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()
        self._release_lock()
        if self._inflight == 0:
            os.close(self.fd)

    def close_file(self) -> None:
        os.close(self.fd)

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class Cleaner:
    """Keeps the cache within its limits as downloads add entries, without a full scan per small file.

    A scan runs once a tenth of the limits has been added, so the cache overshoots by at most that.
    """

    def __init__(self, cache: CacheContext, workers: Workers) -> None:
        self.cache, self.workers = cache, workers
        self._files = self._bytes = 0

    async def added(self, size: int) -> None:
        self._files, self._bytes = self._files + 1, self._bytes + size
        byte_step = self.cache.byte_limit // 10 if self.cache.byte_limit else 1 << 62
        if self._files >= max(1, min(16, self.cache.file_limit // 10)) or self._bytes >= byte_step:
            self._files = self._bytes = 0
            await self.workers.metadata(self.cache.clean)


class Downloads:
    """The downloads in progress in this mount, one per URL."""

    def __init__(self, cache: CacheContext, workers: Workers, settings: StreamSettings) -> None:
        self.cache, self.workers, self.settings = cache, workers, settings
        self._cleaner = Cleaner(cache, workers)
        self._active: dict[str, Download] = {}
        self.nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the part fetches (started with `nursery.start` in the mount's nursery)."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def attach(self, url: str, backend: Backend, info: ObjectInfo) -> Download | None:
        """The shared download of `url` at `info`'s version; None if another process is fetching it."""
        current = self._active.get(url)
        if current is not None and current.info.etag == info.etag:
            current.readers += 1
            return current
        started = await self.workers.metadata(self._start_files, url, info)
        if started is None:
            return None
        partial, fd, lock_fd = started
        download = Download(url, backend, info, partial, fd, lock_fd, self.settings, self.workers, self._cleaner)
        download.readers = 1
        self._active[url] = download
        if info.size == 0:
            await download.finish(self.cache, self.workers)
        return download

    def _start_files(self, url: str, info: ObjectInfo) -> tuple[Path, int, int] | None:
        # The SDK-compatible fetch lock, without waiting: if another process holds it, let it finish.
        lock_fd = self.cache.try_fetch_lock(url)
        if lock_fd is None:
            return None
        final = self.cache.path_for(url)
        partial = final.with_name(f"{final.name}_{time.time()}{PARTIAL_SUFFIX}")
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, info.size)  # sparse: parts land at their offsets
        return partial, fd, lock_fd

    async def read(self, download: Download, start: int, size: int) -> None:
        assert self.nursery is not None
        await download.ensure(self.nursery, start, start + size)
        if download.complete and not download.done.is_set():
            await download.finish(self.cache, self.workers)

    async def detach(self, download: Download) -> None:
        download.readers -= 1
        if download.readers > 0:
            return
        if self._active.get(download.url) is download:
            del self._active[download.url]
        if download.done.is_set():
            download.close_file()
        elif download.complete:
            await download.finish(self.cache, self.workers)
            download.close_file()
        else:
            download.abandon()
