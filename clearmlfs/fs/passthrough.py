"""Kernel passthrough: the kernel reads a complete local file itself, with no request per read.

Since Linux 6.9 a FUSE server may name a "backing file" when it answers an open; the kernel then reads
and maps that file directly, from the backing file's own page cache. A hot re-read through the FUSE page
cache runs at about half the speed of a local file (FUSE caches in 4 KiB pages, ext4 and xfs in large
folios), and every cold read is a request to this daemon; a passthrough read costs what a local read costs.

While an inode is open the kernel keeps it in one I/O mode (fs/fuse/iomode.c): cached (the FUSE page
cache) or passthrough, with one backing file for all of its opens. An open answered in another mode fails
with EIO. So this module counts the opens of each inode, and answers:
- passthrough, for a read-only open of a complete cached file or any open of a direct-access file, unless
  the inode has cached-mode opens;
- passthrough on the same backing file, for any read-only open while the inode has passthrough opens,
  even when a newer version of the object has arrived meanwhile: it reads the version already open;
- ETXTBSY, for a writable open of an object while the inode has passthrough opens (the kernel would send
  its writes to the backing file, past the daemon, so nothing would upload them); a direct-access file's
  writers, whose writes belong in that file, are passthrough opens like its readers;
- cached mode otherwise, as without passthrough.
A write-only open bypasses the page cache (FOPEN_DIRECT_IO, files.py), which the kernel allows beside
cached-mode opens but not beside passthrough ones; it is counted as a cached-mode open here, so that no
reader passes through to a file still being written.
Our counts can lag the kernel's (RELEASE reaches us after close(2) has returned), never lead them, so a
doubt always ends in an answer the kernel accepts.

A passthrough open makes the kernel drop the inode's FUSE page cache first: ~110 ms for a GiB read in
cached mode while it streamed in. So, with passthrough on, a sequential cached-mode read drops the pages
it leaves behind as it goes (`DropBehind`), and the last such open drops the rest when it is released:
the object is then cached once, in its cache file, instead of twice, and the next open is quick.

Needs pyfuse3 built with scripts/pyfuse3-passthrough.patch against libfuse >= 3.16 (scripts/setup.sh
does both), a kernel that offers passthrough, and CAP_SYS_ADMIN; without them every open is as before.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import platform
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from .entries import Backing, Entries, Entry
from .stream import TaskHost

log = logging.getLogger(__name__)

# _IOW(229, 1, struct fuse_backing_map {s32 fd; u32 flags; u64 padding}) and _IOW(229, 2, u32), linux/fuse.h
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
# Drop-behind: kept well behind the kernel's read-ahead (4 MiB by default), which runs ahead of what the
# reader has consumed; dropped in steps, each a request to the kernel.
DROP_MARGIN = 16 * 1024 * 1024
DROP_STEP = 16 * 1024 * 1024


@dataclass
class DropBehind:
    """Where one open file is in its sequential run of reads."""

    start: int = 0  # where the run began (a read far from it begins another)
    end: int = 0  # the furthest byte it read
    dropped: int = 0  # its pages before this offset have been dropped
    tail: int = -1  # where the read of the file's last bytes began

    def advance(self, offset: int, size: int, file_size: int) -> None:
        if not self.start - DROP_MARGIN <= offset <= self.end + DROP_MARGIN:
            self.start = self.end = self.dropped = offset  # a jump: pages before it may be read again
            self.tail = -1
        self.end = max(self.end, offset + size)
        if offset + size >= file_size:
            self.tail = offset

    def due(self) -> tuple[int, int] | None:
        """The (offset, length) of the pages to drop now, if any. At the end of the file, all that the
        run read before its last request: the file is about to be closed, and then opened again."""
        if self.tail > self.dropped:
            return self.dropped, self.tail - self.dropped
        upto = self.end - DROP_MARGIN
        return (self.dropped, upto - self.dropped) if upto - self.dropped >= DROP_STEP else None


def pyfuse3_supports() -> bool:
    """Whether this pyfuse3 passes backing files on (the patched build scripts/setup.sh makes)."""
    return hasattr(pyfuse3, "session_fd_number") and hasattr(pyfuse3.FileInfo(), "backing_id")


def kernel_supports() -> bool:
    """Whether this kernel is recent enough for FUSE passthrough (6.9; a mount still asks it: `probe`)."""
    found = re.match(r"(\d+)\.(\d+)", platform.release())  # "6.18.44-fc", "6.9-rc1"
    return found is not None and (int(found[1]), int(found[2])) >= (6, 9)


def write_views_supported() -> bool:
    """Whether this pyfuse3 hands `write` a view of libfuse's buffer (scripts/pyfuse3-write-views.patch)."""
    return hasattr(pyfuse3.Operations, "write_views")


def parallel_lookups_supported() -> bool:
    """Whether this pyfuse3 asks for lookups of one folder at once (scripts/pyfuse3-parallel-dirops.patch)."""
    return hasattr(pyfuse3.Operations, "enable_parallel_dirops")


def readdir_cache_supported() -> bool:
    """Whether this pyfuse3 lets opendir have the kernel cache readdir (scripts/pyfuse3-readdir-cache.patch)."""
    return hasattr(pyfuse3.Operations, "readdir_cache")


def capabilities() -> str:
    """What this installation can do, in one line (`clearmlfs config`)."""
    passthrough = "on" if pyfuse3_supports() and kernel_supports() else "off ({})".format(
        "this kernel is older than 6.9" if pyfuse3_supports() else "stock pyfuse3: scripts/setup.sh builds one")
    on = {True: "on", False: "off"}
    return (f"kernel passthrough {passthrough}; write views {on[write_views_supported()]}; "
            f"parallel lookups {on[parallel_lookups_supported()]}; listings cached by the kernel "
            f"{on[readdir_cache_supported()]}")


