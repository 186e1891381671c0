"""Open files: a cache file (or, for direct access, the original file) behind each file handle.

Opening an object fetches it into the managed cache (unless a current copy is
there) and pins the entry against eviction while it is open. Writes go to the
cache file; `flush` uploads a dirty file so `close(2)` reports the result. A large
new file written in order from its first byte is uploaded while it is written
(upload.py), and `flush` then only completes that upload.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyfuse3
import trio

from ..backends import ObjectInfo
from ..cache import CacheContext, Pin, inode_of, open_cache_file
from ..errors import NoSpace, ReadOnly, StorageError, TimedOut, to_errno
from .entries import Entry
from .inodes import Kind, Node
from .namespace import Namespace
from .passthrough import DropBehind, Passthrough
from .small import SmallFiles
from .stream import Download, Downloads
from .upload import Stream
from .workers import Workers
from .writeback import WriteBack

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
R = TypeVar("R")


@dataclass(eq=False)
class OpenFile:
    fh: int
    node: Node
    entry: Entry  # its object's (for a direct-access file, its path's): renamed with it
    fd: int  # may be its pin's (`shared_fd`)
    local: bool  # a direct-access file
    pin: Pin | None
    dirty: bool = False
    download: Download | None = None  # set while the object is still streaming in
    keep_cache: bool = False  # the kernel's page cache for this inode still holds this content
    writer: bool = False  # opened for writing: registered with the write-back (no fetch replaces the file)
    backing_id: int = 0  # > 0: the kernel reads `fd`'s file itself (passthrough.py)
    # Write-only: the kernel hands writes straight to us (FOPEN_DIRECT_IO) instead of first copying them into
    # its page cache, where nobody reads them (a write-only descriptor cannot be read or mmapped).
    direct_io: bool = False
    behind: DropBehind | None = None  # read-only in cached mode, with passthrough on: drops what it read
    # Streaming upload (upload.py): while the file is exactly what this handle wrote in order from byte 0,
    # `appended` is its size, and from `stream_from` bytes on it is uploaded as it is written (`stream`).
    appended: int | None = None
    stream_from: int = 0
    stream: Stream | None = None
    # The errno of a write (or truncate) that failed: the file holds part of what was written, so nothing of
    # it may be uploaded. Every later write, flush and fsync of the handle fails with it.
    failed: int = 0

    @property
    def shared_fd(self) -> bool:
        """Whether `fd` is its pin's, which the open files of the entry share and the pin closes."""
        return self.pin is not None and self.fd >= 0 and self.fd == self.pin.fd

    @property
    def url(self) -> str:
        """The object's URL as it is now (renames move it); '' for a direct-access file."""
        return "" if self.local else self.entry.url


