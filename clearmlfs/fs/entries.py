"""Entries: everything the mount knows about one object beyond its attributes, in one place, found by URL.

An entry owns its object's lifecycle state (clean, fetching, dirty, uploading, failed), its open handles, its
writers, its lock, its download or small fetch under way, its upload while written, and its kernel passthrough
backing. Every module of the filesystem asks the entry; none keeps its own per-object dict. An entry exists
while something of it is in use or not uploaded, and is dropped as soon as nothing is (`Entries.release`):
memory follows what is in use, not what was ever seen.

The states and their legal transitions are in docs/architecture.md; a transition that is not legal raises
`IllegalTransition` (a bug: the operation that tried it fails with EIO, and the tests fail).
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..cache import Pin
    from .files import OpenFile
    from .small import Walk
    from .stream import Download
    from .upload import Stream

NEGATIVE_LIMIT = 10_000  # names remembered as missing, and URLs warned about, at most


class State(enum.Enum):
    CLEAN = "clean"  # the server's object is the content (the cache may hold a copy of it)
    FETCHING = "fetching"  # clean, and being downloaded into the cache
    DIRTY = "dirty"  # written here and not uploaded yet (recorded durably in the cache state first)
    UPLOADING = "uploading"  # dirty, and its content is being uploaded
    FAILED = "failed"  # a write into its cache file failed: nothing of it may be uploaded


class IllegalTransition(RuntimeError):
    """A change of state the lifecycle does not allow: a bug, never a storage error."""


@dataclass
class Backing:
    """The kernel passthrough backing file of the object's inode, while passthrough opens exist."""

    id: int
    users: int = 0


@dataclass(eq=False)
class Entry:
    url: str
    _dirty: bool = False
    _failed: bool = False
    uploading: bool = False
    fetches: int = 0  # downloads or small fetches under way
    writers: int = 0  # handles open for writing (or being opened): no fetch may replace the cache file
    handles: list[OpenFile] = field(default_factory=list)
    stream: Stream | None = None  # the upload while written
    download: Download | None = None  # the streaming download readers share
    fetching: trio.Event | None = None  # a small fetch under way: set when it ends
    ready: tuple[str, Path] | None = None  # (ETag, cache file) of a small object fetched ahead, not opened yet
    walk: Walk | None = None  # of a folder: where a reader walking its files in name order is
    lock: trio.Lock = field(default_factory=trio.Lock)  # one upload, or fetch into the cache, at a time
    lock_users: int = 0  # holders and waiters of `lock`
    backing: Backing | None = None  # passthrough opens of its inode
    pins: dict[str, Pin] = field(default_factory=dict)  # cache file name → the pin its open handles share
    cached_opens: int = 0  # opens of its inode in cached (not passthrough) mode
    dropping: bool = False  # a drop of its inode's page cache is under way
    unlinked: bool = False  # its name was removed while open: its handles go on, nothing of it is uploaded
    retries: int = 0  # the retry loop's failed uploads of it in a row
    retry_at: float = 0.0  # time.monotonic() before which the retry loop leaves it alone

    # -- state ----------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        if self._failed:
            return State.FAILED
        if self._dirty or self.busy:
            return State.UPLOADING if self.uploading else State.DIRTY
        return State.FETCHING if self.fetches else State.CLEAN

    @property
    def pending(self) -> bool:
        """Its local content is not on the server (dirty, uploading or failed)."""
        return self._dirty or self._failed

    @property
    def local_changes(self) -> bool:
        """Its cache file is, or may become, newer than the server's object: no fetch may replace it."""
        return self.pending or self.writers > 0

    @property
    def busy(self) -> bool:
        """An open handle has written to it: that handle's flush uploads it."""
        return any(h.dirty for h in self.handles)

    def _illegal(self, what: str) -> IllegalTransition:
        return IllegalTransition(f"{self.url}: {what} while {self.state.value}")

    def begin_fetch(self) -> None:
        """CLEAN → FETCHING. (A download may also serve readers of an object being written here; it then
        never becomes the cache file: `check_publish`.)"""
        self.fetches += 1

    def end_fetch(self) -> None:
        if self.fetches <= 0:
            raise self._illegal("the end of a fetch that did not begin")
        self.fetches -= 1

    def check_publish(self) -> None:
        """A fetched copy may become the cache file only while nothing local is there or coming."""
        if self.local_changes:
            raise self._illegal("publishing a fetched copy")

    def dirtied(self) -> None:
        """CLEAN/FETCHING/DIRTY/UPLOADING → DIRTY (or UPLOADING: written again while uploading)."""
        if self._failed:
            raise self._illegal("a write")
        self._dirty = True

    def begin_upload(self) -> None:
        """DIRTY → UPLOADING. (Dirty also when another writer's upload has just taken it clean, while a handle
        that wrote to it has not flushed yet: that handle's flush uploads again.)"""
        if not (self._dirty or self.busy) or self._failed or self.uploading:
            raise self._illegal("an upload")
        self.uploading = True

    def end_upload(self, clean: bool) -> None:
        """UPLOADING → CLEAN (uploaded, and not written meanwhile) or DIRTY (failed, or written again)."""
        if not self.uploading:
            raise self._illegal("the end of an upload that did not begin")
        self.uploading = False
        if clean:
            self._dirty = False

    def failed(self) -> None:
        """CLEAN/DIRTY/UPLOADING → FAILED: a write into the cache file failed."""
        self._failed = True

    def discarded(self) -> None:
        """Any → CLEAN: the local changes are dropped (the object was deleted, or a write failed)."""
        self._dirty = self._failed = False

    def loaded_dirty(self) -> None:
        """An earlier mount left it dirty: DIRTY from the start."""
        self._dirty = True

    @property
    def idle(self) -> bool:
        return not (
            self._dirty or self._failed or self.uploading or self.fetches or self.writers or self.handles
            or self.stream or self.download or self.fetching or self.ready or self.walk or self.lock_users
            or self.backing
            or self.cached_opens or self.dropping
        )