class Passthrough(TaskHost):
    """Which opens the kernel serves itself. The state is the object's entry's: its backing while passthrough
    opens exist, its count of cached-mode opens, whether a drop of its pages is under way."""

    def __init__(self, wanted: bool, folder: Path, entries: Entries) -> None:
        self.enabled = wanted and pyfuse3_supports()
        self._off = "" if self.enabled else "passthrough=off" if not wanted else (
            "this pyfuse3 cannot pass backing files on; scripts/setup.sh builds one that can")
        self.folder = folder  # where backing files live (the cache), for `probe`
        self.entries = entries

    def open_writer(self, entry: Entry) -> None:
        """A writable open of `entry`'s inode begins: counted in cached mode from now on, so that no passthrough
        open starts while it is being prepared (`release(entry, inode, 0)` ends it). ETXTBSY while the inode
        is open in passthrough mode."""
        if entry.backing is not None:
            raise OSError(errno.ETXTBSY, "open for reading through kernel passthrough; close those first")
        entry.cached_opens += 1

    def assign(self, entry: Entry, fd: int, eligible: bool) -> int:
        """The backing id for a new open of `entry`'s inode whose local file is `fd` (0: cached mode);
        `eligible`: the kernel may use `fd`'s file itself (read-only and complete, or a direct-access file)."""
        backing = entry.backing
        if backing is None and eligible and self.enabled and not entry.cached_opens:
            backing_id = self._backing_id(fd)
            if backing_id:
                backing = entry.backing = Backing(backing_id)
        if backing is None:
            entry.cached_opens += 1
            return 0
        backing.users += 1
        return backing.id

    def probe(self) -> None:
        """Ask the kernel, once the mount answers, whether it takes backing files at all: otherwise
        drop-behind would empty the FUSE page cache that every later read depends on."""
        if self.enabled:
            try:
                with tempfile.TemporaryFile(dir=self.folder) as probe:
                    backing_id = self._backing_id(probe.fileno())
            except OSError as exc:  # no probe; the first open finds out instead
                log.debug("passthrough probe in %s: %s", self.folder, exc)
                backing_id = 0
            if backing_id:
                self._close(backing_id)
        log.info("kernel passthrough %s", "on" if self.enabled else f"off ({self._off})")

    def release(self, entry: Entry, inode: int, backing_id: int, behind: DropBehind | None = None) -> None:
        """An open file of `entry`'s `inode` is released; `behind`: its drop-behind, if it read in cached mode."""
        if not backing_id:
            entry.cached_opens -= 1
            if not entry.cached_opens and behind is not None and behind.end:
                self._drop(entry, inode, 0, 0)  # the rest of its pages: the next open may be a passthrough one
        else:
            backing = entry.backing
            assert backing is not None and backing.id == backing_id
            backing.users -= 1
            if not backing.users:
                entry.backing = None
                self._close(backing.id)
        self.entries.release(entry)

    def drop_behind(
        self, entry: Entry, inode: int, behind: DropBehind, offset: int, size: int, file_size: int
    ) -> None:
        """A cached-mode read of `size` bytes at `offset`: drop the FUSE pages it left behind."""
        behind.advance(offset, size, file_size)
        span = behind.due()
        if span is not None and self._drop(entry, inode, *span):
            behind.dropped = sum(span)

    def _drop(self, entry: Entry, inode: int, offset: int, length: int) -> bool:
        """Drop `inode`'s cached pages in the background; False if a drop is still running."""
        if entry.dropping or self.nursery is None:
            return False
        entry.dropping = True
        self.nursery.start_soon(self._dropped, entry, inode, offset, length)
        return True

    async def _dropped(self, entry: Entry, inode: int, offset: int, length: int) -> None:
        try:  # in a thread: the kernel waits for pages being read, which this loop answers
            # (the patched pyfuse3's; the stock one's stub lacks it, and then passthrough is off)
            drop = pyfuse3.invalidate_inode_range  # type: ignore[attr-defined, unused-ignore]
            await trio.to_thread.run_sync(drop, inode, offset, length)
        except OSError as exc:  # ENOENT: the kernel forgot the inode meanwhile
            log.debug("dropping cached pages of inode %d: %s", inode, exc)
        finally:
            entry.dropping = False
            self.entries.release(entry)

    def _backing_id(self, fd: int) -> int:
        """A backing id for `fd`'s file; 0 if the kernel refuses it (and, if it refuses every file, from
        now on passthrough is off)."""
        try:
            return self._ioctl(FUSE_DEV_IOC_BACKING_OPEN, struct.pack("iIQ", fd, 0, 0))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP):  # not offered by this kernel/mount
                self.enabled = False
                self._off = f"the kernel refuses backing files: {exc}; cached files are read through FUSE"
                log.info("kernel passthrough %s", self._off)
            else:  # e.g. ELOOP: this file is on a filesystem stacked too deep
                log.debug("no passthrough for fd %d: %s", fd, exc)
            return 0

    def _close(self, backing_id: int) -> None:
        try:  # the kernel keeps its own reference while a file is open on it: this only frees the id
            self._ioctl(FUSE_DEV_IOC_BACKING_CLOSE, struct.pack("I", backing_id))
        except OSError as exc:
            log.debug("closing backing file %d: %s", backing_id, exc)

    @staticmethod
    def _ioctl(request: int, arg: bytes) -> int:
        # A mutable buffer with mutate_flag: fcntl.ioctl returns the ioctl's own result (the backing id).
        session_fd = pyfuse3.session_fd_number()  # type: ignore[attr-defined, unused-ignore] # (patched pyfuse3)
        result: int = fcntl.ioctl(session_fd, request, bytearray(arg), True)
        return result
