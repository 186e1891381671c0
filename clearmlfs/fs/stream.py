"""Streaming downloads: an object is fetched range by range into a sparse cache file while it is read.

`open()` returns at once; a read waits only for the bytes it covers. A read on
its own (a random read, the tail of a zip, a safetensors header) fetches its own
pages; a reader going on where a read stopped is sequential and gets read-ahead
that grows from one part to `readahead_parts`, in parallel GETs. Every reader of
an object shares one `Download`. When every byte is present the file is renamed
into the managed cache: the same complete, reusable entry a whole-object fetch
would have made. A download nobody reads any more is abandoned: the ranges it
holds are kept in our state folder for the next reader of the same version
(`Landing.keep`), never where the SDK would take them for a complete copy.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..backends import Backend, ObjectInfo
from ..cache import CacheContext, Landing
from ..errors import NoSpace, StorageError, TimedOut
from ..ranges import Ranges
from .workers import Workers
from .writeback import WriteBack

if TYPE_CHECKING:
    from .entries import Entry
    from .fetchers import Fetchers  # which builds on TaskHost, below

log = logging.getLogger(__name__)

PAGE = 4096  # a read's own bytes are asked for in whole pages (the kernel reads pages anyway)
KEEP_WAIT = 2.0  # seconds an abandoned download waits for its fetches in flight to keep what it holds
# The first read-ahead of a reader found going on from a read in the middle of an object, doubled from there:
# small, as mountpoint-s3's first request is, since a random reader's reads now and then look sequential.
FIRST_WINDOW = 1024 * 1024
STREAMS = 8  # sequential readers of one object told apart (others' reads may interleave with theirs)


@dataclass(frozen=True)
class StreamSettings:
    part_size: int = 8 * 1024 * 1024  # a sequential reader's first read-ahead, doubled each time it is renewed
    concurrency: int = 4  # GETs in flight per object
    readahead_parts: int = 16  # the read-ahead's limit, in parts
    coalesce: int = 4  # the parts a read-ahead GET asks for at most


@dataclass(eq=False)
class _Fetch:
    """One ranged GET into the file: bytes [start, end), of which the first `done` have landed."""

    start: int
    end: int
    moved: float  # trio time it was asked for or last advanced
    done: int = 0
    over: bool = False  # ended: landed (its range is present), failed (`error`), or given up for room
    error: BaseException | None = None


@dataclass(eq=False)
class _Reader:
    """A sequential reader's position: `window` bytes are kept asked for ahead of `next` (0: not sequential
    yet, a single read), up to `ahead`."""

    next: int
    ahead: int
    window: int = 0


class Download:
    def __init__(
        self, entry: Entry, backend: Backend, info: ObjectInfo, landing: Landing,
        settings: StreamSettings, workers: Workers, cleaner: Cleaner, writeback: WriteBack,
    ) -> None:
        self.entry, self.url, self.backend, self.info, self.workers = entry, entry.url, backend, info, workers
        self._cleaner, self._writeback = cleaner, writeback
        self.landing, self.fd = landing, landing.fd
        self.settings = settings
        self._present = Ranges()  # bytes in the file
        self._asked = Ranges()  # bytes in the file or in flight
        for start, end in landing.present:  # kept by an earlier download of this version
            self._present.add(start, end)
            self._asked.add(start, end)
        self._fetches: list[_Fetch] = []  # in flight
        self._readers: list[_Reader] = []  # most recent last
        self._changed = trio.Event()  # set (and replaced) whenever a fetch advances, lands or fails
        self._slots = trio.Semaphore(settings.concurrency)
        self._inflight = 0  # fetches scheduled or running: their worker thread may still write to `fd`
        self._abandoned = False
        self._finishing = False
        self.readers = 0
        self.confirmed = 0.0  # time.monotonic() when the last range that arrived was asked for (if it proves
        # that `info` was still the object's current version then: Backend.pinned_read_is_current)
        self.done = trio.Event()
        self.closed = trio.Event()  # its last reader has gone, and it is published, kept or dropped
        self._map: mmap.mmap | None = None  # the file, mapped for `view`
        self._mapped: tuple[int, int] | None = None  # the pages of the last view
        self._map_failed = False
        self.no_space = False  # the cache disk cannot take more of it: readers are served from the server
        self.published = False  # complete, and renamed into the managed cache
        self._made_room = False

    def view(self, start: int, size: int) -> memoryview | None:
        """Bytes [start, start + size) of the file, already fetched, as a view of its mapping; None once it is
        being published (from then on the file may be a writer's, truncated under the mapping).

        The reply is copied into the kernel straight from the file's pages: reading them into a buffer first
        (pread) cost 4-8 % of the daemon's CPU in a cold read. Only the last view stays mapped, so that the
        daemon's resident memory does not grow with the file's pages.
        """
        end = min(start + size, self.info.size)
        if self._finishing or start >= end or self._map_failed:
            return None
        if self._map is None:
            try:
                self._map = mmap.mmap(self.fd, self.info.size, prot=mmap.PROT_READ)
            except (OSError, ValueError) as exc:  # a cache directory that cannot be mapped: read it
                log.debug("%s: cache file not mappable (%s): replies are read from it", self.url, exc)
                self._map_failed = True
                return None
        self._unmap_last()  # its reply was sent before this read reached us (the loop answers in one step)
        first = start - start % mmap.PAGESIZE
        self._mapped = (first, end - first)
        return memoryview(self._map)[start:end]

    def _unmap_last(self) -> None:
        if self._map is not None and self._mapped is not None:
            self._map.madvise(mmap.MADV_DONTNEED, *self._mapped)  # a shared file mapping: only the mapping goes
            self._mapped = None

    def _close_map(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: the mapping goes with it
                self._map.close()
            self._map, self._mapped = None, None

    # -- reading -----------------------------------------------------------------------------------
    async def ensure(self, nursery: trio.Nursery, start: int, end: int) -> None:
        """Wait until bytes [start, end) are in the file (fetching them first if need be).

        A read fetches its own pages. A reader that goes on where it (or another reader) stopped is sequential
        and gets read-ahead, which starts at 1 MiB (one part for a read from byte 0: a whole read) and doubles
        each time it is renewed, up to `readahead_parts`; a read elsewhere fetches about what it reads, so
        random reads of a huge object fetch little more than they read (mountpoint-s3's prefetcher grows the
        same way, and starts again small after a seek).
        """
        end = min(end, self.info.size)
        if start >= end or self.done.is_set():
            return
        if self.no_space:
            raise NoSpace(f"{self.url}: the cache disk is full")
        reader, first = self._sequential(start, end), start - start % PAGE
        starting = reader is not None and reader.ahead <= first
        if reader is not None and starting:  # its first read-ahead starts with this read's bytes
            self._read_ahead(nursery, reader, first)
        self._request(nursery, first, min(self.info.size, -(-end // PAGE) * PAGE))
        await self._wait(nursery, start, end)
        if reader is not None and not starting:  # renewed after the wait: not to slow down the bytes awaited
            self._read_ahead(nursery, reader, first)

    def _sequential(self, start: int, end: int) -> _Reader | None:
        """The sequential reader this read continues (from now on at `end`), or None: a read on its own,
        remembered as where a reader may go on."""
        reader = next((r for r in reversed(self._readers) if r.next - PAGE <= start <= max(r.next, r.ahead)), None)
        if reader is None:
            # A read from byte 0 is taken for the start of a whole read: the read-ahead starts at once.
            reader = _Reader(end, start - start % PAGE, self.settings.part_size if start == 0 else 0)
            if len(self._readers) >= STREAMS:
                del self._readers[0]
        else:
            self._readers.remove(reader)
            reader.window = reader.window or min(FIRST_WINDOW, self.settings.part_size)
        self._readers.append(reader)
        reader.next = max(reader.next, end)
        return reader if reader.window else None

    def _read_ahead(self, nursery: trio.Nursery, reader: _Reader, start: int) -> None:
        """Keep `reader.window` bytes asked for ahead of the reader, renewed a full GET at a time."""
        size, part, most = self.info.size, self.settings.part_size, self.settings.coalesce * self.settings.part_size
        target = min(size, reader.next + reader.window)
        ahead = max(reader.ahead, start)
        if target - ahead >= most and target < size:
            target = ahead + (target - ahead) // most * most  # whole GETs; the rest with the next renewal
        if target - ahead >= min(reader.window // 2, most) or target == size > ahead:
            self._request(nursery, ahead, target)
            reader.ahead = target
            reader.window = min(self.settings.readahead_parts * part, reader.window * 2)

    def _request(self, nursery: trio.Nursery, start: int, end: int) -> None:
        """Start fetching the bytes of [start, end) neither present nor in flight, one GET per gap (at most
        `coalesce` parts each)."""
        most = self.settings.coalesce * self.settings.part_size
        for gap_start, gap_end in list(self._asked.gaps(start, end)):
            pieces = -(-(gap_end - gap_start) // most)  # of equal size: no small GET at the end of a big one
            step = -(-(gap_end - gap_start) // pieces // PAGE) * PAGE
            for piece in range(gap_start, gap_end, step):
                fetch = _Fetch(piece, min(gap_end, piece + step), trio.current_time())
                self._asked.add(fetch.start, fetch.end)
                self._fetches.append(fetch)
                # Counted from now, not from when the task starts: an abandon in between must not close `fd`.
                self._inflight += 1
                nursery.start_soon(self._fetch, fetch)

    async def _wait(self, nursery: trio.Nursery, start: int, end: int) -> None:
        """Wait until bytes [start, end) are in the file, asking again for those whose fetch ended without
        them (another reader got its error, or it gave up to make room)."""
        while True:
            gap = next(self._present.gaps(start, end), None)
            if gap is None:
                return
            fetch = next((f for f in self._fetches if f.start <= gap[0] < f.end), None)
            if fetch is None:
                self._request(nursery, gap[0], gap[1])
                continue
            upto = min(end, fetch.end)
            if await self._follow(fetch, upto):
                start = upto

    async def _follow(self, fetch: _Fetch, upto: int) -> bool:
        """Wait until `fetch` has landed its bytes up to `upto` (True), or ended without them (False); its error
        if it failed; TimedOut if its bytes stop coming for the operation budget (the fetch goes on, bounded by
        its request's timeouts).

        Measured from the fetch's own last movement: a reader coming after one that timed out on it (the
        kernel retries a failed read-ahead as a plain read) does not wait a whole budget again."""
        budget = self.workers.timeouts.operation
        while fetch.start + fetch.done < upto:
            if fetch.error is not None:
                raise fetch.error
            if fetch.over:
                return False
            with trio.move_on_at(fetch.moved + budget):
                await self._changed.wait()
            if not fetch.over and fetch.start + fetch.done < upto and trio.current_time() >= fetch.moved + budget:
                raise TimedOut(f"{self.url}: no byte of {fetch.start + fetch.done}+ for {budget:g} s")
        return True

    def _advance(self, fetch: _Fetch, done: int) -> None:
        """`done` bytes of `fetch` are in the file."""
        if done > fetch.done:
            fetch.done, fetch.moved = done, trio.current_time()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _fetch(self, fetch: _Fetch) -> None:
        start, length = fetch.start, fetch.end - fetch.start
        token = trio.lowlevel.current_trio_token()

        def progress(done: int) -> None:  # called from the worker thread
            # Fire and forget: waiting for the loop to run it would stall the download on every piece.
            # Callbacks run in order, all before the fetch's own completion is delivered.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._advance, fetch, done)

        try:
            async with self._slots:
                if self._abandoned:
                    return
                info, asked = self.info, time.monotonic()
                await self.workers.transfer(self.landing.fill, self.backend, info, start, length, progress)
                if self.backend.pinned_read_is_current:
                    self.confirmed = max(self.confirmed, asked)
        except Exception as exc:  # handed to the waiting readers, who turn it into an errno
            self._asked.remove(fetch.start, fetch.end)
            fetch.done = 0  # (what landed is not counted: the range is fetched again whole)
            if isinstance(exc, NoSpace) and await self._room_made(length):
                return  # ended without an error: the readers waiting for it ask again
            self.no_space = self.no_space or isinstance(exc, NoSpace)
            fetch.error = exc
            log.warning("%s: bytes %d-%d failed: %s", self.url, start, start + length, exc)
        else:
            self._present.add(fetch.start, fetch.end)
        finally:
            fetch.over = True
            self._fetches.remove(fetch)
            self._notify()
            self._inflight -= 1
            if self._abandoned and self._inflight == 0:
                self._close_fd()  # only now: a worker thread may have been writing to it

    async def _room_made(self, need: int) -> bool:
        """Evict what nobody uses to make room for a part, once per download: a disk that stays full after
        that cannot take the object, whose readers are then served from the server."""
        if self._made_room:
            return False
        self._made_room = True
        try:
            return await self.workers.metadata(self._cleaner.cache.make_room, need)
        except (OSError, StorageError) as exc:
            log.warning("%s: cannot make room in the cache: %s", self.url, exc)
            return False

    async def settle(self, budget: float) -> None:
        """When every byte has been asked for, wait (within `budget`) for the fetches still finishing: a reader
        that got the last bytes as they arrived may close before their GETs have returned, and the object
        would be dropped instead of kept."""
        if self._asked.total < self.info.size:
            return
        with trio.move_on_after(budget):
            while self._inflight and not self.complete:
                await self._changed.wait()

    def present(self, start: int, end: int) -> bool:
        """Whether bytes [start, end) are all in the file."""
        return self._present.covers(start, end)

    @property
    def complete(self) -> bool:
        return self._present.total >= self.info.size

    # -- ending ------------------------------------------------------------------------------------
    async def finish(self) -> None:
        """Move the complete file into the managed cache (once) and record its ETag."""
        if self._finishing:  # another reader is publishing it: wait for that
            await self.done.wait()
            return
        self._finishing = True
        self._close_map()
        entry = self.entry
        if not entry.local_changes:  # (an upload holds the lock only while there are some)
            async with self._writeback.lock(entry.url):  # a writer opening it waits until the file is in place
                if not entry.local_changes:
                    entry.check_publish()
                    await self.workers.metadata(self.landing.publish, self.info)
                    self.published = True
        if self.published:
            await self._cleaner.added(self.info.size)
        else:  # written here meanwhile: the cache file is the writer's; this copy serves only its open readers
            self.landing.discard()
        self.done.set()

    async def abandon(self) -> None:
        """Nobody reads it any more and it is incomplete: stop fetching, and keep the ranges it holds for the
        next reader of this version, once its fetches in flight have ended (within a short wait). A fetch
        still running then could write into the file after a reader of another version took it over: the
        file is dropped instead (unlinked: a late write goes nowhere), as it is when the cache disk is full."""
        self._abandoned = True  # queued fetches return at once; running ones finish their range
        self._close_map()
        self._inflight += 1  # (held here: the file stays open until it is kept or dropped)
        try:
            with trio.move_on_after(min(KEEP_WAIT, self.workers.timeouts.operation)):
                while self._inflight > 1:
                    await self._changed.wait()
            if self._inflight > 1 or self.no_space:
                self.landing.discard()
                return
            await self.workers.disk(self.landing.keep, self.info, list(self._present))
        except OSError as exc:
            log.warning("%s: the ranges read are not kept: %s", self.url, exc)
            self.landing.discard()
            return
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._close_fd()
        await self._cleaner.added(self._present.total)  # (kept copies count against the cache's limits)

    def _close_fd(self) -> None:
        self.landing.close()
        self.fd = -1

    def close_file(self) -> None:
        self._close_map()
        self._close_fd()


class Cleaner:
    """Keeps the cache within its limits as downloads add entries, without a full scan per small file.

    Once a quarter of a limit has been added, a scan evicts down to three quarters of it: the cache never
    exceeds its limits by more than the entries added since the last scan, and a walk through many small
    files costs a scan per quarter of the limit, not one per file.
    """

    HEADROOM = 0.25

    def __init__(self, cache: CacheContext, workers: Workers, fetchers: Fetchers) -> None:
        self.cache, self.workers, self.fetchers = cache, workers, fetchers
        self._files = self._bytes = 0

    async def added(self, size: int) -> None:
        self._files, self._bytes = self._files + 1, self._bytes + size
        file_limit = self.cache.file_limit
        file_step = max(1, int(file_limit * self.HEADROOM)) if file_limit is not None else 1 << 62
        byte_step = int(self.cache.byte_limit * self.HEADROOM) if self.cache.byte_limit else 1 << 62
        # The free-space rule is checked as often as the limits are, and whenever what was added since the
        # last scan could have eaten the room it keeps.
        room = (
            self.cache.min_free > 0 and self._bytes >= self.cache.min_free // 4
            and await self.workers.metadata(self.cache.short_of_space)
        )
        if self._files >= file_step or self._bytes >= byte_step or room:
            self._files = self._bytes = 0
            if self.fetchers.available:  # a few syscalls per evicted file: not on the daemon's GIL
                with contextlib.suppress(StorageError):  # (then here, as without fetchers)
                    await self.fetchers.clean(self.HEADROOM)
                    return
            await self.workers.metadata(self.cache.clean, self.HEADROOM)


class TaskHost:
    """Hosts background fetches in a nursery of their own, for the life of the mount."""

    nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Started with `nursery.start` in the mount's nursery."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await trio.sleep_forever()


class Downloads(TaskHost):
    """The downloads in progress in this mount, one per URL."""

    def __init__(
        self, cache: CacheContext, workers: Workers, writeback: WriteBack, settings: StreamSettings, fetchers: Fetchers
    ) -> None:
        self.cache, self.workers, self.writeback, self.settings = cache, workers, writeback, settings
        self.entries = writeback.entries
        self.cleaner = Cleaner(cache, workers, fetchers)

    async def attach(self, url: str, backend: Backend, info: ObjectInfo) -> Download | None:
        """The shared download of `url` at `info`'s version (its entry's); None if another process is
        fetching it. The caller's handle keeps the entry."""
        current = self.entries.at(url).download
        if current is not None and current.readers == 0:
            # Being closed by its last reader, holding the download lock: wait for it to be published (the
            # caller then finds the copy cached) or kept (this download goes on from its ranges).
            await current.closed.wait()
            if current.published:
                return None
            current = self.entries.at(url).download
        if current is not None and current.info.etag == info.etag:
            current.readers += 1
            return current
        # The cache's download lock (StorageManager takes it too), without waiting: if another process holds
        # it, that process is downloading the object; the caller then waits for it instead.
        landing = await self.workers.metadata(self.cache.land, url, info.size, False, info)
        if landing is None:
            return None
        entry = self.entries.at(url)
        download = Download(
            entry, backend, info, landing, self.settings, self.workers, self.cleaner, self.writeback
        )
        download.readers = 1
        entry.download = download  # (one of an older version goes on for its own readers)
        entry.begin_fetch()
        if info.size == 0:
            await download.finish()
        return download

    async def read(self, download: Download, start: int, size: int) -> None:
        assert self.nursery is not None
        await download.ensure(self.nursery, start, start + size)
        if download.complete and not download.done.is_set():
            await download.finish()

    async def read_uncached(self, download: Download, start: int, size: int) -> bytes:
        """Bytes [start, start + size) of a download the cache disk cannot hold: from its file where they are
        there, else straight from the server (and not kept)."""
        end = min(start + size, download.info.size)
        if start >= end:
            return b""
        if download.present(start, end):
            return await self.workers.disk(os.pread, download.fd, end - start, start)
        info = download.info
        data: bytes = await self.workers.transfer(
            download.backend.read, info.key, start, end - start, info.etag, retry_for=self.workers.timeouts.operation
        )
        return data

    async def detach(self, download: Download) -> None:
        download.readers -= 1
        if download.readers > 0:
            return
        entry = download.entry
        try:
            if not download.done.is_set() and not download.complete:
                await download.settle(self.workers.timeouts.operation)
            if download.done.is_set():
                download.close_file()
            elif download.complete:
                await download.finish()
                download.close_file()
            else:
                await download.abandon()
        finally:
            if entry.download is download:
                entry.download = None
            download.closed.set()
            entry.end_fetch()
            self.entries.release(entry)
