"""Open files: a cache file (or, for direct access, the original file) behind each file handle.

Opening an object fetches it into the managed cache (unless a current copy is
there) and pins the entry against eviction while it is open. Writes go to the
cache file; `flush` uploads a dirty file so `close(2)` reports the result.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..backends import ObjectInfo
from ..cache import CacheContext, Pin
from ..errors import ReadOnly, StorageError
from .inodes import Kind, Node
from .namespace import Namespace
from .stream import Download, Downloads
from .workers import Workers
from .writeback import WriteBack, fd_path

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


@dataclass
class OpenFile:
    fh: int
    node: Node
    fd: int
    url: str  # '' for a direct-access file
    pin: Pin | None
    dirty: bool = False
    download: Download | None = None  # set while the object is still streaming in
    keep_cache: bool = False  # the kernel's page cache for this inode still holds this content


class OpenFiles:
    def __init__(
        self, ns: Namespace, cache: CacheContext, workers: Workers, writeback: WriteBack, downloads: Downloads,
        read_only: bool = False,
    ) -> None:
        self.ns, self.cache, self.workers, self.writeback = ns, cache, workers, writeback
        self.downloads = downloads
        self.read_only = read_only
        self._handles: dict[int, OpenFile] = {}
        self._fh = itertools.count(1)

    def _register(self, node: Node, fd: int, url: str, pin: Pin | None) -> OpenFile:
        handle = OpenFile(next(self._fh), node, fd, url, pin)
        self._handles[handle.fh] = handle
        return handle

    def _check_writable(self, flags: int) -> None:
        if self.read_only and flags & (WRITE_FLAGS | os.O_TRUNC | os.O_CREAT):
            raise ReadOnly("read-only mount")

    # -- open / create -----------------------------------------------------------------------------
    async def open(self, node: Node, flags: int) -> OpenFile:
        self._check_writable(flags)
        mode_flags = flags & (os.O_ACCMODE | os.O_TRUNC | os.O_APPEND)
        if self.ns.is_local(node):
            fd = await self.workers.metadata(os.open, node.url, mode_flags)
            return self._register(node, fd, "", None)
        if node.kind is not Kind.FILE:
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        writable = bool(flags & WRITE_FLAGS)
        if writable and flags & os.O_TRUNC:
            return await self._open_truncated(node, flags)
        await self.ns.refresh(node)
        backend, key = self.ns.locate(node)
        info = ObjectInfo(key, node.size, node.mtime, node.etag)
        keep_cache = bool(node.etag) and node.kernel_etag == node.etag
        node.kernel_etag = node.etag
        path = await self.workers.metadata(self.cache.lookup, node.url, info)
        if path is None and not writable:
            download = await self.downloads.attach(node.url, backend, info)
            if download is not None:
                return self._streaming(node, download, keep_cache)
        if path is None:  # to write into it, or while another process downloads it: the whole file first
            path = await self.workers.transfer(self.cache.fetch, node.url, backend, key, info)
        handle = self._open_cached(node, path, flags)
        handle.keep_cache = keep_cache
        return handle

    def _open_cached(self, node: Node, path: Path, flags: int) -> OpenFile:
        pin = self.cache.pin(path)
        try:
            fd = os.open(path, os.O_RDWR if flags & WRITE_FLAGS else os.O_RDONLY)
        except OSError:
            pin.release()
            raise
        return self._register(node, fd, node.url, pin)

    def _streaming(self, node: Node, download: Download, keep_cache: bool) -> OpenFile:
        # Pinned under the entry's final name: it is renamed into place once complete.
        pin = self.cache.pin(self.cache.path_for(node.url))
        handle = self._register(node, os.dup(download.fd), node.url, pin)
        handle.download, handle.keep_cache = download, keep_cache
        return handle

    async def _open_truncated(self, node: Node, flags: int) -> OpenFile:
        # The old content is about to be dropped: do not download it.
        path = self.cache.path_for(node.url)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        handle = self._open_cached(node, path, flags)
        await self._make_dirty(handle)
        os.ftruncate(handle.fd, 0)
        node.size = 0
        return handle

    async def create(self, parent: Node, name: str, flags: int, mode: int) -> OpenFile:
        self._check_writable(flags | os.O_CREAT)
        if self.ns.is_local(parent):
            path = os.path.join(parent.url, name)
            fd = await self.workers.metadata(os.open, path, (flags & ~os.O_CREAT) | os.O_CREAT, mode & 0o7777)
            node = await self.ns.lookup(parent, name)
            return self._register(node, fd, "", None)
        self.ns.check_new_object(parent, name)
        url = parent.child_url(name)
        self.ns.created(url)
        node = self.ns.table.add(parent, name, Kind.FILE, url)
        node.size, node.etag, node.checked = 0, "", time.monotonic()
        path = self.cache.path_for(url)
        handle = self._register(node, -1, url, None)
        await self._make_dirty(handle)  # recorded before the file exists: a crash cannot lose it
        handle.pin = self.cache.pin(path)
        handle.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if parent.children is not None:
            parent.children[name] = node.inode
        return handle

    # -- data --------------------------------------------------------------------------------------
    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles[fh]
        if not handle.url:  # direct access: may be NFS, keep it off the event loop
            return await self.workers.transfer(os.pread, handle.fd, size, offset)
        if handle.download is not None and not handle.download.done.is_set():
            await self.downloads.read(handle.download, offset, size)
        return os.pread(handle.fd, size, offset)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handles[fh]
        if not handle.url:
            return await self.workers.transfer(os.pwrite, handle.fd, data, offset)
        await self._make_dirty(handle)
        written = os.pwrite(handle.fd, data, offset)
        handle.node.size = max(handle.node.size, offset + written)
        return written

    async def truncate(self, fh: int, size: int) -> None:
        handle = self._handles[fh]
        if handle.url:
            await self._make_dirty(handle)
        os.ftruncate(handle.fd, size)
        handle.node.size = size

    async def _make_dirty(self, handle: OpenFile) -> None:
        if not handle.dirty:
            await self.writeback.mark_dirty(handle.url)
            handle.dirty = True
            self.writeback.busy.add(handle.url)

    # -- flush / release ---------------------------------------------------------------------------
    async def flush(self, fh: int) -> None:
        """Upload a dirty file; failure (after the backend's retries) reaches close(2) as EIO."""
        handle = self._handles[fh]
        if not handle.url:
            return
        if not handle.dirty:
            return
        try:
            info = await self.writeback.upload(handle.url, fd_path(handle.fd))
        except StorageError as exc:
            log.error("upload of %s failed: %s (kept in the cache, will retry)", handle.url, exc)
            raise OSError(errno.EIO, str(exc)) from None
        handle.dirty = False
        handle.node.kernel_etag = info.etag  # the page cache holds exactly what was uploaded
        if not any(h.dirty and h.url == handle.url for h in self._handles.values()):
            self.writeback.busy.discard(handle.url)
        self.ns.set_object(handle.node, info)

    async def fsync(self, fh: int) -> None:
        handle = self._handles[fh]
        if not handle.url:
            await self.workers.transfer(os.fsync, handle.fd)
            return
        await self.flush(fh)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        os.close(handle.fd)
        if handle.download is not None:
            await self.downloads.detach(handle.download)
        if handle.pin is not None:
            handle.pin.release()
        if handle.dirty and not any(h.dirty and h.url == handle.url for h in self._handles.values()):
            # flush failed; the writeback loop keeps retrying from the cache file
            self.writeback.busy.discard(handle.url)
