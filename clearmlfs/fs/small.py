"""Small objects: fetched whole in one request, and ahead of a reader who walks a directory in name order.

A dataset of many small files is read one file after another. The general open
path costs a HEAD (close-to-open check) and then a GET per file, one file at a
time. Here a small object's open costs one request at most: a plain GET when it
is not cached, a conditional GET when it is (304 if unchanged). And when a reader
opens the files of a directory in name order, the next files are fetched in
parallel before they are opened, so the reader finds them cached and checked.

A fetched file counts as checked at the time of its GET, exactly like a listing
or a HEAD: an open within `ttl` of it needs no request, as for any other file.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import trio

from ..backends import Backend, ObjectInfo
from ..cache import CacheContext
from ..errors import StorageError
from .fetchers import Fetchers
from .inodes import Kind, Node
from .namespace import OFFLINE, Namespace
from .stream import Cleaner, TaskHost
from .workers import Workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmallSettings:
    max_size: int = 4 * 1024 * 1024  # objects up to this size are fetched whole, in one GET
    readahead: int = 32  # files fetched ahead of a reader walking a directory in name order (0: none)
    concurrency: int = 8  # read-ahead fetches under way (each fetcher process does one at a time)
    lookup_get_size: int = 256 * 1024  # a file up to this size is looked up by its GET (`attrs_by_get`)


@dataclass
class Walk:
    """Where a reader is in one directory's name order."""

    listed: float  # the listing the order was built from
    order: list[str]
    index: dict[str, int]
    last: int = -2  # index of the file opened last
    ahead: int = -1  # files up to this index have been fetched (or are being fetched) ahead
    window: int = 4  # grows while the walk stays sequential


