"""The managed cache, shared with the ClearML SDK.

Layout (the SDK's, so a file fetched by either tool is found by the other)::

    <base>/storage_manager/<context>/<md5(url)>.<basename>          cached objects
    <base>/storage_manager/<context>/.lock.NNN.<entry>.clearml      pins (flock'd while held; the mount's: links, Pin)
    <base>/storage_manager/<context>/<entry>_<time>.partially       downloads in progress
    <base>/clearmlfs/<context>/<entry>.json                         our per-entry state
    <base>/clearmlfs/<context>/<entry>.fetch                        download-once lock
    <base>/clearmlfs/<context>/<entry>.upload                       a multipart upload in progress
    <base>/clearmlfs/<context>/<entry>.sparse, <entry>.ranges       a partial copy read in ranges, and which
                                                                     ranges of which version it holds

Our state lives outside the SDK's folder because the SDK counts and deletes
everything it finds there. Pins use the SDK's lock-file convention so its cleaner
(and ours) leave pinned entries alone. Downloads are serialised per entry with an
flock, which excludes other threads and other processes alike.

When clearml.conf turns on the SDK's size-aware cache, the SDK's layout and eviction
for that mode apply instead (sdk_size_cache.py)::

    <base>/storage/<scheme>/<host>/<bucket>/<key>                  cached objects (and *.partially)
    <base>/clearmlfs/storage/<md5(path)>.<name>.json, .fetch, ...  our per-entry state, as above
    <base>/clearmlfs/storage/.lock.NNN.<md5(path)>.<name>.clearml  pins

That SDK knows no pins: it leaves alone what was used within `cleanup_seconds_threshold`,
so this process keeps the access time of what it pins, downloads or has not uploaded
recent (`_Freshness`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import sdk_size_cache as sdk_rules
from .backends.base import Backend, ObjectInfo
from .config import SizeCache, parse_size
from .errors import ConfigError, InvalidURL, NoSpace, StorageError

log = logging.getLogger(__name__)

STORAGE_MANAGER_FOLDER = "storage_manager"
STATE_FOLDER = "clearmlfs"
DEFAULT_CONTEXT = "global"
LOCK_PREFIX = ".lock."
LOCK_SUFFIX = ".clearml"
PARTIAL_SUFFIX = ".partially"
DIRTY_SUFFIX = ".dirty"  # a dirty cache file's second name, in the state folder
RENAME_SUFFIX = ".rename"  # a folder rename's journal, in the state folder
SPARSE_SUFFIX = ".sparse"  # a partial copy of an object read in ranges, in the state folder (the SDK never sees it)
RANGES_SUFFIX = ".ranges"  # beside it: the version it was read from and the byte ranges it holds
FETCH_PART = 8 * 1024 * 1024  # the range a whole-object fetch asks for at a time
STALE_PARTIAL_SECONDS = 24 * 3600
# Why a hard link for a pin cannot be made; the pin then takes a lock file of its own (Pin).
LINK_FAILURES = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EROFS, errno.EACCES, errno.ENOENT,
                           errno.EOPNOTSUPP, errno.ENOSYS})
KEPT_SHARE = 0.25  # the part of the cache's limits (count, bytes) partial copies kept between downloads may take
T = TypeVar("T")
SERVED_OFFLINE = "served_offline"  # the counter of opens served from the cache, the server unreachable
STATS_FILE = "counters.stats"  # (not *.json: the entries' records are)
# The free space the cache leaves on its disk unless told otherwise: 10 % of the filesystem, at most 1 GiB,
# so that a dataset fills the disk's room instead of an arbitrary count, and the disk never fills up.
DEFAULT_MIN_FREE_FRACTION = 0.10
DEFAULT_MIN_FREE_BYTES = 1024**3


def min_free_bytes(folder: Path, spec: str = "") -> int:
    """What `spec` ("2G", "5%", "0"; "" for the default) asks to keep free on the filesystem of `folder`."""
    st = os.statvfs(folder)
    size = st.f_blocks * st.f_frsize
    try:
        if not spec:
            return min(int(size * DEFAULT_MIN_FREE_FRACTION), DEFAULT_MIN_FREE_BYTES)
        if spec.strip().endswith("%"):
            return int(size * float(spec.strip()[:-1]) / 100)
        return parse_size(spec)
    except ValueError:
        raise ConfigError(f"cache_min_free: {spec!r} is neither a size (2G) nor a percentage (5%)") from None


def entry_name(url: str, max_name_length: int = 255) -> str:
    """The SDK's cache file name for `url`: ``<md5(url)>.<basename>``, shortened to fit the file-name limit."""
    digest = hashlib.md5(url.encode(), usedforsecurity=False).hexdigest()
    return _conform(f"{digest}.{url.split('/')[-1]}", max_name_length)


def _conform(name: str, max_name_length: int) -> str:
    # The SDK's rule, character for character: keep the last two suffixes, cut the stem,
    # leave 32 characters for the temporary-download suffix.
    allowed = max_name_length - 32
    if len(name) <= allowed:
        return name
    ext = "".join(Path(name).suffixes[-2:]).rstrip(" ")
    stem = name[: -len(ext)].strip() if ext else name
    if len(ext) > allowed:
        ext = "." + ext[-(allowed - 1) :].lstrip(".")
    allowed -= len(ext)
    return stem[:allowed].strip() + ext


@dataclass
class EntryState:
    """What we know about one cached entry beyond the file itself."""

    url: str
    etag: str = ""
    size: int = 0
    dirty: bool = False  # written locally, not yet uploaded
    extracted: str = ""  # ETag of the archive content last extracted next to it
    version: int = 0  # bumped each time the entry is dirtied: an upload clears only the version it read
    failed: str = ""  # why its upload failed for good (the server refused it): not retried until told to
    mode: int | None = None  # the permission bits its upload stores (chmod, create); None: the object's own


