"""Uploading a new file while it is still being written, so that close() waits only for its last parts.

A file created (or truncated) through the mount and written from its first byte onwards is handed, once it
passes the backend's multipart threshold, to the SDK's transfer manager as a non-seekable stream: `GrowingFile`
gives it the bytes written so far and blocks its reading thread until there are more, or until flush says the
file is complete. Any other pattern (a write elsewhere, a truncate, a second writer) aborts the stream; the
SDK then aborts its multipart upload, and flush uploads the whole file as it does without streaming.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

import trio

from ..backends import ObjectInfo
from ..backends.base import ReaderAbandoned
from .workers import Watch


class StreamAborted(ReaderAbandoned):
    """Raised into the SDK's reading thread so that it abandons (and aborts) the multipart upload."""


class GrowingFile:
    """A read-only, non-seekable view of the first `size` bytes of a file a writer is still appending to.

    Read by one SDK thread; `grow`, `finish` and `abort` are called from the trio thread.
    """

    def __init__(self, fd: int, size: int, limit: int | None = None) -> None:
        self._fd = fd  # our own descriptor: the writer may close its handle before the SDK is done
        self._size, self._pos, self._limit = size, 0, limit
        self._finished = False  # flush: no more bytes will come
        self._ended = False  # the SDK was given the end of the file: it completes the upload now
        self._aborted = ""
        self._cond = threading.Condition()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # so the SDK reads it in order, part by part, without asking for its size

    def read(self, size: int = -1) -> bytes:
        """`size` bytes (fewer only at the end): a short read would make a part smaller than S3 accepts."""
        with self._cond:
            self._cond.wait_for(lambda: self._aborted or self._finished or 0 <= size <= self._size - self._pos)
            if self._aborted:
                raise StreamAborted(self._aborted)
            left = self._size - self._pos
            count = left if size < 0 else min(size, left)
            if count == 0:
                self._ended = True
                return b""
        data = os.pread(self._fd, count, self._pos)
        if len(data) != count:  # cannot happen unless the file was cut behind our back
            raise StreamAborted(f"read {len(data)} of {count} bytes at {self._pos}")
        self._pos += count
        self._drop_behind()
        return data

    def _drop_behind(self) -> None:
        """Let the kernel write what the SDK has read to disk, and drop it from the page cache once written.

        The SDK holds each part in memory until it is sent, and the cache file keeps it on disk. In the page
        cache it would only sit, dirty, until the kernel's writeback (30 s later): a GiB of memory per GiB
        written, pushing out the pages of files being read. Dropped, its memory is reused for the next parts.
        That matters more on VMs that return freed memory to the host (virtio-balloon free page reporting, as
        on the development machine), where the first touch of a page the host took back costs far more than
        the copy into it: 1 GiB written into a new file took 1.1 CPU-s ten seconds after memory was freed,
        0.2 s right after. POSIX_FADV_DONTNEED starts writeback of the range's dirty pages and drops only the
        clean ones (written back since an earlier call): data not on disk yet is never dropped.
        """
        with contextlib.suppress(OSError):  # advice: a cache folder whose filesystem will not take it keeps its pages
            os.posix_fadvise(self._fd, 0, self._pos, os.POSIX_FADV_DONTNEED)

    def grow(self, size: int) -> None:
        """The writer has appended up to `size` bytes."""
        if self._limit is not None and size > self._limit:
            self.abort(f"larger than {self._limit} bytes")
            return
        with self._cond:
            self._size = size
            self._cond.notify()

    def finish(self) -> bool:
        """No more bytes: the SDK uploads the last part and completes. False if already aborted."""
        with self._cond:
            if self._aborted:
                return False
            self._finished = True
            self._cond.notify()
            return True

    def abort(self, reason: str) -> bool:
        """Make the SDK abandon the upload; False if it already has the whole file (too late to stop it)."""
        with self._cond:
            if self._ended:
                return False
            self._aborted = self._aborted or reason
            self._cond.notify()
            return True

    def close(self) -> None:
        os.close(self._fd)


@dataclass(eq=False)
class Stream:
    """One streaming upload, owned by the file handle that feeds it."""

    url: str
    file: GrowingFile
    watch: Watch = field(default_factory=Watch)  # ticked as its parts are sent
    done: trio.Event = field(default_factory=trio.Event)
    info: ObjectInfo | None = None  # set when the object is complete on the server
