"""Uploading what was written: on flush/fsync of a dirty file, and later for whatever is still dirty.

A dirty entry is recorded in the cache state (durably) before its first byte is
written, so a failed upload, an unmount or a crash never loses it: the retry
loop, and the next mount, upload every dirty entry they find.

A large new file may be uploaded while it is written (a `Stream`, see upload.py): flush then completes that
upload instead of starting one, under the same per-URL lock and with the same dirty-version check.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..backends import Attrs, Backend, BackendPool, ObjectInfo
from ..backends.base import Progress
from ..cache import CacheContext, EntryState
from ..errors import ClearmlfsError, StorageError, TimedOut, permanent
from ..urls import parse_url
from .entries import Entries, Entry
from .upload import GrowingFile, Stream
from .workers import Watch, Workers

log = logging.getLogger(__name__)

RETRY_INTERVAL = 30.0
MAX_RETRY_INTERVAL = 15 * 60.0  # between two retries of a file whose uploads keep failing


@dataclass(eq=False)
class _Upload:
    """One upload of a file being flushed, which may outlive the flush that started it."""

    entry: Entry  # whose URL, read once its lock is held, is where it goes (a rename meanwhile moves it)
    fd: int  # our own descriptor of the file: its writer may close theirs meanwhile
    stream: Stream | None
    watch: Watch = field(default_factory=Watch)
    done: trio.Event = field(default_factory=trio.Event)
    info: ObjectInfo | None = None
    error: StorageError | None = None

    def outcome(self) -> ObjectInfo:
        if self.error is not None:
            raise self.error
        assert self.info is not None
        return self.info


class WriteBack:
    def __init__(self, backends: BackendPool, cache: CacheContext, workers: Workers, entries: Entries) -> None:
        self.backends, self.cache, self.workers, self.entries = backends, cache, workers, entries
        # One upload (or fetch into the cache) of a URL at a time: `async with writeback.lock(url)`.
        self.lock = entries.lock
        self._streams = 0  # uploads of files still being written
        self._nursery: trio.Nursery | None = None  # where streams run, while `run` does
        self._crashed_uploads: list[tuple[str, str]] = []  # (url, upload id) cut short by an earlier mount
        backends.watch_multipart(self._multipart)

    async def load(self) -> None:
        """Learn what earlier mounts left dirty, or half-uploaded (called once at start, before any upload)."""
        for state in await self.workers.metadata(self.cache.dirty_entries):
            self.entries.at(state.url).loaded_dirty()
        self._crashed_uploads = await self.workers.metadata(self.cache.unfinished_uploads)

    def _multipart(self, url: str, upload_id: str | None) -> None:
        # From the SDK's threads: a multipart upload started (noted durably) or its call ended.
        if upload_id:
            self.cache.note_upload(url, upload_id)
        else:
            self.cache.forget_upload(url)

    async def _abort_crashed_uploads(self) -> None:
        """Abort the multipart uploads an earlier mount started and did not end (it was killed): their parts
        stay on the server, and are billed, until someone does. The files themselves are still dirty, and
        are uploaded again."""
        for url, upload_id in self._crashed_uploads:
            parsed = parse_url(url)
            try:
                await self.workers.transfer(self.backends.get(parsed).abort_upload, parsed.key, upload_id)
            except ClearmlfsError as exc:
                log.warning("could not abort the unfinished multipart upload of %s (%s); the next mount tries "
                            "again", url, exc)
                continue
            await self.workers.metadata(self.cache.forget_upload, url, upload_id)
            log.info("aborted the multipart upload of %s left unfinished by an earlier mount", url)
        self._crashed_uploads = []

    async def mark_dirty(self, url: str, mode: int | None = None) -> None:
        """`url`'s cache file has changes to upload; `mode`: the permission bits the file has now (kept by its
        upload unless a chmod changes them)."""
        self.entries.at(url).dirtied()  # (the caller's handle keeps the entry)

        def bump() -> None:
            state = self.cache.state(url) or EntryState(url)
            # New content: whatever refused the old one, it is tried again.
            state.dirty, state.version, state.failed = True, state.version + 1, ""
            state.mode = mode if state.mode is None else state.mode
            self.cache.save_state(state)

        await self.workers.metadata(bump)

    async def set_local_attrs(self, url: str, mtime_ns: int | None, mode: int | None) -> None:
        """utimens/chmod of a file with local changes (its lock held): its cache file and record keep them for
        its upload, which stores them with the content."""

        def apply() -> None:
            if mtime_ns is not None:
                os.utime(self.cache.path_for(url), ns=(mtime_ns, mtime_ns))
            state = self.cache.state(url)
            if mode is not None and state is not None:
                state.mode = mode
                self.cache.save_state(state)

        await self.workers.metadata(apply)

    def local_changes(self, url: str) -> bool:
        """Whether `url`'s cache file is (or may become) newer than the server's object: keep fetches off it."""
        return self.entries.local_changes(url)

    async def open_writer(self, url: str) -> None:
        """A handle is opening `url` for writing. An upload of its cache file (a retry) or a fetch replacing
        it finishes first: one reads the file whole, the other swaps it, and neither must meet a writer."""
        with trio.move_on_after(self.workers.timeouts.operation):
            async with self.lock(url) as entry:
                entry.writers += 1
                return
        raise TimedOut(f"{url}: its upload under way has not moved for {self.workers.timeouts.operation:g} s")

    def close_writer(self, entry: Entry) -> None:
        entry.writers -= 1
        self.entries.release(entry)

    async def upload(self, entry: Entry, fd: int, stream: Stream | None = None) -> ObjectInfo:
        """Upload what the file `fd` holds as `entry`'s object, and record it clean.

        With `stream` (an upload of this same content, started while it was written): complete that one
        instead, and upload the file only if the stream failed or was aborted. Waits as long as the upload
        moves; TimedOut once nothing was sent for a whole budget. The upload then goes on in the background,
        from its own descriptor and under the URL's lock (so no newer upload can overtake it), and records
        the entry clean if it succeeds.
        """
        job = _Upload(entry, os.dup(fd), stream, stream.watch if stream is not None else Watch())
        if self._nursery is None:  # unmounting: nothing to leave it running in
            await self._run_upload(job)
            return job.outcome()
        self._nursery.start_soon(self._run_upload, job)
        if self._reports_progress(entry.url):
            await self.workers.watched(job.done, job.watch)
        else:  # no way to tell a slow upload from a stalled one: bounded by its requests' timeouts alone
            await job.done.wait()
        return job.outcome()

    def _reports_progress(self, url: str) -> bool:
        try:
            return self.backends.get(parse_url(url)).reports_progress
        except ClearmlfsError:
            return False

    async def _run_upload(self, job: _Upload) -> None:
        entry = job.entry
        try:
            async with self.entries.hold(entry):
                job.watch.tick()  # from now on it is ours that has to move
                entry.begin_upload()
                clean = False
                try:
                    if job.stream is not None:
                        job.info, clean = await self._finish_stream(job.stream, entry.url)
                    if job.info is None:
                        job.info, clean = await self._upload_locked(entry.url, fd_path(job.fd), job.watch.tick)
                finally:
                    entry.end_upload(clean)
        except StorageError as exc:
            job.error = exc
            await self._failed_for_good(entry.url, exc)
        except Exception as exc:  # never let a surprise end the mount: the writer sees EIO, the entry stays dirty
            log.exception("upload of %s failed", entry.url)
            job.error = StorageError(f"{entry.url}: {type(exc).__name__}: {exc}")
        finally:
            os.close(job.fd)
            job.done.set()

    async def _upload_locked(
        self, url: str, source: Path, progress: Progress | None = None
    ) -> tuple[ObjectInfo, bool]:
        """Upload `source` as `url`: what the server made of it, and whether that left the entry clean."""
        parsed = parse_url(url)
        backend = self.backends.get(parsed)
        before = await self.workers.metadata(self.cache.state, url)
        mtime_ns = (await self.workers.metadata(os.stat, source)).st_mtime_ns
        attrs = Attrs(mtime_ns, _stored_mode(before))
        info = await self.workers.transfer(backend.upload, source, parsed.key, progress, attrs)
        return info, await self._settle(url, before, info)

    async def _settle(self, url: str, before: EntryState | None, info: ObjectInfo) -> bool:
        """Record `url` as clean, as `info`, unless it was dirtied again since `before` was read."""
        after = await self.workers.metadata(self.cache.state, url)
        # Dirtied again while uploading (another writer): stays dirty for that writer's upload.
        if (after.version if after else 0) != (before.version if before else 0):
            return False
        clean = EntryState(url, info.etag, info.size, version=after.version if after else 0)
        await self.workers.metadata(self.cache.save_state, clean)
        return True

    # -- uploads of files still being written --------------------------------------------------------
    def stream_threshold(self, url: str) -> int | None:
        """The size from which `url` is worth uploading while it is written; None if its backend cannot."""
        try:
            return self.backends.get(parse_url(url)).stream_threshold
        except ClearmlfsError:  # reported by the upload at flush, as without streaming
            return None

    def start_stream(self, url: str, fd: int, size: int) -> Stream | None:
        """Start uploading the file `fd`, whose first `size` bytes are written, as `url` while its writer
        appends to it (`Stream.file.grow`); None when not possible now (the caller uploads at flush)."""
        entry = self.entries.at(url)  # (kept by the writer's handle)
        if self._nursery is None or entry.stream is not None or self._streams >= self.workers.stream_threads:
            return None
        parsed = parse_url(url)
        backend = self.backends.get(parsed)
        stream = entry.stream = Stream(url, GrowingFile(os.dup(fd), size, backend.stream_limit))
        self._streams += 1
        self._nursery.start_soon(self._run_stream, entry, stream, backend, parsed.key)
        return stream

    async def _run_stream(self, entry: Entry, stream: Stream, backend: Backend, key: str) -> None:
        try:
            # The mode only: the file's mtime is not known until its last write, after the metadata was sent
            # (a multipart upload's first request); the server's time, that upload's, stands for it.
            attrs = Attrs(None, _stored_mode(await self.workers.metadata(self.cache.state, entry.url)))
            stream.info = await self.workers.stream(
                backend.upload_stream, stream.file, key, stream.watch.tick, attrs)
        except StorageError as exc:  # the SDK has aborted its multipart upload; flush uploads the whole file
            log.info("upload of %s while written stopped (%s); it is uploaded whole at close", stream.url, exc)
        except Exception:  # never let a surprise end the mount: flush falls back to a whole upload
            log.exception("upload of %s while written failed", stream.url)
        finally:
            stream.file.close()
            self._streams -= 1
            if entry.stream is stream:
                entry.stream = None
                self.entries.release(entry)
            stream.done.set()

    async def _finish_stream(self, stream: Stream, url: str) -> tuple[ObjectInfo | None, bool]:
        """Let `stream` upload its last parts and complete as `url` (a stream is aborted when its file is
        renamed): its info (None if it did not complete), and whether that left the entry clean."""
        before = await self.workers.metadata(self.cache.state, url)
        stream.file.finish()
        await stream.done.wait()  # also after an abort: the SDK's abort of the multipart upload is done then
        if stream.info is None:
            return None, False
        return stream.info, await self._settle(url, before, stream.info)

    async def upload_pending(self, backoff: bool = False) -> int:
        """Upload every dirty entry nobody has open; returns how many are still dirty. With `backoff` (the retry
        loop), an entry whose upload failed is left until its next turn: 30 s after the first failure, then
        twice as long after each (up to 15 min), so that a server that keeps failing is not hammered."""
        remaining = 0
        dirty = await self.workers.metadata(self.cache.dirty_entries)
        self._forget_discarded({s.url for s in dirty})
        for state in dirty:
            if state.failed:
                remaining += 1  # refused by the server: `clearmlfs cache retry` (or a new write) tries again
                continue
            if self.entries.held(state.url) or backoff and self._waiting(state.url):
                remaining += 1  # being uploaded now (a flush's upload, perhaps still going after the flush)
                continue
            async with self.lock(state.url) as entry:
                if entry.busy:
                    continue  # an open writer's flush uploads it
                try:
                    await self._retry_one(entry)
                except StorageError as exc:
                    remaining += 1
                    if not await self._failed_for_good(state.url, exc):
                        wait = self._back_off(entry)
                        log.warning("upload of %s failed again (%s); next try in %.0f s", state.url, exc, wait)
                else:
                    entry.retries, entry.retry_at = 0, 0.0
        return remaining

    def _waiting(self, url: str) -> bool:
        entry = self.entries.get(url)
        return entry is not None and entry.retry_at > time.monotonic()

    @staticmethod
    def _back_off(entry: Entry) -> float:
        """Schedule `entry`'s next retry after one more failure; the seconds until then."""
        entry.retries += 1
        wait: float = min(RETRY_INTERVAL * 2.0 ** (entry.retries - 1), MAX_RETRY_INTERVAL)
        entry.retry_at = time.monotonic() + wait
        return wait

    def _forget_discarded(self, dirty: set[str]) -> None:
        """Entries pending here whose cache record is no longer dirty, with nobody writing or uploading them,
        were dropped from the cache (`clearmlfs cache discard`): they have no local changes any more."""
        for entry in self.entries:
            if entry.pending and entry.url not in dirty and not (entry.writers or entry.uploading or entry.lock_users):
                entry.discarded()
                self.entries.release(entry)

    async def _failed_for_good(self, url: str, exc: StorageError) -> bool:
        """If `exc` says the upload of `url` cannot succeed as it is, record it failed (kept in the cache, not
        retried: `clearmlfs status` lists it, `clearmlfs cache retry` or a new write tries again)."""
        if not permanent(exc) or not await self.workers.metadata(self.cache.mark_failed, url, str(exc)):
            return False
        log.error("upload of %s refused by the server: %s. Kept in the cache, not retried until `clearmlfs cache "
                  "retry %s` or a new write", url, exc, url)
        return True

    async def discard(self, url: str) -> None:
        """Drop `url`'s local changes, cache file and state: nothing of them is to be uploaded any more (the
        object was deleted, or a write into the file failed). Open descriptors of the file keep it meanwhile."""
        entry = self.entries.get(url)
        if entry is not None:
            entry.discarded()
            self.entries.release(entry)
        await self.workers.metadata(self.cache.forget, url)

    async def _retry_one(self, entry: Entry) -> None:
        """Upload the dirty cache file of `entry`, whose lock is held."""
        url = entry.url
        state = await self.workers.metadata(self.cache.state, url)
        if state is None or not state.dirty:  # uploaded meanwhile by a writer's flush, or discarded by the CLI
            if entry.pending and not entry.busy:
                entry.discarded()
            return
        path = self.cache.path_for(url)
        await self.workers.metadata(self.cache.restore_dirty, url)
        if not path.exists():
            log.error("dirty entry for %s has no cache file; nothing to upload", url)
            await self.discard(url)
            return
        if not entry.pending:
            entry.loaded_dirty()  # the cache state, written durably, is the truth
        entry.begin_upload()
        clean = False
        try:
            _, clean = await self._upload_locked(url, path)
        finally:
            entry.end_upload(clean)
        log.info("uploaded pending changes to %s", url)

    async def run(self, interval: float = RETRY_INTERVAL) -> None:
        """Retry dirty entries forever (started in the mount's nursery), and run the streaming uploads."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                nursery.start_soon(self._abort_crashed_uploads)
                while True:
                    await self.upload_pending(backoff=True)
                    await trio.sleep(interval)
            finally:
                # Unmounting: stop the streams (their SDK threads would wait for writers forever); the files
                # stay dirty and are uploaded whole, now if closed, or by the next mount.
                self._nursery = None
                for entry in self.entries:
                    if entry.stream is not None:
                        entry.stream.file.abort("unmounting")


def _stored_mode(state: EntryState | None) -> int:
    """The st_mode an upload stores: the file's permission bits (0o644 unless created or chmod'ed otherwise)."""
    return stat.S_IFREG | (0o644 if state is None or state.mode is None else state.mode)


def fd_path(fd: int) -> Path:
    # Uploading through the descriptor reads exactly the file the writer wrote, even if the
    # cache entry's name was replaced meanwhile.
    return Path(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else Path(f"/dev/fd/{fd}")