class Entries:
    """The entries in use, by URL; and the bounded memory of names found missing and of offline warnings."""

    def __init__(self) -> None:
        self._by_url: dict[str, Entry] = {}
        self._absent: OrderedDict[str, float] = OrderedDict()  # url → time.monotonic() it was found missing
        self._warned: OrderedDict[str, None] = OrderedDict()  # URLs served offline, said so in the log

    def get(self, url: str) -> Entry | None:
        return self._by_url.get(url)

    def at(self, url: str) -> Entry:
        """`url`'s entry, made if it has none. Whoever makes one gives it a use (a handle, a writer, a fetch...)
        before its next await, and calls `release` when that use ends."""
        entry = self._by_url.get(url)
        if entry is None:
            entry = self._by_url[url] = Entry(url)
        return entry

    def release(self, entry: Entry) -> None:
        """Drop `entry` if nothing of it is in use any more."""
        if entry.idle and self._by_url.get(entry.url) is entry:
            del self._by_url[entry.url]

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._by_url.values()))

    def __len__(self) -> int:
        return len(self._by_url)

    # -- questions asked by URL -------------------------------------------------------------------------
    def local_changes(self, url: str) -> bool:
        entry = self._by_url.get(url)
        return entry is not None and entry.local_changes

    def pending(self, url: str) -> bool:
        entry = self._by_url.get(url)
        return entry is not None and entry.pending

    def busy(self, url: str) -> bool:
        entry = self._by_url.get(url)
        return entry is not None and entry.busy

    def pending_urls(self) -> list[str]:
        return [e.url for e in self._by_url.values() if e.pending]

    # -- the per-object lock ------------------------------------------------------------------------------
    def lock(self, url: str) -> contextlib.AbstractAsyncContextManager[Entry]:
        """Hold `url`'s lock (one upload, or fetch into the cache, of an object at a time)."""
        return self.hold(self.at(url))

    @contextlib.asynccontextmanager
    async def hold(self, entry: Entry) -> AsyncIterator[Entry]:
        """Hold `entry`'s lock, whatever URL it answers to by the time it is taken (a rename may move it)."""
        entry.lock_users += 1
        try:
            async with entry.lock:
                yield entry
        finally:
            entry.lock_users -= 1
            self.release(entry)

    def held(self, url: str) -> bool:
        """Whether `url`'s lock is held or waited for right now."""
        entry = self._by_url.get(url)
        return entry is not None and entry.lock_users > 0

    def detach(self, entry: Entry) -> None:
        """`entry`'s object was unlinked while open: its handles keep it, and its URL is free for a new one."""
        entry.unlinked = True
        if self._by_url.get(entry.url) is entry:
            del self._by_url[entry.url]

    def move(self, old_url: str, new_url: str) -> None:
        """The object was renamed: its entry (if any) answers to the new URL."""
        entry = self._by_url.pop(old_url, None)
        if entry is not None:
            entry.url = new_url
            self._by_url[new_url] = entry

    # -- names found missing, and warnings given once ---------------------------------------------------------
    def note_absent(self, url: str) -> None:
        self._absent[url] = time.monotonic()
        self._absent.move_to_end(url)
        if len(self._absent) > NEGATIVE_LIMIT:
            self._absent.popitem(last=False)

    def absent_since(self, url: str) -> float | None:
        return self._absent.get(url)

    def found(self, url: str) -> None:
        self._absent.pop(url, None)

    def first_warning(self, url: str) -> bool:
        """True the first time it is asked for `url` (of the last NEGATIVE_LIMIT URLs asked about)."""
        if url in self._warned:
            return False
        self._warned[url] = None
        if len(self._warned) > NEGATIVE_LIMIT:
            self._warned.popitem(last=False)
        return True
