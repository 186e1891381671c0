"""When the server or the cache disk fails, through the Operations class over an in-memory bucket that is told
to fail: what the caller sees, what reaches the server, and that nothing waits without bound."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from clearmlfs.errors import AccessDenied, NoSpace, Rejected, StorageError, Transient
from clearmlfs.fs import files
from clearmlfs.fs.fetchers import Fetchers
from tests.fast.harness import ROOT, Client, MemoryPool, errno_of, memory_mount, run, settings_for


class _FullDisk:
    """`os` for files.py, but a pwrite into a cache file fails with ENOSPC once armed."""

    def __init__(self) -> None:
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self.armed:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> _FullDisk:
    disk = _FullDisk()
    monkeypatch.setattr(files, "os", disk)
    return disk


def test_a_failed_write_fails_close_and_leaves_the_old_object(tmp_path: Path, full_disk: _FullDisk) -> None:
    async def test(c: Client) -> None:
        c.backend.put("model", b"old model")
        fh = await c.open(f"{ROOT}/model", os.O_WRONLY | os.O_TRUNC)
        await c.ops.write(fh, 0, b"new ")
        full_disk.armed = True
        assert await errno_of(c.ops.write(fh, 4, b"model")) == errno.ENOSPC
        full_disk.armed = False
        assert await errno_of(c.ops.write(fh, 4, b"model")) == errno.ENOSPC  # the handle stays failed
        assert await errno_of(c.ops.fsync(fh, False)) == errno.ENOSPC
        assert await errno_of(c.ops.flush(fh)) == errno.ENOSPC
        await c.ops.release(fh)
        assert c.backend.data("model") == b"old model" and c.backend.count("PUT") == 0
        assert await c.read(f"{ROOT}/model") == b"old model"  # the cached copy was dropped
        assert await c.fs.writeback.upload_pending() == 0 and c.backend.count("PUT") == 0

    run(test, tmp_path)


def test_a_new_file_whose_write_failed_does_not_exist(tmp_path: Path, full_disk: _FullDisk) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        full_disk.armed = True
        assert await errno_of(c.ops.write(fh, 0, b"x")) == errno.ENOSPC
        assert await errno_of(c.close(fh)) == errno.ENOSPC
        assert c.backend.data("new") is None
        assert "new" not in await c.listdir(ROOT)

    run(test, tmp_path)


def test_a_stream_already_uploading_is_abandoned_when_a_write_fails(tmp_path: Path, full_disk: _FullDisk) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        chunk = b"x" * (1024 * 1024)
        for i in range(10):  # past the 8 MiB threshold: uploaded while written
            await c.ops.write(fh, i * len(chunk), chunk)
        full_disk.armed = True
        assert await errno_of(c.ops.write(fh, 10 * len(chunk), chunk)) == errno.ENOSPC
        assert await errno_of(c.close(fh)) == errno.ENOSPC
        assert c.backend.data("big") is None and c.backend.count("PUT") == 0

    run(test, tmp_path)


def test_a_file_not_uploaded_yet_survives_another_program_deleting_its_cache_file(tmp_path: Path) -> None:
    """The ClearML SDK's cleanup deletes files of the shared cache folder beyond its count, pinned or not."""

    async def test(c: Client) -> None:
        c.backend.fail_next(100, Transient("503"))
        assert await errno_of(c.write(f"{ROOT}/kept", b"precious")) == errno.EIO
        url = f"{c.backend.url_prefix}/kept"
        c.fs.cache.path_for(url).unlink()  # as the SDK's cleaner does
        c.backend._failures.clear()
        assert await c.fs.writeback.upload_pending() == 0
        assert c.backend.data("kept") == b"precious"
        assert not list(c.fs.cache.state_folder.glob("*.dirty"))  # (clean again: the second name goes)

    run(test, tmp_path)


