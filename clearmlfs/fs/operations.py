"""pyfuse3 Operations: one method per request, translating to the namespace and open files.

Every handler goes through `_errors`: clearmlfs errors and OSErrors become their
errno (one table, in errors.py); anything unexpected is logged and becomes EIO,
because any other exception escaping a handler would end the whole mount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from ..backends import ObjectInfo
from ..errors import ClearmlfsError, Unsupported, to_errno
from .files import OpenFile, OpenFiles
from .inodes import Kind, Node
from .namespace import Namespace, listable
from .passthrough import readdir_cache_supported

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
BLOCK_SIZE = 1024 * 1024
XATTR_URL, XATTR_ETAG, XATTR_CACHED = b"user.clearml.url", b"user.clearml.etag", b"user.clearml.cached"
XATTRS = (XATTR_URL, XATTR_ETAG, XATTR_CACHED)  # st_blksize: tools like cp size their buffers by it


def _errors(fn: F) -> F:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic() if log.isEnabledFor(logging.DEBUG) else 0.0
        try:
            result = await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            _outcome(name, args, started, errno.errorcode.get(exc.errno, str(exc.errno)))
            raise
        except (ClearmlfsError, OSError) as exc:
            code = to_errno(exc)
            level = logging.DEBUG if code in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY) else logging.WARNING
            log.log(level, "%s: %s", name, exc)
            _outcome(name, args, started, errno.errorcode.get(code, str(code)))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s", name)
            _outcome(name, args, started, "EIO")
            raise pyfuse3.FUSEError(errno.EIO) from None
        _outcome(name, args, started, "ok")
        return result

    return wrapper  # type: ignore[return-value]


def _outcome(name: str, args: tuple[Any, ...], started: float, result: str) -> None:
    """At debug level: one line per FUSE request, with its arguments, its outcome and its time."""
    if started:
        data = name == "write"  # its bytes are the user's data, not a name: only their count is shown
        shown = ", ".join(_shown(a, data) for a in args[1:])  # (args[0] is the Operations instance)
        log.debug("%s(%s) -> %s, %.1f ms", name, shown, result, (time.monotonic() - started) * 1000)


def _shown(value: Any, data: bool) -> str:
    if isinstance(value, memoryview) or isinstance(value, bytes) and (data or len(value) > 255):
        return f"<{len(value)} bytes>"
    if isinstance(value, bytes):
        return repr(os.fsdecode(value))  # a name
    if isinstance(value, (int, str)):
        return str(value)
    return type(value).__name__


def _name(raw: bytes) -> str:
    # surrogateescape keeps non-UTF-8 local names intact; the namespace refuses them as object keys.
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    # The patched pyfuse3 (scripts/pyfuse3-write-views.patch) hands `write` a view of libfuse's buffer, not a
    # copy: valid until `write` returns, which `OpenFiles.write` never outlives (it writes before returning).
    write_views = True
    # And sends lookups and readdirs of one folder at once (scripts/pyfuse3-parallel-dirops.patch): otherwise the
    # kernel sends them one at a time, and 4 readers opening files of one folder wait for each other's HEADs.
    enable_parallel_dirops = True
    # And lets opendir ask the kernel to cache what readdir returns (scripts/pyfuse3-readdir-cache.patch).
    readdir_cache = True

    def __init__(self, ns: Namespace, files: OpenFiles, ttl: float = 1.0) -> None:
        super().__init__()
        self.ns, self.files, self.ttl = ns, files, ttl
        self.enable_passthrough = files.passthrough.enabled  # read by the patched pyfuse3's init
        self.uid, self.gid = os.getuid(), os.getgid()
        self._dirs: dict[int, tuple[Node, list[Node]]] = {}  # fh → (the folder, its entries)
        self._dir_fh = itertools.count(1)
        self._cache_readdir = readdir_cache_supported()
        self._dir_cached: dict[int, float] = {}  # folder inode → `listed` of the listing the kernel caches

    # -- attributes --------------------------------------------------------------------------------
    async def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.generation = node.inode, 0
        a.entry_timeout = a.attr_timeout = self.ttl
        a.st_uid, a.st_gid, a.st_blksize = self.uid, self.gid, BLOCK_SIZE
        if self.ns.is_local(node):
            st = await self.ns.workers.metadata(os.stat, node.url)
            a.st_mode, a.st_nlink, a.st_size = st.st_mode, st.st_nlink, st.st_size
            a.st_uid, a.st_gid = st.st_uid, st.st_gid
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
            a.st_blocks = st.st_blocks
            return a
        if node.kind is Kind.FILE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | (0o644 if node.mode is None else node.mode), 1, node.size
            node.kernel_size = node.size
            if not node.attrs_known and self.ns.stored_times:
                a.attr_timeout = 0  # only a listing told of it: its stored times take a getattr to learn
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return await self._attributes(node)

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(await self.ns.lookup(self.ns.table[parent_inode], _name(name)))

    @_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attributes(await self._current(self.ns.table[inode]))

    async def _current(self, node: Node) -> Node:
        if node.kind is Kind.FILE and self.ns.entries.pending(node.url):
            await self.ns.refresh(node)  # its cache file's size and mtime are the file's
        return await self.ns.with_attrs(node, ahead=True)  # (a readdirplus reply handed out expired ones)

    @_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.ns.table[inode]
        if self.ns.is_local(node):
            await self.ns.workers.metadata(_apply_local, node.url, attr, fields)
        else:
            if fields.update_size:
                await self._truncate(node, attr.st_size, fh)
            # Owner and atime are not stored (one owner per mount; atime would make every read a write). A
            # truncate comes with mtime "now", which the truncation has set already.
            mtime_ns = attr.st_mtime_ns if fields.update_mtime and not fields.update_size else None
            await self.ns.change_attrs(node, mtime_ns, stat.S_IMODE(attr.st_mode) if fields.update_mode else None)
        return await self._attributes(await self._current(node))

    async def _truncate(self, node: Node, size: int, fh: int | None) -> None:
        if fh is not None:
            await self.files.truncate(fh, size)
            return
        handle = await self.files.open(node, os.O_RDWR | (os.O_TRUNC if size == 0 else 0))
        try:
            await self.files.truncate(handle.fh, size)
            await self.files.flush(handle.fh)
        finally:
            await self.files.release(handle.fh)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.ns.table.forget(inode, count, self.ns.local_changes)
            if self.ns.table.get(inode) is None:
                self._dir_cached.pop(inode, None)  # (the kernel's inode, and its cached readdir, are gone too)

    # -- directories -------------------------------------------------------------------------------
    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        node = self.ns.table[inode]
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._dir_fh)
        self._dirs[fh] = (node, await self.ns.listdir(node))  # a snapshot: offsets stay valid while it is read
        self.ns.listed_by_client(node)
        if not (self._cache_readdir and node.kind in (Kind.BUCKET, Kind.DIR) and listable(node.url)):
            return fh  # (what a web server's folder shows grows with lookups; a local one changes under us)
        # The kernel keeps what readdir returns, and answers the next opendir from it while the listing it was
        # filled from is still the one held: a warm `find` costs no readdir. A newer listing drops it.
        keep = self._dir_cached.get(inode) == node.listed
        self._dir_cached[inode] = node.listed
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder, entries = self._dirs[fh]
        dots = [(b".", folder), (b"..", self.ns.table.get(folder.parent) or folder)]
        for index in range(start_id, len(entries) + len(dots)):
            # "." and ".." first; the kernel takes no reference to them (a readdirplus reply links neither)
            name, node = dots[index] if index < len(dots) else (None, entries[index - len(dots)])
            reply = name if name is not None else os.fsencode(node.name)
            if not pyfuse3.readdir_reply(token, reply, await self._attributes(node), index + 1):
                return
            if name is None:
                self.ns.table.revive(node).lookups += 1  # readdirplus: the kernel now holds a reference

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        return await self._entry(await self.ns.mkdir(self.ns.table[parent_inode], _name(name)))

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        await self.ns.rmdir(self.ns.table[parent_inode], _name(name))

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        await self.ns.unlink(self.ns.table[parent_inode], _name(name))

    @_errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise Unsupported("RENAME_EXCHANGE")
        await self.ns.rename(
            self.ns.table[parent_inode_old], _name(name_old), self.ns.table[parent_inode_new], _name(name_new),
            replace=not flags & pyfuse3.RENAME_NOREPLACE,
        )

    # Objects have no links, devices or fifos: refused as a filesystem without them refuses them.
    @_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- files -------------------------------------------------------------------------------------
    @_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.ns.table[inode]
        handle = await self.files.open(node, flags)
        if node.kind is Kind.FILE and node.kernel_size not in (-1, node.size):
            # The object changed since the kernel's lookup: the size it holds would cut reads short (or run
            # them past the end). Attributes only: no lock is involved, so this is safe inside a request.
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(inode, attr_only=True)
            node.kernel_size = -1
        return _file_info(handle)

    @_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle = await self.files.create(self.ns.table[parent_inode], _name(name), flags, mode)
        return _file_info(handle), await self._entry(handle.node)

    @_errors
    async def read(  # type: ignore[override] # pyfuse3 replies with any buffer; its stub says bytes
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        return await self.files.read(fh, off, size)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        return await self.files.write(fh, off, buf)

    @_errors
    async def flush(self, fh: int) -> None:
        await self.files.flush(fh)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.files.fsync(fh)

    @_errors
    async def release(self, fh: int) -> None:
        await self.files.release(fh)

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.ns.workers.metadata(os.statvfs, self.ns.cache.folder)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(data, field, getattr(st, field))
        data.f_namemax = 255
        return data

    # -- extended attributes: where an object comes from, and whether it is cached ----------------------
    @_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.ns.table[inode]
        return [] if self.ns.is_local(node) or node.kind is not Kind.FILE else list(XATTRS)

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.ns.table[inode]
        if self.ns.is_local(node) or node.kind is not Kind.FILE or name not in XATTRS:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if name == XATTR_URL:
            return node.url.encode()
        await self.ns.refresh(node)
        if name == XATTR_ETAG:
            return node.etag.encode()
        info = ObjectInfo(node.url, node.size, node.mtime, node.etag)
        cached = await self.ns.workers.metadata(self.ns.cache.has_current, node.url, info)
        return b"true" if cached else b"false"

    def _writable(self) -> None:
        if self.files.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)


def _file_info(handle: OpenFile) -> pyfuse3.FileInfo:
    info = pyfuse3.FileInfo(fh=handle.fh, keep_cache=handle.keep_cache, direct_io=handle.direct_io)
    if handle.backing_id:  # only a pyfuse3 with passthrough support has the attribute
        info.backing_id = handle.backing_id  # type: ignore[attr-defined, unused-ignore]
    return info


def _apply_local(path: str, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
    if fields.update_size:
        os.truncate(path, attr.st_size)
    if fields.update_mode:
        os.chmod(path, stat.S_IMODE(attr.st_mode))
    if fields.update_uid or fields.update_gid:
        os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
    if fields.update_atime or fields.update_mtime:
        st = os.stat(path)
        atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
        os.utime(path, ns=(atime, mtime))
