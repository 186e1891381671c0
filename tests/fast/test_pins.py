"""What an open file costs the daemon: one descriptor at most, its pin being a lock file linked to the cache file
and locked through that same descriptor; and the separate lock file where a link cannot be made."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import trio

from clearmlfs import cache as cache_module
from clearmlfs.cache import CacheContext, entry_name
from clearmlfs.config import SizeCache
from clearmlfs.fs.files import OpenFile
from tests.fast.harness import ROOT, Client, memory_mount, run

MIB = 1024 * 1024


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def lock_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".lock.*.clearml"))


def held(lock: Path) -> bool:
    """Whether someone holds `lock`, checked as the SDK's cleaner and `is_pinned` do."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def handle(c: Client, fh: int) -> OpenFile:
    return c.fs.ops.files._handles[fh]


async def cached(c: Client, names: list[str], size: int) -> None:
    """Each of `names` on the server and in the cache, none of them open."""
    for i, name in enumerate(names):
        c.backend.put(name, bytes([i % 256]) * size)
    for i, name in enumerate(names):
        assert await c.read(f"{ROOT}/{name}") == bytes([i % 256]) * size


@pytest.mark.parametrize("size", [1000, 6 * MIB])  # a small object, a large one (streamed in the first time)
def test_each_open_file_costs_at_most_one_descriptor(tmp_path: Path, size: int) -> None:
    names = [f"f{i}.bin" for i in range(12)]

    async def test(c: Client) -> None:
        await cached(c, names, size)
        for name in names:  # (the inodes looked up before counting)
            await c.inode(f"{ROOT}/{name}")
        before = descriptors()
        fhs = [await c.open(f"{ROOT}/{name}") for name in names]
        assert descriptors() - before <= len(names)
        locks = lock_files(c.fs.cache.folder)
        assert len(locks) == len(names)
        for lock in locks:
            assert lock.stat().st_nlink == 2 and held(lock)  # the cache file's second name, locked
        for i, fh in enumerate(fhs):
            assert await c.read_fh(fh, size - 10) == bytes([i % 256]) * 10
            await c.close(fh)
        assert lock_files(c.fs.cache.folder) == []
        assert descriptors() <= before

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_handles_of_one_file_share_its_descriptor_until_the_last_is_closed(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        await cached(c, ["a.bin"], 100_000)
        first, second = await c.open(f"{ROOT}/a.bin"), await c.open(f"{ROOT}/a.bin")
        assert handle(c, first).fd == handle(c, second).fd and handle(c, first).shared_fd
        [lock] = lock_files(c.fs.cache.folder)
        await c.close(first)
        assert held(lock)
        assert await c.read_fh(second) == bytes([0]) * 100_000
        await c.close(second)
        assert not lock.exists()

    run(test, tmp_path)


def test_a_writer_alone_costs_one_descriptor(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        await cached(c, ["w.bin"], 1000)
        fh = await c.open(f"{ROOT}/w.bin", os.O_RDWR)
        assert handle(c, fh).shared_fd
        await c.ops.write(fh, 0, b"new")
        await c.close(fh)
        assert c.backend.data("w.bin")[:4] == b"new\0"
        assert lock_files(c.fs.cache.folder) == []

    run(test, tmp_path)


def test_a_file_streaming_in_is_pinned_by_a_link_to_its_download(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("big.bin", b"x" * 6 * MIB)
        fh = await c.open(f"{ROOT}/big.bin")
        assert handle(c, fh).download is not None and handle(c, fh).shared_fd
        [lock] = lock_files(c.fs.cache.folder)
        assert held(lock) and os.fstat(handle(c, fh).fd).st_ino == lock.stat().st_ino
        assert await c.read_fh(fh) == b"x" * 6 * MIB
        await c.close(fh)
        assert lock_files(c.fs.cache.folder) == []

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EPERM, errno.EMLINK])
def test_without_a_link_a_pin_takes_a_lock_file_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    async def main() -> None:
        async with memory_mount(tmp_path) as c:
            await cached(c, ["a.bin"], 1000)
            monkeypatch.setattr(cache_module.os, "link", refuse)
            first, second = await c.open(f"{ROOT}/a.bin"), await c.open(f"{ROOT}/a.bin")
            [lock] = lock_files(c.fs.cache.folder)
            assert lock.stat().st_nlink == 1 and lock.stat().st_size == 0 and held(lock)
            assert handle(c, first).fd == handle(c, second).fd
            await c.close(first)
            assert await c.read_fh(second) == bytes([0]) * 1000
            await c.close(second)
            assert lock_files(c.fs.cache.folder) == []

    trio.run(main)


def _cache_file(cache: CacheContext, url: str, content: bytes = b"data") -> Path:
    path = cache.path_for(url)
    path.write_bytes(content)
    return path


def test_an_open_entry_is_never_evicted_and_its_link_is_no_entry(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, file_limit=0, min_free="0")
    kept = _cache_file(cache, "s3://b/kept", b"k" * 100)
    pin = cache.open_pinned(kept, os.O_RDONLY)
    assert pin.linked
    assert cache.stats() == (1, 100)  # the link is neither an entry nor bytes
    other = _cache_file(cache, "s3://b/other")
    cache.clean()
    assert kept.exists() and not other.exists()
    cache.clear()
    assert kept.exists() and os.pread(pin.fd, 3, 0) == b"kkk"
    pin.release()
    assert lock_files(cache.folder) == []
    cache.clean()
    assert cache.stats() == (0, 0)


def test_a_pin_of_a_file_replaced_meanwhile_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CacheContext(tmp_path, min_free="0")
    path = _cache_file(cache, "s3://b/x")
    fd = os.open(path, os.O_RDONLY)
    _cache_file(cache, "s3://b/x.new").replace(path)  # (evicted and fetched again, between open and pin)
    with pytest.raises(FileNotFoundError):
        cache.hold(path, fd)
    assert lock_files(cache.folder) == []


def test_the_start_up_sweep_removes_the_links_nobody_holds(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, min_free="0")
    stale_file, held_file = _cache_file(cache, "s3://b/stale"), _cache_file(cache, "s3://b/held")
    stale = cache.folder / f".lock.000.{entry_name('s3://b/stale')}.clearml"
    os.link(stale_file, stale)  # a killed daemon's pin
    stale_file.unlink()  # and its file evicted since: the link alone keeps its blocks
    sdk_lock = cache.folder / f".lock.001.{entry_name('s3://b/stale')}.clearml"
    sdk_lock.touch()  # an SDK process's, perhaps an instant before its lock
    pin = cache.open_pinned(held_file, os.O_RDONLY)
    assert cache.sweep_locks() == 1
    assert not stale.exists() and sdk_lock.exists() and pin.path.exists() and held(pin.path)
    pin.release()


def test_in_the_sdks_size_aware_mode_the_link_is_in_the_state_folder_and_no_bytes(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, file_limit=None, size_mode=SizeCache(max_used_bytes=150, min_free_bytes=0,
                                                                      cleanup_seconds_threshold=0.0))
    kept = _cache_file(cache, "s3://b/kept", b"k" * 100)
    pin = cache.open_pinned(kept, os.O_RDONLY)
    assert pin.linked and pin.path.parent == cache.state_folder and held(pin.path)
    assert cache.stats() == (1, 100)
    _cache_file(cache, "s3://b/other", b"o" * 100)
    os.utime(kept, (0, 0))  # the least recently used
    cache.clean()
    assert kept.exists() and cache.stats() == (1, 100)
    pin.release()
    assert not pin.path.exists()