def test_a_failed_upload_fails_close_keeps_the_bytes_and_is_retried(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.fail_next(100, Transient("503"))
        assert await errno_of(c.write(f"{ROOT}/kept", b"precious")) == errno.EIO
        c.backend.fail_next(0)
        c.backend._failures.clear()
        assert await c.fs.writeback.upload_pending() == 0
        assert c.backend.data("kept") == b"precious"

    run(test, tmp_path)


def test_a_refused_upload_fails_close_with_eio(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.fail_next(100, AccessDenied("denied"))
        assert await errno_of(c.write(f"{ROOT}/refused", b"x")) == errno.EIO
        assert c.backend.data("refused") is None

    run(test, tmp_path)


@pytest.mark.parametrize("refusal", [AccessDenied("denied"), Rejected("400 InvalidArgument")])
def test_an_upload_refused_for_good_is_kept_and_not_retried_until_told(tmp_path: Path, refusal: Exception) -> None:
    async def test(c: Client) -> None:
        url = f"{c.backend.url_prefix}/refused"
        c.backend.fail_next(1, refusal)  # type: ignore[arg-type]
        assert await errno_of(c.write(f"{ROOT}/refused", b"kept")) == errno.EIO
        state = c.fs.cache.state(url)
        assert state is not None and state.dirty and str(refusal) in state.failed
        puts = c.backend.count("PUT")
        assert await c.fs.writeback.upload_pending() == 1
        assert c.backend.count("PUT") == puts  # not tried again
        assert await c.read(f"{ROOT}/refused") == b"kept"  # still served from the cache
        assert c.fs.cache.retry(url)
        assert await c.fs.writeback.upload_pending() == 0
        assert c.backend.data("refused") == b"kept"

    run(test, tmp_path)


def test_a_new_write_tries_a_refused_file_again(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.fail_next(1, AccessDenied("denied"))
        assert await errno_of(c.write(f"{ROOT}/refused", b"first")) == errno.EIO
        await c.write(f"{ROOT}/refused", b"second")
        assert c.backend.data("refused") == b"second"
        state = c.fs.cache.state(f"{c.backend.url_prefix}/refused")
        assert state is not None and not state.dirty and not state.failed

    run(test, tmp_path)


def test_a_transient_failure_is_not_taken_for_a_refusal(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.fail_next(100, Transient("503"))
        assert await errno_of(c.write(f"{ROOT}/later", b"x")) == errno.EIO
        state = c.fs.cache.state(f"{c.backend.url_prefix}/later")
        assert state is not None and state.dirty and not state.failed
        c.backend._failures.clear()
        assert await c.fs.writeback.upload_pending() == 0

    run(test, tmp_path)


def test_a_file_discarded_from_the_cache_is_no_longer_shown(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.fail_next(1, AccessDenied("denied"))
        assert await errno_of(c.write(f"{ROOT}/dropped", b"x")) == errno.EIO
        c.fs.cache.forget(f"{c.backend.url_prefix}/dropped")  # `clearmlfs cache discard URL`
        await c.fs.writeback.upload_pending()
        assert not c.fs.writeback.entries.pending(f"{c.backend.url_prefix}/dropped")
        c.fs.ops.ns.table.at(ROOT).listed = 0.0  # type: ignore[union-attr]
        assert "dropped" not in await c.listdir(ROOT)

    run(test, tmp_path)


def test_transient_failures_are_retried_until_the_read_succeeds(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("flaky", b"eventually")
        await c.listdir(ROOT)
        c.backend.fail_next(2, Transient("reset"))
        assert await c.read(f"{ROOT}/flaky") == b"eventually"

    run(test, tmp_path)


def test_dirty_files_left_by_a_mount_are_uploaded_by_the_next(tmp_path: Path) -> None:
    async def main() -> None:
        pool = MemoryPool(settings_for(tmp_path / "cache"))
        async with memory_mount(tmp_path, pool=pool) as c:
            c.backend.fail_next(100, Transient("503"))
            assert await errno_of(c.write(f"{ROOT}/later", b"not lost")) == errno.EIO
            c.backend._failures.clear()
            c.fs.writeback._nursery = None  # (stop its retry loop from uploading it before the "crash")
        assert pool.bucket().data("later") is None
        async with memory_mount(tmp_path, pool=pool) as c:
            with trio.fail_after(10):
                while c.backend.data("later") is None:
                    await trio.sleep(0.01)
            assert c.backend.data("later") == b"not lost"

    trio.run(main)


def test_a_stalled_server_fails_an_uncached_lookup_within_the_budget(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.hold()
        started = time.monotonic()
        try:
            assert await errno_of(c.attrs(f"{ROOT}/anything")) == errno.ETIMEDOUT
        finally:
            c.backend.release()
        assert time.monotonic() - started < 3

    run(test, tmp_path, "op_timeout=1")


@pytest.mark.parametrize("size", [100, 6 * 1024 * 1024])
def test_a_cached_file_is_served_while_the_server_does_not_answer(tmp_path: Path, size: int) -> None:
    async def test(c: Client) -> None:
        c.backend.put("cached", b"c" * size)
        assert await c.read(f"{ROOT}/cached") == b"c" * size
        await trio.sleep(0.05)  # past ttl and list_ttl: the next open revalidates
        c.backend.hold()
        started = time.monotonic()
        try:
            assert await c.read(f"{ROOT}/cached") == b"c" * size
        finally:
            c.backend.release()
        assert time.monotonic() - started < 3
        assert c.fs.cache.counters().get("served_offline", 0) >= 1

    run(test, tmp_path, "ttl=0.01,list_ttl=0.01,revalidate_timeout=0.5,op_timeout=2,read_part_size=1M")


def test_with_offline_off_a_cached_file_is_not_served_while_the_server_does_not_answer(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("cached", b"c")
        assert await c.read(f"{ROOT}/cached") == b"c"
        await trio.sleep(0.05)
        c.backend.fail_next(1000, Transient("connection refused"))
        assert await errno_of(c.read(f"{ROOT}/cached")) in (errno.EIO, errno.ETIMEDOUT)

    run(test, tmp_path, "ttl=0.01,list_ttl=0.01,offline=off,op_timeout=2")


def test_an_object_bigger_than_the_room_left_is_read_from_the_server(tmp_path: Path, monkeypatch) -> None:
    async def test(c: Client) -> None:
        c.backend.put("huge", b"h" * (3 * 1024 * 1024))
        real = c.backend.read_to

        def no_room(*args: Any, **kwargs: Any) -> None:
            raise NoSpace("cache disk full")

        monkeypatch.setattr(c.backend, "read_to", no_room)
        assert await c.read(f"{ROOT}/huge") == b"h" * (3 * 1024 * 1024)
        monkeypatch.setattr(c.backend, "read_to", real)

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_the_retry_loop_backs_off_from_a_file_whose_uploads_keep_failing(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        url = f"{c.backend.url_prefix}/later"
        c.backend.fail_next(100, Transient("503"))
        assert await errno_of(c.write(f"{ROOT}/later", b"x")) == errno.EIO
        writeback = c.fs.writeback
        assert await writeback.upload_pending(backoff=True) == 1  # the loop's try fails: next one in 30 s
        entry = writeback.entries.get(url)
        assert entry is not None and entry.retries == 1 and entry.retry_at - time.monotonic() > 25
        puts = c.backend.count("PUT")
        assert await writeback.upload_pending(backoff=True) == 1
        assert c.backend.count("PUT") == puts  # left alone until its turn
        entry.retry_at = 0.0
        assert await writeback.upload_pending(backoff=True) == 1
        assert entry.retries == 2 and entry.retry_at - time.monotonic() > 55  # twice as long
        c.backend._failures.clear()
        assert await writeback.upload_pending() == 0  # (the unmount does not wait for the turn)
        assert c.backend.data("later") == b"x"

    run(test, tmp_path)


def test_a_reader_whose_fetcher_process_fails_gets_the_file_from_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader's fetch goes to an idle fetcher process; one that dies (or answers garbage) costs the reader
    nothing but the daemon's own request."""
    asked: list[str] = []

    async def broken(self: Fetchers, url: str, limit: int, known: object) -> None:
        asked.append(url)
        raise StorageError("fetcher process 4242 exited (status -9)")

    monkeypatch.setattr(Fetchers, "ready", lambda self: True)
    monkeypatch.setattr(Fetchers, "fetch_small", broken)

    async def test(c: Client) -> None:
        c.backend.put("f/small.bin", b"small")
        assert await c.read(f"{ROOT}/f/small.bin") == b"small"
        assert len(asked) == 1

    run(test, tmp_path, "readahead_files=0")