class OpenFiles:
    def __init__(
        self, ns: Namespace, cache: CacheContext, workers: Workers, writeback: WriteBack, downloads: Downloads,
        small: SmallFiles, passthrough: Passthrough, read_only: bool = False,
    ) -> None:
        self.ns, self.cache, self.workers, self.writeback = ns, cache, workers, writeback
        self.downloads, self.small, self.passthrough = downloads, small, passthrough
        self.read_only = read_only
        self.entries = writeback.entries
        self._handles: dict[int, OpenFile] = {}  # fh → handle (each also listed by its entry)
        self._fh = itertools.count(1)

    def _register(self, node: Node, fd: int, pin: Pin | None, local: bool = False) -> OpenFile:
        entry = self.entries.at(node.url)
        handle = OpenFile(next(self._fh), node, entry, fd, local, pin)
        self._handles[handle.fh] = handle
        entry.handles.append(handle)
        return handle

    def _unregister(self, handle: OpenFile) -> None:
        """Undo `_register` of a handle whose open failed."""
        del self._handles[handle.fh]
        handle.entry.handles.remove(handle)
        self.entries.release(handle.entry)

    def _others(self, handle: OpenFile) -> list[OpenFile]:
        """The other open handles of `handle`'s object."""
        return [h for h in handle.entry.handles if h is not handle]

    def _check_writable(self, flags: int) -> None:
        if self.read_only and flags & (WRITE_FLAGS | os.O_TRUNC | os.O_CREAT):
            raise ReadOnly("read-only mount")

    # -- open / create -----------------------------------------------------------------------------
    async def open(self, node: Node, flags: int) -> OpenFile:
        local = self.ns.is_local(node)
        if flags & WRITE_FLAGS and not local:
            entry = self.entries.at(node.url)
            self.passthrough.open_writer(entry)  # before anything is truncated or registered
            try:
                return self._direct_writes(await self._open_any(node, flags), flags)
            except BaseException:
                self.passthrough.release(entry, node.inode, 0)
                raise
        handle = await self._open_any(node, flags)
        # Complete, or direct access (whose writes belong in the file anyway): the kernel may use it itself.
        eligible = local or handle.download is None
        handle.backing_id = self.passthrough.assign(handle.entry, handle.fd, eligible)
        if handle.backing_id:
            handle.keep_cache = False  # the kernel refuses it with passthrough; the FUSE page cache is unused
            node.kernel_etag = ""  # and whether this open cleared it is the kernel's business: unknown now
        elif self.passthrough.enabled:
            handle.behind = DropBehind()
        return self._direct_writes(handle, flags)

    @staticmethod
    def _direct_writes(handle: OpenFile, flags: int) -> OpenFile:
        # Not with passthrough (a direct-access file): the kernel writes to the file itself then.
        handle.direct_io = flags & os.O_ACCMODE == os.O_WRONLY and not handle.backing_id
        return handle

    async def _open_any(self, node: Node, flags: int) -> OpenFile:
        self._check_writable(flags)
        mode_flags = flags & (os.O_ACCMODE | os.O_TRUNC | os.O_APPEND)
        if self.ns.is_local(node):
            fd = await self.workers.metadata(os.open, node.url, mode_flags)
            return self._register(node, fd, None, local=True)
        if node.kind is not Kind.FILE:
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if flags & WRITE_FLAGS:
            await self.writeback.open_writer(node.url)  # from now on no fetch replaces the cache file
            try:
                handle = await (self._open_truncated(node, flags) if flags & os.O_TRUNC else self._open(node, flags))
            except BaseException:
                self.writeback.close_writer(self.entries.at(node.url))
                raise
            handle.writer = True
            return handle
        if self.small.applies(node):
            small = await self._open_small(node, flags)
            if small is not None:
                return small
        return await self._open(node, flags)

    async def _open(self, node: Node, flags: int) -> OpenFile:
        await self.ns.refresh(node)
        backend, key = self.ns.locate(node)
        info = ObjectInfo(key, node.size, node.mtime, node.etag)
        keep_cache = self._keep_cache(node)
        writable = bool(flags & WRITE_FLAGS)
        path = await self.workers.metadata(self.cache.lookup, node.url, info)
        if path is not None and not self.writeback.local_changes(node.url):
            node.cached_etag = node.etag
        if path is None and not writable:
            download = await self.downloads.attach(node.url, backend, info)
            if download is not None:
                return await self._streaming(node, download, keep_cache)

        async def fetch() -> Path:  # to write into it, or while another process downloads it: the whole file
            fetched = await self.workers.transfer(
                self.cache.fetch, node.url, backend, key, info, retry_for=self.workers.timeouts.operation
            )
            node.cached_etag = node.etag
            return fetched

        handle = await self._open_prepared(node, flags, path or await fetch(), fetch)
        handle.keep_cache = keep_cache
        return handle

    async def _open_prepared(
        self, node: Node, flags: int, path: Path, prepare: Callable[[], Awaitable[Path]]
    ) -> OpenFile:
        """`_open_cached(path)`; if the entry was evicted (a tiny cache, or another process) between its
        preparation and our pin, `prepare` it again, twice at most."""
        for _ in range(2):
            try:
                return await self._open_cached(node, path, flags)
            except FileNotFoundError:
                path = await prepare()
        return await self._open_cached(node, path, flags)

    async def _open_small(self, node: Node, flags: int) -> OpenFile | None:
        try:
            path = await self.small.current(node)
        except NoSpace:  # the general path can serve it without keeping it
            return None
        if path is None:
            return None
        try:
            handle = await self._open_cached(node, path, flags)
        except FileNotFoundError:  # evicted between its fetch and now: the general path fetches it again
            return None
        handle.keep_cache = self._keep_cache(node)
        return handle

    @staticmethod
    def _keep_cache(node: Node) -> bool:
        """Whether the kernel's page cache for `node` holds its current content (and, from now on, will)."""
        keep = bool(node.etag) and node.kernel_etag == node.etag
        node.kernel_etag = node.etag
        return keep

    async def _open_cached(self, node: Node, path: Path, flags: int) -> OpenFile:
        handle = self._register(node, -1, None)
        try:
            handle.pin, handle.fd = await self._pin_and_open(
                handle.entry, path, os.O_RDWR if flags & WRITE_FLAGS else os.O_RDONLY)
        except BaseException:
            self._unregister(handle)
            raise
        return handle

    async def _pin_and_open(self, entry: Entry, path: Path, flags: int, create: bool = False) -> tuple[Pin, int]:
        """`path` pinned and opened; FileNotFoundError if it was evicted meanwhile. The entry is pinned once
        however many handles have it open, and they read through the pin's descriptor when it is of the same
        file and mode: a daemon serving thousands of open files must not spend more than one on each.

        On the loop, as pyfuse3's and s3ql's examples do: a local disk answers these calls (and a close) from
        memory in microseconds, where a hop to a worker thread and back costs the daemon a hundred futex calls
        of lock hand-over per open (measured: a second epoch of 5,000 files took twice as long). What takes
        time in proportion to the data (reads, truncation, freeing a deleted file's blocks) goes to
        `Workers.disk`."""
        pin = entry.pins.get(path.name)
        if pin is None:
            made = self.cache.open_pinned(path, flags, create)
            return self._adopt(entry, made), made.fd
        pin.users += 1
        try:
            return pin, _share(pin, path, flags, create)
        except BaseException:
            await self._unpin(entry, pin)
            raise

    @staticmethod
    def _adopt(entry: Entry, made: Pin) -> Pin:
        # (Pinned by another open meanwhile, the entry keeps that pin; this open keeps its own.)
        entry.pins.setdefault(made.file_name, made)
        made.users += 1
        return made

    async def _unpin(self, entry: Entry, pin: Pin) -> None:
        pin.users -= 1
        if pin.users == 0:
            if entry.pins.get(pin.file_name) is pin:
                del entry.pins[pin.file_name]
            if pin.fd >= 0:  # (a linked pin's release drops a name of the file too)
                await self._let_go(pin.fd, pin.release, names_dropped=1 if pin.linked else 0)
            else:
                pin.release()

    async def _let_go(self, fd: int, release: Callable[[], None], names_dropped: int = 0) -> None:
        """`release()`, which closes `fd` (a cache file's) and drops `names_dropped` of its names: on the loop
        (see `_pin_and_open`), unless the file has no name left then, and the close frees its blocks, which
        takes a while for a large one."""
        if os.fstat(fd).st_nlink <= names_dropped:
            with trio.CancelScope(shield=True):
                await self.workers.disk(release)
        else:
            release()

    async def _streaming(self, node: Node, download: Download, keep_cache: bool) -> OpenFile:
        # Pinned under the entry's final name: it is renamed into place once complete.
        entry = self.entries.at(node.url)
        final = self.cache.path_for(node.url)
        pin = entry.pins.get(final.name)
        if pin is None:
            made = self.cache.hold(final, os.dup(download.fd), False, False, download.landing.partial)
            pin, fd = self._adopt(entry, made), made.fd
        else:
            pin.users += 1
            fd = pin.fd if pin.fd >= 0 and _same_file(pin.fd, download.fd) else os.dup(download.fd)
        handle = self._register(node, fd, pin)
        handle.download, handle.keep_cache = download, keep_cache
        return handle

    async def _open_truncated(self, node: Node, flags: int) -> OpenFile:
        # The old content is about to be dropped: do not download it.
        async def create() -> Path:
            path = self.cache.path_for(node.url)
            _touch(path)  # (on the loop: see `_pin_and_open`)
            return path

        handle = await self._open_prepared(node, flags, await create(), create)
        await self._make_dirty(handle)
        await self.workers.disk(os.ftruncate, handle.fd, 0)  # (freeing a large file's blocks takes a while)
        node.size = 0
        self._may_stream(handle)
        return handle

    async def create(self, parent: Node, name: str, flags: int, mode: int) -> OpenFile:
        handle = await self._create_any(parent, name, flags, mode)
        handle.backing_id = self.passthrough.assign(handle.entry, handle.fd, self.ns.is_local(parent))
        return self._direct_writes(handle, flags)

    async def _create_any(self, parent: Node, name: str, flags: int, mode: int) -> OpenFile:
        self._check_writable(flags | os.O_CREAT)
        if self.ns.is_local(parent):
            local = os.path.join(parent.url, name)
            fd = await self.workers.metadata(os.open, local, (flags & ~os.O_CREAT) | os.O_CREAT, mode & 0o7777)
            node = await self.ns.lookup(parent, name)
            return self._register(node, fd, None, local=True)
        self.ns.check_new_object(parent, name)
        url = parent.child_url(name)
        self.ns.created(url)
        node = self.ns.table.add(parent, name, Kind.FILE, url)
        node.size, node.etag, node.checked, node.mode = 0, "", time.monotonic(), mode & 0o7777
        path = self.cache.path_for(url)
        await self.writeback.open_writer(url)
        handle = self._register(node, -1, None)
        handle.writer = True
        await self._make_dirty(handle)  # recorded before the file exists: a crash cannot lose it
        handle.pin, handle.fd = await self._pin_and_open(handle.entry, path, os.O_RDWR, True)
        await self.workers.metadata(self.cache.keep_dirty, url)
        if parent.children is not None:
            parent.children[name] = node.inode
        self._may_stream(handle)
        return handle

    # -- data --------------------------------------------------------------------------------------
    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._handles[fh]
        if not handle.url:  # direct access: may be NFS, keep it off the event loop
            return await self.workers.transfer(os.pread, handle.fd, size, offset)
        view = None
        if handle.download is not None and not handle.download.done.is_set():
            try:
                await self.downloads.read(handle.download, offset, size)
            except NoSpace:  # the cache disk cannot take the rest: serve it straight from the server
                return await self.downloads.read_uncached(handle.download, offset, size)
            view = handle.download.view(offset, size)
        if handle.behind is not None:
            self.passthrough.drop_behind(handle.entry, handle.node.inode, handle.behind, offset, size,
                                         handle.node.size)
        return view if view is not None else await self.workers.disk(os.pread, handle.fd, size, offset)

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        handle = self._handles[fh]
        if not handle.url:
            return await self.workers.transfer(os.pwrite, handle.fd, data, offset)
        self._check_not_failed(handle)
        try:
            await self._make_dirty(handle)
            written = await self._with_room(len(data), os.pwrite, handle.fd, data, offset)
        except (OSError, StorageError) as exc:
            await self._poison(handle, exc)
            raise
        handle.node.size = max(handle.node.size, offset + written)
        if handle.appended is not None:
            self._appended(handle, offset, written)
        return written

    async def truncate(self, fh: int, size: int) -> None:
        handle = self._handles[fh]
        if not handle.url:
            await self.workers.transfer(os.ftruncate, handle.fd, size)  # (may be NFS)
            return
        self._check_not_failed(handle)
        try:
            await self._make_dirty(handle)
            if size != handle.appended:
                self._stop_streaming(handle, "truncated")
            await self._with_room(max(0, size - handle.node.size), os.ftruncate, handle.fd, size)
        except (OSError, StorageError) as exc:
            await self._poison(handle, exc)
            raise
        handle.node.size = size

    async def _with_room(self, needed: int, fn: Callable[..., R], *args: object) -> R:
        """`fn(*args)`, a write into a cache file, in a worker thread (a disk that stalls must not stall the
        loop); if the cache disk is full, once more after evicting what nobody uses (`CacheContext.make_room`)."""
        try:
            return await self.workers.disk(fn, *args)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or not await self.workers.metadata(self.cache.make_room, needed):
                raise
        return await self.workers.disk(fn, *args)

    @staticmethod
    def _check_not_failed(handle: OpenFile) -> None:
        if handle.failed:
            raise OSError(handle.failed, "an earlier write to this file failed; nothing of it was uploaded")

    async def _poison(self, handle: OpenFile, exc: BaseException) -> None:
        """A write into `handle`'s cache file failed: the file now holds part of what its writers meant. Every
        writer of it fails from now on, its upload while written is aborted, nothing is uploaded, and the
        cached copy is dropped (the server's object, untouched, is the content again)."""
        log.error("%s: a write failed (%s): nothing written through this file is uploaded", handle.url, exc)
        code = to_errno(exc)
        handle.entry.failed()
        for other in handle.entry.handles:
            if other.writer:
                other.failed, other.dirty = other.failed or code, False
                self._stop_streaming(other, "a write failed")
        if handle.entry.unlinked:
            return  # (its cache file and state went with its name)
        await self.writeback.discard(handle.url)
        node = handle.node
        node.checked, node.kernel_etag = 0.0, ""  # the next open asks the server again
        if not node.etag:  # never uploaded: it does not exist any more, for the kernel's lookups too
            self.ns.table.remove(node)
            pyfuse3.invalidate_entry_async(node.parent, os.fsencode(node.name), ignore_enoent=True)

    async def _make_dirty(self, handle: OpenFile) -> None:
        if handle.entry.unlinked:  # written to a file that no longer has a name: nothing to record or upload
            handle.dirty = True
            return
        if not handle.dirty:
            # Another writer: the file is no longer what a streaming handle wrote. Stopped before the dirty
            # version moves, so a stream that still completes is seen as older than this write.
            for other in self._others(handle):
                self._stop_streaming(other, "another writer")
            await self.writeback.mark_dirty(handle.url, handle.node.mode)
            handle.dirty = True

    # -- uploading while written (a new or truncated file, written in order from its first byte) ---------
    def _may_stream(self, handle: OpenFile) -> None:
        if handle.entry.unlinked:
            return
        threshold = self.writeback.stream_threshold(handle.url)
        alone = not any(h.dirty for h in self._others(handle))
        if threshold is not None and alone:
            handle.appended, handle.stream_from = 0, threshold

    def _appended(self, handle: OpenFile, offset: int, written: int) -> None:
        """Feed the streaming upload with an append; anything but an append stops it."""
        if offset != handle.appended:
            self._stop_streaming(handle, f"write at {offset}, not at the end ({handle.appended})")
            return
        handle.appended += written
        if handle.stream is not None:
            handle.stream.file.grow(handle.appended)
        elif handle.appended >= handle.stream_from:
            handle.stream = self.writeback.start_stream(handle.url, handle.fd, handle.appended)
            if handle.stream is None:  # too many at once, or unmounting: uploaded at flush, as usual
                handle.appended = None

    @staticmethod
    def _stop_streaming(handle: OpenFile, reason: str) -> None:
        """From now on `handle`'s file is uploaded whole at flush; an upload started meanwhile is aborted
        (and kept on the handle, so that flush waits until the SDK has aborted it on the server too)."""
        if handle.stream is not None and handle.appended is not None:
            log.debug("%s: not uploaded while written any more: %s", handle.url, reason)
            handle.stream.file.abort(reason)
        handle.appended = None

    # -- flush / release ---------------------------------------------------------------------------
    async def flush(self, fh: int) -> None:
        """Upload a dirty file; failure (after the backend's retries) reaches close(2) as EIO, and an upload
        that stops moving as ETIMEDOUT (it goes on in the background)."""
        handle = self._handles[fh]
        if not handle.url:
            return
        if handle.failed:
            await self._end_stream(handle, "a write failed")
            self._check_not_failed(handle)
        if handle.entry.unlinked:  # its name is gone: what it wrote dies with its last handle
            await self._end_stream(handle, "unlinked")
            handle.dirty = False
            return
        if not handle.dirty:
            return
        # A streaming upload ends here with what was written so far; if the handle goes on appending, the
        # next part of the file starts a new one (from byte 0: an object cannot be appended to).
        stream, handle.stream = handle.stream, None
        try:
            info = await self.writeback.upload(handle.entry, handle.fd, stream)
        except StorageError as exc:
            log.error("upload of %s failed: %s (kept in the cache, will retry)", handle.url, exc)
            # EIO, whatever the cause (as close(2) reports a failed write-back); a stalled one says so.
            raise OSError(errno.ETIMEDOUT if isinstance(exc, TimedOut) else errno.EIO, str(exc)) from None
        handle.dirty = False
        # The page cache holds exactly what was uploaded, unless the writes bypassed it.
        handle.node.kernel_etag = "" if handle.direct_io else info.etag
        self.ns.set_object(handle.node, info)

    async def fsync(self, fh: int) -> None:
        handle = self._handles[fh]
        if not handle.url:
            await self.workers.transfer(os.fsync, handle.fd)
            return
        await self.flush(fh)

    async def _end_stream(self, handle: OpenFile, reason: str) -> None:
        """Abort `handle`'s stream, and wait (within the operation budget) until it has aborted its upload on the
        server too, so that a failed close leaves no unfinished multipart upload behind."""
        stream, handle.stream, handle.appended = handle.stream, None, None
        if stream is not None:
            stream.file.abort(reason)
            with trio.move_on_after(self.workers.timeouts.operation):
                await stream.done.wait()

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        entry = handle.entry
        self._stop_streaming(handle, "closed")  # only without a flush (which ends the stream) before
        if handle.writer:
            self.writeback.close_writer(entry)
        self.passthrough.release(entry, handle.node.inode, handle.backing_id, handle.behind)
        try:
            if not handle.shared_fd:
                await self._let_go(handle.fd, functools.partial(os.close, handle.fd))
            if handle.download is not None:
                # Its last ranges checked the version as a stat would: a re-open right after needs no stat.
                self.ns.confirm(handle.node, handle.download.info.etag, handle.download.confirmed)
                await self.downloads.detach(handle.download)
                if handle.download.published:
                    handle.node.cached_etag = handle.download.info.etag
        finally:
            if handle.pin is not None:
                await self._unpin(entry, handle.pin)
            # (a handle still dirty here failed its flush: the writeback loop retries from the cache file)
            entry.handles.remove(handle)
            self.entries.release(entry)


def _share(pin: Pin, path: Path, flags: int, create: bool) -> int:
    """The pin's descriptor, if it is of the file at `path` and open for `flags`; else one of our own (the pin
    is by entry name: a newer version of the file, or a writer of a file pinned by readers, needs its own)."""
    if not create and pin.fd >= 0 and (flags == os.O_RDONLY or pin.writable) and _same_file(pin.fd, path):
        return pin.fd
    return _open_pinned(path, flags, create)


def _same_file(fd: int, other: int | Path) -> bool:
    inode = os.fstat(other).st_ino if isinstance(other, int) else inode_of(other)
    return os.fstat(fd).st_ino == inode


def _open_pinned(path: Path, flags: int, create: bool) -> int:
    fd = open_cache_file(path, flags, create)
    if not create and not _same_file(fd, path):  # evicted (or replaced) between pin and open
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "evicted from the cache while being opened", str(path))
    return fd


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