class Pin:
    """A held ``.lock.NNN.<entry>.clearml`` flock: the entry must not be evicted until `release`.

    Two kinds. A linked pin's lock file is a hard link to the cache file itself, locked shared through `fd`, the
    descriptor the entry's open handles read through: one descriptor per open file, where a separate lock file
    would cost two (a daemon may serve thousands of open files). Whoever checks the pin (the SDK's cleaner,
    `is_pinned`) opens the lock file without truncating it and fails to lock it exclusively, as with any lock
    file. Otherwise (`lock_fd`) the lock file is an empty one of its own, as the SDK makes, and `fd`, if any, is
    beside it.
    """

    def __init__(
        self, path: Path, entry_name: str, file_name: str, fd: int = -1, lock_fd: int = -1,
        writable: bool = False,
    ) -> None:
        self.path, self.entry_name, self.file_name = path, entry_name, file_name
        self.fd = fd  # the cache file's descriptor (-1: none), closed by `release`
        self.writable = writable  # `fd` may be written through
        self._lock_fd = lock_fd
        self._held = True
        self.users = 0  # the open files sharing it (the mount pins a cache file once, however often it is open)
        self.on_release: Callable[[], None] | None = None  # called once released

    @property
    def linked(self) -> bool:
        return self._lock_fd < 0

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        # Unlinking first: nobody can find a lock we are about to drop. A link only while it is still ours.
        with contextlib.suppress(OSError):
            if not self.linked or os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        for fd in (self._lock_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self.fd = -1
        if self.on_release is not None:
            self.on_release()

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Landing:
    """One download into the cache, and the only way a downloaded object enters it (streaming reads, small
    objects, whole fetches for writers and for the StorageManager API).

    It holds the entry's download lock (so one process downloads an object at a time) and fills a
    `*.partially` file, skipped by every scan until it is renamed into place with the ETag of the version its
    ranges were read from (each read is pinned to that version: a change on the server fails it, never mixes
    two versions). `discard` drops it instead; `close` closes its descriptor, which a download with reads still
    in flight closes last.

    A landing read in ranges (`CacheContext.land(resume=...)`) fills the entry's sparse file in the state folder
    instead, which `keep` leaves there with the ranges it holds, for the next download of the same version.
    """

    def __init__(
        self, cache: CacheContext, url: str, partial: Path, fd: int, lock_fd: int,
        present: list[tuple[int, int]] | None = None,
    ) -> None:
        self.cache, self.url, self.partial, self.fd = cache, url, partial, fd
        self._lock_fd = lock_fd
        self.present = present or []  # the byte ranges a kept sparse file already held
        self._record = partial.with_suffix(RANGES_SUFFIX) if partial.name.endswith(SPARSE_SUFFIX) else None
        cache.in_use(partial)

    def fill(
        self, backend: Backend, info: ObjectInfo, start: int, length: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Bytes [start, start + length) of the object at `info`'s version, at their offset of the file."""
        backend.read_to(self.fd, info.key, start, length, info.etag, progress)

    def fill_all(self, backend: Backend, info: ObjectInfo, concurrency: int) -> None:
        """The whole object, `concurrency` ranges at a time; the first failure stops the rest."""
        os.ftruncate(self.fd, info.size)
        ranges = [(start, min(FETCH_PART, info.size - start)) for start in range(0, info.size, FETCH_PART)]
        if len(ranges) <= 1:
            for start, length in ranges:
                self.fill(backend, info, start, length)
            return
        with concurrent.futures.ThreadPoolExecutor(min(concurrency, len(ranges))) as pool:
            futures = [pool.submit(self.fill, backend, info, start, length) for start, length in ranges]
            done, pending = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in done:
                future.result()

    def publish(self, info: ObjectInfo) -> Path:
        """The complete file becomes the cache entry, recorded as `info`'s version."""
        final = self.cache.path_for(self.url)
        if not self._own():
            raise StorageError(f"{self.url}: the partial copy was replaced by another download")
        try:
            os.replace(self.partial, final)
        except OSError as exc:  # a state folder on another filesystem than the cache's (a mount in between)
            if exc.errno != errno.EXDEV:
                raise
            staged = self.cache.partial_for(self.url)
            shutil.copyfile(self.partial, staged)
            os.replace(staged, final)
        self.cache.drop_sparse(self.url)  # (an older partial copy, if this was a whole fetch)
        self.cache.save_state(EntryState(self.url, info.etag, info.size), durable=False)
        self.cache.added(info.size)
        log.debug("fetched %s (%d bytes)", self.url, info.size)
        self._release_lock()
        return final

    def discard(self) -> None:
        if self.fd < 0 or self._own():
            for path in (self._record, self.partial):  # the record first: it must never describe another file
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        self._release_lock()

    def keep(self, info: ObjectInfo, ranges: list[tuple[int, int]]) -> None:
        """Leave the sparse file for the next download of `info`'s version, recorded as holding `ranges`
        (its data made durable first: after a crash, a range recorded is a range on disk)."""
        if self._record is None or not ranges:
            self.discard()
            return
        os.fdatasync(self.fd)
        if not self._own():  # (the name is another download's now: leave it to that one)
            self._release_lock()
            return
        record = {"url": self.url, "etag": info.etag, "size": info.size, "ranges": [list(r) for r in ranges]}
        _replace_file(self._record, record, durable=True)
        os.utime(self.fd)  # used now: eviction takes the least recently used first
        self._release_lock()

    def _own(self) -> bool:
        """Whether the file at `partial` is still the one this landing filled. (A sparse file's name is the
        entry's: should its download lock file be removed while held, another download could replace it.)"""
        if self._record is None:
            return True
        try:
            return os.stat(self.partial).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
            self.cache.not_in_use(self.partial)


class CacheContext:
    """One cache context (``global`` by default) under the configured base folder; with `size_mode` (the SDK's
    size-aware cache is on), the one folder that mode shares among all contexts, and its limits.

    Limits: at most `file_limit` entries (None: no count, as the mount by default), `byte_limit` bytes (None: no
    cap), and `min_free` bytes left free on the disk; the free-space rule sizes the cache from its disk, so a
    dataset that fits on the disk stays cached.
    """

    def __init__(
        self, base_dir: Path, context: str = DEFAULT_CONTEXT, file_limit: int | None = 100,
        byte_limit: int | None = None,
        min_free: str = "", fetch_concurrency: int = 8, size_mode: SizeCache | None = None,
    ) -> None:
        self.context = context
        self.fetch_concurrency = fetch_concurrency  # ranges of a whole-object fetch in flight at once
        self.size_mode = size_mode
        base = Path(base_dir).expanduser()
        if size_mode is None:
            self.folder = base / STORAGE_MANAGER_FOLDER / context
            self.state_folder = base / STATE_FOLDER / context
        else:
            self.folder = base / sdk_rules.SDK_FOLDER
            self.state_folder = base / STATE_FOLDER / sdk_rules.STATE_CONTEXT
        self._lock_folder = self.folder if size_mode is None else self.state_folder  # where pins live
        self.file_limit = file_limit
        self.byte_limit = byte_limit
        for folder in (self.folder, self.state_folder):
            private_dirs(folder)
        self._name_max = os.statvfs(self.folder).f_namemax
        if size_mode is None:
            self.min_free = min_free_bytes(self.folder, min_free)  # bytes left free on the cache's filesystem
        else:
            self._size_limits(size_mode, byte_limit, min_free)
        self._used: int | None = None  # bytes cached, as of the last scan plus what this process added since
        self._freshness = _Freshness(self) if size_mode is not None else None

    def _size_limits(self, size_mode: SizeCache, byte_limit: int | None, min_free: str) -> None:
        # One rule set: the SDK's, which it applies to the same files. Ours would evict what it keeps.
        if min_free or byte_limit is not None:
            raise ConfigError(
                f"cache_min_free and cache_max_bytes do not apply with the SDK's size-aware cache "
                f"(sdk.{sdk_rules.SECTION}): set its size.min_free_bytes and size.max_used_bytes instead"
            )
        self.min_free = max(0, size_mode.min_free_bytes)
        self.byte_limit = size_mode.max_used_bytes if size_mode.max_used_bytes > 0 else None

    # -- naming -------------------------------------------------------------------------------------
    def path_for(self, url: str) -> Path:
        if self.size_mode is None:
            return self.folder / entry_name(url, self._name_max)
        try:
            path = self.folder / sdk_rules.relative_path(url)
        except ValueError as exc:
            raise InvalidURL(str(exc)) from None
        private_dirs(path.parent)  # (so that every caller may create the file: one stat once it exists)
        return path

    def key_for(self, url: str) -> str:
        """The flat name of `url`'s entry: its state records and pins are named after it."""
        return self._key_of(self.path_for(url))

    def _key_of(self, path: Path) -> str:
        if self.size_mode is None:
            return path.name
        return sdk_rules.state_key(os.path.relpath(path, self.folder), self._name_max)

    def partial_for(self, url: str) -> Path:
        """A fresh name for a download of `url` in progress: renamed to `path_for(url)` once complete, and
        skipped by scans until then (the SDK's `.partially` convention)."""
        final = self.path_for(url)
        return final.with_name(f"{final.name}_{time.time()}{PARTIAL_SUFFIX}")

    def _state_path(self, name: str) -> Path:
        return self.state_folder / f"{name}.json"

    # -- state --------------------------------------------------------------------------------------
    def state(self, url: str) -> EntryState | None:
        try:
            return EntryState(**json.loads(_read_small_file(self._state_path(self.key_for(url)))))
        except (OSError, ValueError, TypeError):
            return None

    def save_state(self, state: EntryState, durable: bool = True) -> None:
        """Record `state` (write, rename; fsync when `durable`: a dirty flag must survive a crash)."""
        _replace_file(self._state_path(self.key_for(state.url)), asdict(state), durable or state.dirty)
        self._keep_dirty(state)
        if self._freshness is not None:
            self._freshness.dirty(self.path_for(state.url), state.dirty)

    # A second name for a dirty cache file, in our state folder: the ClearML SDK's cleanup deletes files of its
    # folder beyond its count even while they are pinned (clearml 2.1.12 checks the lock, then deletes the file
    # anyway), and a file not uploaded yet must survive it. Same inode: the writes still coming are in it too.
    def _dirty_link(self, url: str) -> Path:
        return self.state_folder / f"{self.key_for(url)}{DIRTY_SUFFIX}"

    def _keep_dirty(self, state: EntryState) -> None:
        if state.dirty:
            self.keep_dirty(state.url)
        else:
            self._dirty_link(state.url).unlink(missing_ok=True)

    def keep_dirty(self, url: str) -> None:
        """Give `url`'s dirty cache file its second name (once the file exists: a new file is recorded dirty
        before it is created)."""
        link, path = self._dirty_link(url), self.path_for(url)
        try:
            if link.exists() and os.path.samefile(link, path):
                return
            spare = link.with_name(f"{link.name}.{uuid.uuid4().hex[:8]}")
            os.link(path, spare)
            os.replace(spare, link)
        except FileNotFoundError:
            pass
        except OSError as exc:  # (a state folder on another filesystem): the file is only less protected
            log.warning("cannot keep a second name for %s, not uploaded yet: %s", url, exc)

    def restore_dirty(self, url: str) -> None:
        """Give a dirty cache file its name back if something else deleted it (see `_keep_dirty`)."""
        path, link = self.path_for(url), self._dirty_link(url)
        if not path.exists() and link.exists():
            log.warning("the cache file of %s, not uploaded yet, was deleted by another program; restored", url)
            with contextlib.suppress(FileExistsError):
                os.link(link, path)

    def _records(self, suffix: str) -> Iterator[dict[str, Any]]:
        """Each readable JSON record `<entry><suffix>` of the state folder (one being replaced is skipped)."""
        for path in self.state_folder.glob(f"*{suffix}"):
            try:
                record = json.loads(_read_small_file(path))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                yield record

    def mark_failed(self, url: str, reason: str) -> bool:
        """Record that `url`'s dirty content was refused by the server for good; False if it is not dirty."""
        state = self.state(url)
        if state is None or not state.dirty:
            return False
        state.failed = reason
        self.save_state(state)
        return True

    def retry(self, url: str) -> bool:
        """Let a failed upload of `url` be tried again (by the mount's retry loop); False if none failed."""
        state = self.state(url)
        if state is None or not state.failed:
            return False
        state.failed = ""
        self.save_state(state)
        return True

    def pending_report(self) -> list[tuple[str, str, float, str]]:
        """(what, url, since, reason) of each file not uploaded: "failed" (refused by the server), "uploading"
        (a multipart upload is open) or "dirty"; `since`: when its record last changed (epoch seconds)."""
        uploading = {url for url, _ in self.unfinished_uploads()}
        report = []
        for state in self.dirty_entries():
            try:
                since = self._state_path(self.key_for(state.url)).stat().st_mtime
            except OSError:
                continue
            what = "failed" if state.failed else "uploading" if state.url in uploading else "dirty"
            report.append((what, state.url, since, state.failed))
        return sorted(report, key=lambda r: r[2])

    def dirty_entries(self) -> list[EntryState]:
        states = []
        for record in self._records(".json"):
            with contextlib.suppress(TypeError):
                state = EntryState(**record)
                if state.dirty:
                    states.append(state)
        return states

    # -- multipart uploads in progress (Backend.multipart_watch) ------------------------------------
    # Kept apart from the entry's state, which the daemon updates meanwhile (its version), and left alone
    # by eviction: the next mount aborts whatever a crash left here.
    def _upload_path(self, url: str) -> Path:
        return self.state_folder / f"{self.key_for(url)}.upload"

    def note_upload(self, url: str, upload_id: str) -> None:
        _replace_file(self._upload_path(url), {"url": url, "upload_id": upload_id}, durable=True)

    def forget_upload(self, url: str, upload_id: str | None = None) -> None:
        """The upload of `url` has ended; with `upload_id`, only if that is the one noted (not a newer one)."""
        path = self._upload_path(url)
        with contextlib.suppress(OSError, ValueError):
            if upload_id is None or json.loads(_read_small_file(path)).get("upload_id") == upload_id:
                path.unlink()

    def unfinished_uploads(self) -> list[tuple[str, str]]:
        """(url, upload id) of each multipart upload noted and not forgotten: cut short by a crash."""
        records = self._records(".upload")
        return [(str(r["url"]), str(r["upload_id"])) for r in records if "url" in r and "upload_id" in r]

    # -- folder renames in progress: every object is copied before any is deleted ----------------------
    def begin_rename(self, old_url: str, new_url: str, names: list[str]) -> Path:
        """Journal a folder rename (fsync'd) before its first copy: a crash leaves it for `unfinished_renames`."""
        journal = self.state_folder / f"rename-{uuid.uuid4().hex}{RENAME_SUFFIX}"
        _replace_file(journal, {"old": old_url, "new": new_url, "names": names, "phase": "copy"}, durable=True)
        return journal

    def renamed_all(self, journal: Path) -> None:
        """Every object is copied: from now on the rename is finished, not undone, after a crash."""
        record = json.loads(journal.read_text())
        record["phase"] = "delete"
        _replace_file(journal, record, durable=True)

    def unfinished_renames(self) -> list[tuple[Path, dict[str, Any]]]:
        """(journal, record) of each folder rename a crash cut short."""
        found = []
        for journal in self.state_folder.glob(f"*{RENAME_SUFFIX}"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(journal.read_text())
                if isinstance(record, dict) and {"old", "new", "names", "phase"} <= record.keys():
                    found.append((journal, record))
        return found

    def same_content(self, url: str, etag: str, new_etag: str) -> None:
        """`url`'s object went from version `etag` to `new_etag` with its content unchanged (only its metadata
        did): a cached copy of the one is a copy of the other."""
        state = self.state(url)
        if etag and state is not None and not state.dirty and state.etag == etag:
            state.etag = new_etag
            self.save_state(state, durable=False)

    def forget(self, url: str) -> None:
        """Drop the cached copy and state of `url` (the object was deleted)."""
        self._remove(self.path_for(url))
        self._evict_kept(self.key_for(url))

    def move(self, url: str, new_url: str, etag: str) -> None:
        """Carry a cached copy over to the URL it was renamed to, so the new name needs no download."""
        old, new = self.path_for(url), self.path_for(new_url)
        state = self.state(url)
        try:
            os.replace(old, new)
        except FileNotFoundError:
            return
        finally:
            with contextlib.suppress(OSError):
                self._state_path(self.key_for(url)).unlink()
            self._dirty_link(url).unlink(missing_ok=True)
        size = new.stat().st_size
        self.save_state(EntryState(new_url, etag, size, dirty=bool(state and state.dirty)))

    # -- lookup and fetch ---------------------------------------------------------------------------
    def lookup(self, url: str, info: ObjectInfo | None = None) -> Path | None:
        """The cached copy of `url` if present (and, given the server's `info`, still current); touches it."""
        path = self.path_for(url)
        if not path.is_file() or not self._is_current(url, path, info):
            return None
        with contextlib.suppress(OSError):
            self._touch(path)  # reuse refreshes LRU order, as the SDK does
        return path

    def _touch(self, path: Path) -> None:
        if self.size_mode is None:
            os.utime(path)
        else:
            touch_atime(path)  # that SDK orders by access time and keeps the modification time

    def _touch_if_there(self, path: Path) -> float | None:
        """`_touch(path)`, and its modification time; None if it is gone (evicted)."""
        try:
            self._touch(path)
            return path.stat().st_mtime
        except FileNotFoundError:
            return None

    def has_current(self, url: str, info: ObjectInfo | None) -> bool:
        """Whether a complete, current copy of `url` is cached (without touching it)."""
        path = self.path_for(url)
        return path.is_file() and self._is_current(url, path, info)

    def _is_current(self, url: str, path: Path, info: ObjectInfo | None) -> bool:
        if self.size_mode is not None and self.size_mode.zero_file_size_check and _size_of(path) == 0:
            return False  # the SDK counts an empty copy as missing in this mode
        if info is None:
            return True
        state = self.state(url)
        if state is not None and state.dirty:
            return True  # local changes not uploaded yet are the newest content
        if state is not None and state.etag:
            return state.etag == info.etag
        # Fetched by the ClearML SDK, which records nothing: check the copy against what the server says.
        if _sdk_copy_matches(path, info):
            self.save_state(EntryState(url, info.etag, info.size), durable=False)
            return True
        return False

    def fetch(
        self, url: str, backend: Backend, key: str, info: ObjectInfo | None = None, force: bool = False
    ) -> Path:
        """The cached copy of `url`, downloading it once if missing, stale (given `info`) or `force`d."""
        cached = None if force else self.lookup(url, info)
        if cached is not None:
            return cached
        landing = self.land(url, wait=True)
        assert landing is not None
        try:
            # Another thread or process may have fetched it while we waited for the lock.
            cached = None if force else self.lookup(url, info)
            if cached is not None:
                landing.discard()
                return cached
            self.clean()
            info = info or backend.stat(key)
            return self._with_room(info.size, self._fill_whole, landing, backend, info)
        except BaseException:
            landing.discard()
            raise
        finally:
            landing.close()

    def _fill_whole(self, landing: Landing, backend: Backend, info: ObjectInfo) -> Path:
        """Fill `landing` with the whole object and publish it; if the object changed since `info` (its reads
        are pinned to that version), once more with the version the server has now."""
        try:
            landing.fill_all(backend, info, self.fetch_concurrency)
        except StorageError:
            current = backend.stat(info.key)
            if current.etag == info.etag:
                raise
            info = current
            landing.fill_all(backend, info, self.fetch_concurrency)
        return landing.publish(info)

    def fetch_small(
        self, url: str, backend: Backend, key: str, limit: int, known: ObjectInfo | None = None
    ) -> tuple[Path | None, ObjectInfo | None] | None:
        """Make the cached copy of a small object current with at most one request and no HEAD: nothing
        if `known` (fresh attributes) matches it, else a conditional GET if a copy is cached, a plain one if not.

        Returns the current copy (None if the object turned out bigger than `limit`) and the object's info as
        the server gave it (None when `known` matched: nothing was asked). None, without a request, when the
        usual path must decide: the copy has local changes, was left by the SDK (no ETag recorded), or another
        process is downloading it.
        """
        final = self.path_for(url)
        state = self.state(url)
        cached = final.is_file()
        if state is not None and state.dirty or cached and state is None:
            return None
        if cached and state is not None and known is not None and known.etag == state.etag:
            if self._touch_if_there(final) is not None:
                return final, None
            cached = False  # evicted just now
        landing = self.land(url)
        if landing is None:
            return None
        published = False
        try:
            unless = state.etag if cached and state else None
            info = self._with_room(limit, backend.read_small, landing.fd, key, limit, unless)
            if info is None:  # unchanged since we cached it
                assert state is not None
                mtime = self._touch_if_there(final)
                if mtime is not None:
                    return final, ObjectInfo(key, state.size, known.mtime if known else mtime, state.etag)
                # Evicted while the server said it was current: no copy to serve, so the whole object, now.
                info = self._with_room(limit, backend.read_small, landing.fd, key, limit, None)
                assert info is not None
            if info.size > limit:
                return None, info
            published = True
            return landing.publish(info), info
        finally:
            if not published:
                landing.discard()
            landing.close()

    def land(
        self, url: str, size: int = 0, wait: bool = False, resume: ObjectInfo | None = None
    ) -> Landing | None:
        """Begin a download of `url` into the cache (`size` bytes, if known: the file is made that size, sparse,
        so that ranges land at their offsets). None, if not `wait`ing, when another thread or process is
        downloading it (it holds the entry's download lock).

        `resume`: the version about to be read in ranges. The download goes to the entry's sparse file, which
        goes on from the ranges a download of that version kept there (`Landing.present`); one of another
        version is dropped first."""
        lock_fd = os.open(self._fetch_lock_path(url), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None
        present: list[tuple[int, int]] = []
        try:
            if resume is None:
                partial = self.partial_for(url)
                fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            else:
                partial = self._sparse_path(self.key_for(url))
                fd, present = _open_sparse(partial, url, resume)
        except BaseException:
            os.close(lock_fd)
            raise
        if size and not present:
            os.ftruncate(fd, size)
        return Landing(self, url, partial, fd, lock_fd, present)

    def _sparse_path(self, key: str) -> Path:
        return self.state_folder / f"{key}{SPARSE_SUFFIX}"

    def _kept(self) -> list[tuple[float, int, str]]:
        """(last written, bytes on disk, entry key) of each partial copy kept in the state folder, oldest first."""
        found = []
        with os.scandir(self.state_folder) as listing:
            for entry in listing:
                if entry.name.endswith(SPARSE_SUFFIX):
                    with contextlib.suppress(OSError):
                        st = entry.stat()
                        found.append((st.st_mtime, st.st_blocks * 512, entry.name[: -len(SPARSE_SUFFIX)]))
        return sorted(found)

    def _clean_kept(self, headroom: float, need: int) -> list[Path]:
        """Evict partial copies, oldest first: beyond `KEPT_SHARE` of the cache's limits (count, bytes), while
        the disk is short of room, and when a day old. They go before complete copies, which cost a whole
        download to get back; one being downloaded into (its download lock held) stays."""
        kept = self._kept()
        count_limit = None if self.file_limit is None else int(self.file_limit * KEPT_SHARE * (1 - headroom))
        byte_limit = None if self.byte_limit is None else int(self.byte_limit * KEPT_SHARE * (1 - headroom))
        total, short, now = sum(size for _, size, _ in kept), self._space_short(need), time.time()
        evicted = []
        for index, (mtime, size, key) in enumerate(kept):
            over = (count_limit is not None and len(kept) - index > count_limit) or (
                byte_limit is not None and total > byte_limit)
            if not (over or short > 0 or now - mtime > STALE_PARTIAL_SECONDS):
                break  # (oldest first: the rest are newer)
            if self._evict_kept(key):
                total, short = total - size, short - size
                evicted.append(self._sparse_path(key))
        return evicted

    def _evict_kept(self, key: str) -> bool:
        """Drop the partial copy of entry `key` unless a download holds its lock (it is in use)."""
        if not self._sparse_path(key).exists():
            return False
        lock_fd = os.open(self._fetch_lock_of(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            self._drop_sparse(key)
            return True
        finally:
            os.close(lock_fd)

    def drop_sparse(self, url: str) -> None:
        """Drop the partial copy kept of `url` (the caller holds its download lock)."""
        self._drop_sparse(self.key_for(url))

    def _drop_sparse(self, key: str) -> None:
        sparse = self._sparse_path(key)
        for path in (sparse.with_suffix(RANGES_SUFFIX), sparse):  # the record first
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _fetch_lock_path(self, url: str) -> Path:
        return self._fetch_lock_of(self.key_for(url))

    def _fetch_lock_of(self, name: str) -> Path:
        return self.state_folder / f"{name}.fetch"

    # -- pins ---------------------------------------------------------------------------------------
    def pin(self, path: Path) -> Pin:
        """Hold the entry at `path` against eviction (by us and by the SDK) until the pin is released, with a
        lock file of its own."""
        key = self._key_of(path)
        for lock_path in self._lock_names(path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return self._pinned(path, Pin(lock_path, key, path.name, lock_fd=fd))
        raise RuntimeError(f"cannot pin {path}: 1000 lock files are held")

    def open_pinned(self, path: Path, flags: int, create: bool = False) -> Pin:
        """The cache file at `path` opened (`flags`: O_RDONLY or O_RDWR; `create`: created, or emptied) and its
        entry pinned, the pin owning the descriptor (`Pin.fd`). FileNotFoundError if it was evicted meanwhile."""
        fd = open_cache_file(path, flags, create)
        return self.hold(path, fd, verify=not create, writable=flags & os.O_ACCMODE == os.O_RDWR)

    def hold(
        self, path: Path, fd: int, verify: bool = True, writable: bool = False, source: Path | None = None
    ) -> Pin:
        """Pin the entry at `path` by `fd`, a descriptor of its file (or, with `verify` off, of its download in
        progress, named `source`), which the pin takes over. With `verify`, FileNotFoundError if `path` is no
        longer `fd`'s file once pinned: evicted, or replaced, between open and pin (an eviction moves the file
        aside, then checks the pins; so one of the two sees the other)."""
        try:
            pin = self._linked_pin(path, fd, writable, source)
            if pin is None:
                pin = self.pin(path)
                pin.fd, pin.writable = fd, writable
        except BaseException:
            os.close(fd)
            raise
        if verify and inode_of(path) != os.fstat(fd).st_ino:
            pin.release()
            raise FileNotFoundError(errno.ENOENT, "evicted from the cache while being opened", str(path))
        return pin

    def _linked_pin(self, path: Path, fd: int, writable: bool, source: Path | None) -> Pin | None:
        """A linked pin on `fd` (see `Pin`); None where a hard link cannot be made (the lock folder on another
        filesystem, as the size-aware mode's state folder may be, or a filesystem without hard links), or the
        shared lock cannot be taken now (a check of a stale link of this file holds it for an instant)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return None
        for lock_path in self._lock_names(path):
            try:
                _link(fd, source or path, lock_path)
            except FileExistsError:
                continue
            except OSError as exc:  # (ENOENT: the file has no name left, or no /proc)
                if exc.errno not in LINK_FAILURES:
                    raise
                log.debug("pinning %s with a lock file of its own: %s", path.name, exc)
                break
            return self._pinned(path, Pin(lock_path, self._key_of(path), path.name, fd=fd, writable=writable))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None

    def _lock_names(self, path: Path) -> Iterator[Path]:
        """The names a new pin of the entry at `path` may take, lowest number first."""
        key = self._key_of(path)
        lock_folder = self._lock_folder if self.size_mode is not None else path.parent
        for i in range(1000):
            yield lock_folder / f"{LOCK_PREFIX}{i:03d}.{key}{LOCK_SUFFIX}"

    def _pinned(self, path: Path, pin: Pin) -> Pin:
        if self._freshness is not None:
            self.in_use(path)
            pin.on_release = lambda: self.not_in_use(path)
        return pin

    def sweep_locks(self) -> int:
        """Remove the lock files only a process gone (killed) could have left as links to cache files: each
        keeps a whole file's blocks alive, evicted or not. One nobody holds is removed if it is a link or has
        content; an empty one may be an SDK process's, made an instant before its lock, and is left to the
        usual checks (which remove it once unheld). Returns how many were removed."""
        removed = 0
        for lock_path in self._lock_folder.glob(f"{LOCK_PREFIX}[0-9][0-9][0-9].*{LOCK_SUFFIX}"):
            with contextlib.suppress(OSError):
                st = lock_path.stat()
                if (st.st_nlink > 1 or st.st_size > 0) and _remove_unheld(lock_path):
                    removed += 1
        if removed:
            log.info("removed %d lock files left by a process that ended", removed)
        return removed

    def in_use(self, path: Path) -> None:
        """`path` (a pinned copy, a download in progress) must outlive the SDK's cleaner until `not_in_use`."""
        if self._freshness is not None:
            self._freshness.hold(path)

    def not_in_use(self, path: Path) -> None:
        if self._freshness is not None:
            self._freshness.drop(path)

    def is_pinned(self, name: str, lock_paths: list[Path] | None = None) -> bool:
        """True while any process holds one of the entry's lock files; stale lock files are removed.

        `lock_paths`: the entry's lock files when the caller has just listed the folder.
        """
        pinned = False
        if lock_paths is None:
            pattern = f"{LOCK_PREFIX}[0-9][0-9][0-9].{_glob_escape(name)}{LOCK_SUFFIX}"
            lock_paths = list(self._lock_folder.glob(pattern))
        for lock_path in lock_paths:
            with contextlib.suppress(FileNotFoundError):
                if not _remove_unheld(lock_path):  # (one nobody holds is a leftover)
                    pinned = True
        return pinned

    def _lock_paths_now(self, name: str, known: list[Path]) -> list[Path]:
        """`known` (from a listing) and any lock file made since: a new pin takes the lowest free number, so
        probing from .000 up to the first missing one finds it without listing the folder again."""
        paths = list(known)
        for i in range(1000):
            lock_path = self._lock_folder / f"{LOCK_PREFIX}{i:03d}.{name}{LOCK_SUFFIX}"
            if not lock_path.exists():
                break
            if lock_path not in paths:
                paths.append(lock_path)
        return paths

    # -- limits and eviction ------------------------------------------------------------------------
    def set_file_limit(self, limit: int) -> int | None:
        """Raise the entry-count limit (never lowers it, as in the SDK); returns the limit in force (None: the
        context counts no entries, which no limit raises)."""
        if self.file_limit is not None:
            self.file_limit = max(self.file_limit, int(limit))
        return self.file_limit

    def clean(self, headroom: float = 0.0, need: int = 0) -> list[Path]:
        """Evict least-recently-used entries beyond the count and byte limits (either may be None: none), and
        while the disk has less than `min_free` (plus `need`) bytes free; never pinned or dirty ones.

        `headroom`: the fraction of each limit to free beyond it, so that many additions need one scan. (With
        the SDK's size-aware cache, its own rules instead: see `_clean_by_size`.)
        """
        kept = self._clean_kept(headroom, need)
        if self.size_mode is not None:
            return kept + self._clean_by_size(self.size_mode, need)
        found, locks = self._scan()
        file_limit = len(found) if self.file_limit is None else int(self.file_limit * (1 - headroom))
        short = self._space_short(need)
        if len(found) <= file_limit and self.byte_limit is None and short <= 0:
            return kept  # (without a single stat: the listing's file types are enough)
        entries = sorted(found, key=_last_used)  # least recently used first
        byte_limit = None if self.byte_limit is None else int(self.byte_limit * (1 - headroom))
        total = sum(_size(e) for e in entries) if byte_limit is not None else 0
        evicted = kept
        for index, entry in enumerate(entries):
            over_count = index < len(entries) - file_limit
            over_bytes = byte_limit is not None and total > byte_limit
            wanted = over_count or over_bytes or short > 0
            if not wanted or not self._evictable(entry.name, locks.get(entry.name, [])):
                continue
            size, path = _size(entry), Path(entry.path)
            if self._evict(path, locks.get(entry.name, [])):
                total, short = total - size, short - size
                evicted.append(path)
        return evicted

    def _clean_by_size(self, size_mode: SizeCache, need: int) -> list[Path]:
        """The SDK's cleanup in its size-aware mode (sdk_rules.plan), which also never evicts a pinned or dirty
        copy, nor a download in progress. Without a scan while the bytes this process knows of are under the
        limits, as the SDK does."""
        max_used = self.byte_limit or 0
        min_free = self.min_free + need if self.min_free > 0 or need else 0
        if self._used is not None and not sdk_rules.over_limits(self._used, self._free(), max_used, min_free):
            return []
        found = list(sdk_rules.files(self.folder, skip=lambda path: False))
        self._used = sum(size for _, _, size in found)
        if not sdk_rules.over_limits(self._used, self._free(), max_used, min_free):
            return []
        evicted = sdk_rules.plan(
            found, self._used, self._free, max_used, min_free, size_mode.cleanup_margin,
            size_mode.cleanup_seconds_threshold, self._evict_file,
        )
        gone = set(evicted)
        self._used -= sum(size for _, path, size in found if path in gone)
        return [Path(path) for path in evicted]

    def _evict_file(self, name: str) -> bool:
        path = Path(name)
        if path.name.endswith(PARTIAL_SUFFIX):
            # someone's download (ours or the SDK's) unless abandoned long ago
            if time.time() - _mtime(path) <= STALE_PARTIAL_SECONDS:
                return False
            self._remove(path)
            return True
        lock_paths = self._lock_paths_now(self._key_of(path), [])
        return self._evictable(self._key_of(path), lock_paths) and self._evict(path, lock_paths)

    def _free(self) -> int:
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize

    def added(self, size: int) -> None:
        """A copy of `size` bytes entered the cache (for the size-aware mode's running total)."""
        if self._used is not None:
            self._used += size

    def make_room(self, need: int) -> bool:
        """The disk is full: evict what nobody uses until `need` bytes and `min_free` are free. Whether anything
        was evicted (so that the failed write is worth trying again)."""
        evicted = self.clean(need=need)
        if evicted:
            log.info("cache disk full: evicted %d unused entries", len(evicted))
        return bool(evicted)

    def _with_room(self, need: int, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)`, a download into the cache; if the disk is full, once more after `make_room(need)`."""
        try:
            return fn(*args)
        except NoSpace:
            if not self.make_room(need):
                raise
        return fn(*args)

    def short_of_space(self) -> bool:
        """Whether the cache's filesystem has less than `min_free` bytes free."""
        return self._space_short() > 0

    def _space_short(self, need: int = 0) -> int:
        """Bytes to free on the cache's filesystem so that `need` more fit and `min_free` stay free."""
        st = os.statvfs(self.folder)
        return self.min_free + need - st.f_bavail * st.f_frsize

    # -- counters the CLI reports (`clearmlfs cache stats`) -----------------------------------------
    def count(self, name: str) -> None:
        """Add one to the counter `name` (kept in the state folder; not durable, a count is no data)."""
        counts = self.counters()
        counts[name] = counts.get(name, 0) + 1
        with contextlib.suppress(OSError):
            _replace_file(self.state_folder / STATS_FILE, dict(counts), durable=False)

    def counters(self) -> dict[str, int]:
        try:
            record = json.loads(_read_small_file(self.state_folder / STATS_FILE))
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in record.items()} if isinstance(record, dict) else {}

    def _evict(self, path: Path, known_locks: list[Path]) -> bool:
        """Remove an entry nobody pins, without racing a process that pins and opens it right now.

        The entry is moved aside first, then its pins are checked afresh: a pin taken before that check keeps
        the entry (moved back); an opener that pins after it finds the name gone or another file there
        (OpenFiles checks), so nobody ends up writing into a file that is deleted under them.
        """
        aside = path.with_name(f"{path.name}.{os.getpid()}.evicting{PARTIAL_SUFFIX}")
        try:
            os.rename(path, aside)
        except OSError:
            return False
        key = self._key_of(path)
        if self.is_pinned(key, self._lock_paths_now(key, known_locks)):
            with contextlib.suppress(OSError):  # (if the name was taken again meanwhile, left aside and swept later)
                if aside.is_dir():
                    os.rename(aside, path)
                else:
                    os.link(aside, path)
                    aside.unlink()
            return False
        self._remove(aside)
        if not path.exists():  # not created again meanwhile: its state goes too
            self._forget_state(key)
        return True

    def _entries(self) -> list[Path]:
        if self.size_mode is not None:
            found = sdk_rules.files(self.folder, skip=lambda path: path.endswith(PARTIAL_SUFFIX))
            return [Path(path) for _, path, _ in found]
        return [Path(e.path) for e in self._scan()[0]]

    def _scan(self) -> tuple[list[os.DirEntry[str]], dict[str, list[Path]]]:
        """The entries of the folder, and the lock files of each (by entry name), in one listing."""
        entries: list[os.DirEntry[str]] = []
        locks: dict[str, list[Path]] = {}
        now = time.time()
        with os.scandir(self.folder) as listing:
            for entry in listing:
                name = entry.name
                if name.startswith(LOCK_PREFIX) and name.endswith(LOCK_SUFFIX):
                    locks.setdefault(name[len(LOCK_PREFIX) + 4 : -len(LOCK_SUFFIX)], []).append(Path(entry.path))
                    continue
                if name.endswith(PARTIAL_SUFFIX):
                    if now - _last_used(entry) > STALE_PARTIAL_SECONDS:
                        self._remove(Path(entry.path))  # left behind by a crashed download
                    continue
                entries.append(entry)
        return entries, locks

    def _evictable(self, name: str, lock_paths: list[Path] | None = None) -> bool:
        if self.is_pinned(name, lock_paths):
            return False
        with contextlib.suppress(OSError, ValueError, TypeError):
            if json.loads(_read_small_file(self._state_path(name))).get("dirty"):
                return False
        return True

    def _remove(self, path: Path) -> None:
        log.debug("evicting %s", path.name)
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if not path.name.endswith(PARTIAL_SUFFIX):
            self._forget_state(self._key_of(path))

    def _forget_state(self, name: str) -> None:
        # The download lock goes too, or the state folder would keep a file for every URL ever fetched. (A
        # process holding it right now only loses the guarantee that nobody downloads the URL alongside it.)
        dirty_link = self.state_folder / f"{name}{DIRTY_SUFFIX}"
        for leftover in (self._state_path(name), self._fetch_lock_of(name), dirty_link):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def clear(self, include_dirty: bool = False) -> list[Path]:
        """Remove every entry nobody has pinned (and, unless `include_dirty`, that is uploaded)."""
        removed = [self._sparse_path(key) for _, _, key in self._kept() if self._evict_kept(key)]
        for path in self._entries():
            key = self._key_of(path)
            if self.is_pinned(key) or (not include_dirty and not self._evictable(key)):
                continue
            self._remove(path)
            removed.append(path)
        return removed

    def stats(self) -> tuple[int, int]:
        """(entries, bytes) currently in this context."""
        if self.size_mode is not None:
            found = list(sdk_rules.files(self.folder, skip=lambda path: path.endswith(PARTIAL_SUFFIX)))
            return len(found), sum(size for _, _, size in found)
        entries = self._scan()[0]
        return len(entries), sum(_size(e) for e in entries)

    def partial_stats(self) -> tuple[int, int]:
        """(copies, bytes on disk) of the partial copies kept for random reads, which `stats` does not count."""
        kept = self._kept()
        return len(kept), sum(size for _, size, _ in kept)


def _sdk_copy_matches(path: Path, info: ObjectInfo) -> bool:
    """Whether a cache file we have no record of holds the object's current content.

    A single-part S3 ETag is the MD5 of the content: compare it. Otherwise (multipart ETags, GCS
    generations, Azure ETags) the copy must have the right size and be newer than the object.
    """
    st = path.stat()
    if st.st_size != info.size:
        return False
    if re.fullmatch(r"[0-9a-f]{32}", info.etag):
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        return digest.hexdigest() == info.etag
    return st.st_mtime >= info.mtime


def _open_sparse(path: Path, url: str, info: ObjectInfo) -> tuple[int, list[tuple[int, int]]]:
    """The sparse file at `path`, opened, and the ranges of `info`'s version its record says it holds; emptied
    (its record dropped first) if it holds another version's, or its record is missing or unreadable."""
    record_path = path.with_suffix(RANGES_SUFFIX)
    present: list[tuple[int, int]] = []
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        record = json.loads(_read_small_file(record_path))
        if (record["url"], record["etag"], record["size"]) == (url, info.etag, info.size) and info.etag:
            present = [(int(start), int(end)) for start, end in record["ranges"]]
    if present:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size == info.size:
            return fd, present
        os.close(fd)
    # A new file, not the old one emptied: nothing written into the old one can reach the new one.
    for stale in (record_path, path):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), []


def _replace_file(path: Path, record: dict[str, object], durable: bool) -> None:
    """Write `record` as JSON to `path` all at once (a temporary file renamed over it; fsync'd if `durable`),
    so that a reader, or a crash, finds either the old record or the new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = memoryview(json.dumps(record).encode())
        while data:  # (one write, in practice: the buffered text layer cost more than the write)
            data = data[os.write(fd, data):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_small_file(path: Path) -> bytes:
    """The whole of a small file in one read (no buffered text layer: a state file is read per open)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def private_dirs(folder: Path) -> None:
    """Create `folder` and any missing parents 0700 (mkdir's mode applies only to the last one)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)


class _Freshness:
    """Keeps the access time of what this process uses in the SDK's size-aware cache recent: that SDK knows no
    pins, and its cleaner leaves alone only what was used within `cleanup_seconds_threshold`. Pinned copies,
    downloads in progress and copies not uploaded are touched (the access time alone) a few times per
    threshold, by one daemon thread per cache context, while there are any."""

    def __init__(self, cache: CacheContext) -> None:
        assert cache.size_mode is not None
        threshold = cache.size_mode.cleanup_seconds_threshold
        if threshold <= 0:
            log.warning("cleanup_seconds_threshold is %s: the SDK's cleaner may evict files clearmlfs uses", threshold)
        self.interval = max(0.25, threshold / 4)
        self._held: dict[Path, int] = {}
        self._dirty: set[Path] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cache = weakref.ref(cache)

    def hold(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            touch_atime(path)
        with self._lock:
            self._held[path] = self._held.get(path, 0) + 1
            self._start()

    def drop(self, path: Path) -> None:
        with self._lock:
            count = self._held.pop(path, 0) - 1
            if count > 0:
                self._held[path] = count

    def dirty(self, path: Path, dirty: bool) -> None:
        with self._lock:
            if dirty:
                self._dirty.add(path)
                self._start()
            else:
                self._dirty.discard(path)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="clearmlfs-cache-atime", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while self._cache() is not None:
            time.sleep(self.interval)
            with self._lock:
                paths = [*self._held, *self._dirty]
                if not paths:
                    self._thread = None
                    return
            for path in paths:
                try:
                    touch_atime(path)
                except FileNotFoundError:
                    with self._lock:
                        self._dirty.discard(path)  # moved or dropped
                except OSError:
                    pass


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_UTIME_NOW, _UTIME_OMIT, _AT_FDCWD = (1 << 30) - 1, (1 << 30) - 2, -100


def touch_atime(path: Path) -> None:
    """Set `path`'s access time to now and leave its modification time alone, even if it is written meanwhile
    (utimensat with UTIME_OMIT: os.utime would have to read the mtime first, and could set it back)."""
    times = (_Timespec * 2)(_Timespec(0, _UTIME_NOW), _Timespec(0, _UTIME_OMIT))
    if _libc.utimensat(_AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def open_cache_file(path: Path, flags: int, create: bool = False) -> int:
    """A descriptor of the cache file `path` (`create`: created, or emptied), private to this user."""
    return os.open(path, flags | (os.O_CREAT | os.O_TRUNC if create else 0), 0o600)


def inode_of(path: Path) -> int:
    """The inode number of `path`; -1 if nothing is there."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1


def _link(fd: int, source: Path, lock_path: Path) -> None:
    """Make `lock_path` a name of `fd`'s file: through /proc, exactly that file; where the kernel refuses that
    (EXDEV seen when the process's root is not its mount's root), through `source`, the file's name when it was
    opened, checked afterwards to still be that file."""
    try:
        os.link(f"/proc/self/fd/{fd}", lock_path, follow_symlinks=True)
        return
    except OSError as exc:
        if exc.errno == errno.EEXIST or exc.errno not in LINK_FAILURES:
            raise
    os.link(source, lock_path)
    if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
        lock_path.unlink()
        raise OSError(errno.ENOENT, "replaced while being pinned", str(source))


def _remove_unheld(lock_path: Path) -> bool:
    """Remove `lock_path` if nobody holds its lock; whether it was removed."""
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        lock_path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _last_used(entry: os.DirEntry[str]) -> float:
    # A folder (an extracted archive) counts as used when anything directly in it was.
    try:
        stamp = entry.stat(follow_symlinks=False).st_mtime
        if entry.is_dir(follow_symlinks=False):
            with os.scandir(entry.path) as children:
                stamp = max([stamp, *(child.stat(follow_symlinks=False).st_mtime for child in children)])
        return stamp
    except OSError:
        return 0.0


def _size(entry: os.DirEntry[str]) -> int:
    try:
        if entry.is_dir(follow_symlinks=False):
            return sum(f.stat().st_size for f in Path(entry.path).rglob("*") if f.is_file())
        return entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0