class SmallFiles(TaskHost):
    def __init__(
        self, ns: Namespace, cache: CacheContext, workers: Workers, fetchers: Fetchers, cleaner: Cleaner,
        settings: SmallSettings,
    ) -> None:
        self.ns, self.cache, self.workers, self.fetchers, self.cleaner = ns, cache, workers, fetchers, cleaner
        self.settings = settings
        self.entries = ns.entries
        self._ready: deque[tuple[str, str]] = deque()  # (url, ETag) of objects fetched ahead, oldest first
        self._walked: deque[str] = deque()  # folders (URLs) whose entry holds a walk, oldest first
        self._slots = trio.CapacityLimiter(settings.concurrency)

    def applies(self, node: Node) -> bool:
        return (
            node.kind is Kind.FILE
            and node.size <= self.settings.max_size
            and not self.ns.writeback.local_changes(node.url)
        )

    async def current(self, node: Node) -> Path | None:
        """A current cached copy of the small object `node` (its attributes refreshed), or None if the
        general open path must decide (local changes, a download by another process, the object grew)."""
        if not await self._settled(node.url):  # fetched ahead right now: its GET is as recent as ours would be
            return None
        if node.cached_etag:  # a copy to revalidate: without one, the GET below is the only request
            await self.ns.revalidate_by_listing(node)
        else:
            self.ns.count_open(node)
        ready = self._take_ready(node.url)
        if ready is not None and ready[0] == node.etag and self.ns.fresh(node):
            path: Path | None = ready[1]  # fetched ahead moments ago: no disk check, no thread hop
        else:
            path = await self._fetch(node)
        self._read_ahead(node)
        return path

    async def _settled(self, url: str) -> bool:
        """Wait for a fetch of `url` under way (fetched ahead, say) to end; False if it did not within the
        operation budget (a stalled server): the caller then leaves the object to the general open path."""
        with trio.move_on_after(self.workers.timeouts.operation):
            while (fetching := self._fetching(url)) is not None:
                await fetching.wait()
            return True
        return False

    def _may_fetch(self, node: Node) -> bool:
        """Whether a fetch of `node` started on the side (ahead of its reader, for a lookup) may go now: not
        being fetched, written or uploaded."""
        return self._fetching(node.url) is None and self.applies(node) and not self.entries.held(node.url)

    def _fetching(self, url: str) -> trio.Event | None:
        entry = self.entries.get(url)
        return None if entry is None else entry.fetching

    async def _fetch(self, node: Node, ahead: bool = False) -> Path | None:
        url = node.url
        if not await self._settled(url):  # one fetch of a URL at a time
            return None
        backend, key = self.ns.locate(node)
        writeback = self.ns.writeback
        entry = self.entries.at(url)
        done = entry.fetching = trio.Event()
        entry.begin_fetch()
        result: object
        try:
            async with writeback.lock(url):  # a writer opening it waits for the new file to be in place
                if entry.local_changes:
                    return None  # written here: the cache file is the writer's, not the server's
                entry.check_publish()  # (what it fetches becomes the cache file)
                # Taken under the lock: an upload it waited for has made the node's attributes newer.
                known = ObjectInfo(key, node.size, node.mtime, node.etag) if self.ns.fresh(node) else None
                asked = time.monotonic()
                if ahead and self.fetchers.available:  # in a fetcher process: the daemon keeps its GIL
                    result = await self.fetchers.fetch_small(url, self.settings.max_size, known)
                else:
                    result = await self._fetch_for_reader(node, backend, key, known)
        finally:
            entry.end_fetch()
            if entry.fetching is done:
                entry.fetching = None
            done.set()
            self.entries.release(entry)
        if result is OFFLINE:
            return self.cache.path_for(url)  # the server could not answer; this copy is current as far as known
        if result is None:
            return None
        path, info = cast(tuple[Path | None, ObjectInfo | None], result)
        if info is not None:  # (None: `known` matched the cached copy, nothing was asked of the server)
            self.ns.set_object(node, info, asked)
            if path is not None and self.nursery is not None:
                # In the background: the file is ready now, and its reader must not wait for evictions.
                self.nursery.start_soon(self._added, info.size)
            elif path is not None:
                await self.cleaner.added(info.size)
            if node.etag != info.etag:  # a newer answer came while this one was in flight: not this copy
                return None
        if path is not None:
            node.cached_etag = node.etag
        return path

    async def _fetch_for_reader(self, node: Node, backend: Backend, key: str, known: ObjectInfo | None) -> object:
        """A reader's own fetch, never queued behind read-ahead: in a fetcher process if one is idle, else in
        a thread of the daemon, whose interpreter lock it would share with every FUSE request (a cold epoch
        of 5,000 small files by 4 readers took 10.5 s instead of 13 s in a process, a second one 2.8 s instead
        of 4.2 s, scripts/bench.py's epoch). Left to the daemon: a copy that may have to be served while the
        server is away (`ask_or_cached` decides that within the revalidation budget), and any failure, which
        the daemon's own request reports as what it is."""
        url, limit = node.url, self.settings.max_size
        have_copy = bool(node.etag) and node.cached_etag == node.etag
        if (known is not None or not have_copy) and self.fetchers.ready():
            try:
                return await self.fetchers.fetch_small(url, limit, known)
            except StorageError as exc:
                log.debug("%s: fetching it in a fetcher process failed (%s): fetching it here", url, exc)
        return await self.ns.ask_or_cached(node, self.cache.fetch_small, url, backend, key, limit, known)

    async def attrs_by_get(self, node: Node) -> bool:
        """Learn the stored attributes of `node`, which a lookup needs, from a GET of the whole file (a reader's
        fetch: `_fetch_for_reader`) instead of a HEAD, when it is small enough that its body costs about what a
        second round trip would: the open that usually follows finds it fetched, and costs no request.

        True if the server was asked (within the revalidation budget, as a HEAD would be); False where a HEAD
        must ask: a file cached already (a 304 carries no metadata), written here, being fetched, or any
        failure, which the HEAD then reports as what it is."""
        if node.size > self.settings.lookup_get_size or node.cached_etag or not self._may_fetch(node):
            return False
        with trio.move_on_after(self.workers.timeouts.revalidate):
            try:
                path = await self._fetch(node)
            except (StorageError, OSError) as exc:
                log.debug("%s: fetching it for its attributes failed (%s): asking with a HEAD", node.url, exc)
                return False
            if path is not None:
                self._keep_ready(node.url, node.etag, path)
            return not self.ns.needs_attrs(node)
        log.debug("%s: no answer to its GET within the revalidation budget: its stored times are not known", node.url)
        return True

    async def _added(self, size: int) -> None:
        try:
            await self.cleaner.added(size)
        except (StorageError, OSError) as exc:  # the next addition tries again
            log.warning("cannot keep the cache within its limits: %s", exc)

    # -- read-ahead ----------------------------------------------------------------------------------
    def _read_ahead(self, node: Node) -> None:
        """Fetch the next files of `node`'s directory if the reader is going through it in name order."""
        if self.settings.readahead <= 0 or self.nursery is None:
            return
        walk = self._walk(node)
        index = walk.index.get(node.name) if walk is not None else None
        if walk is None or index is None:
            return
        sequential = walk.last < index <= walk.last + 2  # a skipped file (already cached elsewhere) is fine
        walk.last = index
        if not sequential:
            walk.window, walk.ahead = 4, index
            return
        # Never more than a quarter of the cache's file limit, if it counts: read-ahead must not evict what it fetched.
        limit = self.cache.file_limit
        room = self.settings.readahead if limit is None else max(1, limit // 4)
        walk.window = min(self.settings.readahead, room, walk.window * 2)
        end = min(len(walk.order), index + 1 + walk.window)
        parent = self.ns.table[node.parent]
        for i in range(max(index + 1, walk.ahead + 1), end):
            child = self._child(parent, walk.order[i])
            if child is not None and self.applies(child) and self._fetching(child.url) is None:
                self.nursery.start_soon(self._fetch_ahead, child)
        walk.ahead = max(walk.ahead, end - 1)

    def _walk(self, node: Node) -> Walk | None:
        parent = self.ns.table.get(node.parent)
        if parent is None or parent.children is None:
            return None
        folder = self.entries.get(parent.url)
        walk = folder.walk if folder is not None else None
        if walk is None or walk.listed != parent.listed:
            order = sorted([n for n, i in parent.children.items() if self._is_file(i)] + list(parent.gone or ()))
            walk = Walk(parent.listed, order, {n: i for i, n in enumerate(order)})
            self._keep_walk(parent.url, walk)
        return walk

    def _keep_walk(self, url: str, walk: Walk) -> None:
        """Remember the walk through the folder `url` on its entry: for the folders being walked now (64 at
        most), not every one ever read."""
        folder = self.entries.at(url)
        if folder.walk is None:
            self._walked.append(url)
        folder.walk = walk
        while len(self._walked) > 64:
            old = self.entries.get(self._walked.popleft())
            if old is not None:
                old.walk = None
                self.entries.release(old)

    def _is_file(self, inode: int) -> bool:
        child = self.ns.table.get(inode)
        return child is not None and child.kind is Kind.FILE

    def _child(self, parent: Node, name: str) -> Node | None:
        return self.ns.table.child(parent, name)

    async def _fetch_ahead(self, node: Node) -> None:
        async with self._slots:
            if not self._may_fetch(node):
                return  # being fetched, written or uploaded: the reader's own open will see to it
            try:
                path = await self._fetch(node, ahead=True)
            except (StorageError, OSError) as exc:  # the reader's own open tries again and reports it
                log.debug("read-ahead of %s failed: %s", node.url, exc)
                return
            if path is not None:
                self._keep_ready(node.url, node.etag, path)

    def _keep_ready(self, url: str, etag: str, path: Path) -> None:
        """Note `url` fetched ahead (at `etag`, into `path`) for its reader's open; only the newest few are
        kept: fetched ahead and never opened, the oldest are forgotten."""
        self.entries.at(url).ready = (etag, path)
        self._ready.append((url, etag))
        while len(self._ready) > 4 * max(1, self.settings.readahead):
            old_url, old_etag = self._ready.popleft()
            old = self.entries.get(old_url)
            if old is not None and old.ready is not None and old.ready[0] == old_etag:
                old.ready = None
                self.entries.release(old)

    def _take_ready(self, url: str) -> tuple[str, Path] | None:
        entry = self.entries.get(url)
        if entry is None or entry.ready is None:
            return None
        ready, entry.ready = entry.ready, None
        self.entries.release(entry)
        return ready
