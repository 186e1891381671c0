"""Reading and writing files through the Operations class over an in-memory bucket: what reaches the server,
what the reader gets, and when."""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import trio

from clearmlfs.config import Settings
from clearmlfs.mount import build, parse_options
from tests.fast.harness import ROOT, Client, MemoryPool, errno_of, memory_mount, run, settings_for

MIB = 1024 * 1024


def data(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


@pytest.mark.parametrize("size", [0, 1, 4096, 100_000, 3 * MIB])
def test_a_file_written_is_on_the_server_when_close_returns(tmp_path: Path, size: int) -> None:
    async def test(c: Client) -> None:
        await c.write(f"{ROOT}/f.bin", data(size))
        assert c.backend.data("f.bin") == data(size)
        assert (await c.attrs(f"{ROOT}/f.bin")).st_size == size
        assert await c.read(f"{ROOT}/f.bin") == data(size)

    run(test, tmp_path)


@pytest.mark.parametrize("size", [1, 5 * MIB, 9 * MIB + 123])
def test_an_object_on_the_server_reads_whole(tmp_path: Path, size: int) -> None:
    async def test(c: Client) -> None:
        c.backend.put("obj", data(size, 1))
        assert await c.read(f"{ROOT}/obj") == data(size, 1)

    run(test, tmp_path, "read_part_size=1M")


@pytest.mark.parametrize("start,size", [(0, 10), (MIB - 5, 10), (3 * MIB + 1, MIB), (6 * MIB - 1, 100)])
def test_reads_anywhere_in_a_large_object_get_the_right_bytes(tmp_path: Path, start: int, size: int) -> None:
    async def test(c: Client) -> None:
        c.backend.put("big", data(6 * MIB, 2))
        assert await c.read(f"{ROOT}/big", start, size) == data(6 * MIB, 2)[start:start + size]

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_a_large_object_read_once_is_served_from_the_cache_afterwards(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("big", data(5 * MIB, 3))
        assert await c.read(f"{ROOT}/big") == data(5 * MIB, 3)
        gets = c.backend.count("GET")
        assert await c.read(f"{ROOT}/big") == data(5 * MIB, 3)
        assert c.backend.count("GET") == gets

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_readers_of_one_object_share_one_download(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("big", data(4 * MIB, 4))
        first, second = await c.open(f"{ROOT}/big"), await c.open(f"{ROOT}/big")
        assert await c.read_fh(first) == data(4 * MIB, 4)
        assert await c.read_fh(second) == data(4 * MIB, 4)
        await c.ops.release(first)
        await c.ops.release(second)
        assert c.backend.count("GET") <= 4  # four 1 MiB parts, each fetched once

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_random_reads_of_a_large_object_fetch_about_what_they_read(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        content = data(64 * MIB, 5)
        c.backend.put("big", content)
        rng = np.random.default_rng(6)
        fh = await c.open(f"{ROOT}/big")
        read = 0
        for offset in rng.integers(1, 64 * MIB - 64 * 1024, 40) // 4096 * 4096:
            assert await c.read_fh(fh, int(offset), 64 * 1024) == content[offset:offset + 64 * 1024]
            read += 64 * 1024
        await c.ops.release(fh)
        assert c.backend.bytes_sent <= 2 * read

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_a_sequential_reader_gets_a_growing_read_ahead(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        content = data(40 * MIB, 7)
        c.backend.put("big", content)
        assert await c.read(f"{ROOT}/big") == content
        # 1, 2, 4 parts, then GETs of `coalesce` (4) parts: not a GET per read, nor per part
        assert c.backend.count("GET") <= 12
        assert c.backend.bytes_sent == 40 * MIB
        gets = c.backend.count("GET")
        assert await c.read(f"{ROOT}/big") == content  # complete: published, served from the cache
        assert c.backend.count("GET") == gets

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_a_reader_going_on_from_a_random_read_becomes_sequential(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        content = data(32 * MIB, 8)
        c.backend.put("big", content)
        fh = await c.open(f"{ROOT}/big")
        assert await c.read_fh(fh, 5 * MIB, 128 * 1024) == content[5 * MIB:5 * MIB + 128 * 1024]
        assert c.backend.bytes_sent == 128 * 1024  # alone: only what it read
        assert await c.read_fh(fh, 5 * MIB + 128 * 1024) == content[5 * MIB + 128 * 1024:]
        await c.ops.release(fh)
        assert c.backend.count("GET") <= 12

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


async def read_some(c: Client, offsets: list[int], content: bytes, size: int = 64 * 1024) -> None:
    """Random reads at `offsets`, through one handle, checked against `content`."""
    fh = await c.open(f"{ROOT}/big")
    for offset in offsets:
        assert await c.read_fh(fh, offset, size) == content[offset:offset + size]
    await c.ops.release(fh)


OFFSETS = [3 * MIB + 4096, 11 * MIB, 7 * MIB + 12288, 29 * MIB]


def test_the_ranges_read_are_kept_for_the_next_mount(tmp_path: Path) -> None:
    async def main() -> None:
        content = data(32 * MIB, 9)
        pool = MemoryPool(settings_for(tmp_path / "cache"))
        async with memory_mount(tmp_path, "read_part_size=1M,small_file_size=64K", pool=pool) as c:
            c.backend.put("big", content)
            await read_some(c, OFFSETS, content)
            sent = c.backend.bytes_sent
        async with memory_mount(tmp_path, "read_part_size=1M,small_file_size=64K", pool=pool) as c:
            await read_some(c, OFFSETS[::-1], content)
            assert c.backend.bytes_sent == sent  # all of them from the cache file
            await read_some(c, [20 * MIB], content)
            assert c.backend.bytes_sent == sent + 64 * 1024  # and only what is new from the server

    trio.run(main)


def test_ranges_kept_of_an_older_version_are_never_served(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        old, new = data(32 * MIB, 10), data(32 * MIB, 11)
        c.backend.put("big", old)
        await read_some(c, OFFSETS, old)
        c.backend.put("big", new)
        await trio.sleep(0.05)  # past the ttl: the next open sees the new version
        await read_some(c, OFFSETS, new)

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K,ttl=0.02,list_ttl=0.02")


def test_a_partial_copy_is_never_taken_for_a_complete_one(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        content = data(32 * MIB, 12)
        c.backend.put("big", content)
        await read_some(c, OFFSETS, content)
        url = f"s3://{c.backend.url_prefix.split('://', 1)[1]}/big"
        assert c.fs.cache.lookup(url) is None  # not under the SDK's name, where the SDK would take it
        assert not list(c.fs.cache.folder.glob("*.partially"))
        assert await c.read(f"{ROOT}/big") == content  # read whole: completed from what was kept, published
        assert c.fs.cache.lookup(url) is not None
        assert not list(c.fs.cache.state_folder.glob("*.sparse"))

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K")


def test_partial_copies_are_evicted_beyond_their_share_of_the_cache(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        contents = [data(16 * MIB, 20 + index) for index in range(8)]
        for index, content in enumerate(contents):
            c.backend.put(f"big{index}", content)
        for index, content in enumerate(contents):
            fh = await c.open(f"{ROOT}/big{index}")
            assert await c.read_fh(fh, 5 * MIB, 4096) == content[5 * MIB:5 * MIB + 4096]
            await c.ops.release(fh)
        c.fs.cache.clean()
        assert len(list(c.fs.cache.state_folder.glob("*.sparse"))) <= 1  # a quarter of cache_files=4

    run(test, tmp_path, "read_part_size=1M,small_file_size=64K,cache_files=4")


def test_a_large_new_file_is_uploaded_as_one_stream(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        await c.write(f"{ROOT}/ckpt", data(20 * MIB, 5))
        assert c.backend.data("ckpt") == data(20 * MIB, 5)
        assert c.backend.count("PUT") == 1

    run(test, tmp_path)


def test_overwriting_replaces_the_object(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("o", b"old content, long")
        await c.write(f"{ROOT}/o", b"new", os.O_WRONLY | os.O_TRUNC)
        assert c.backend.data("o") == b"new"
        assert await c.read(f"{ROOT}/o") == b"new"

    run(test, tmp_path)


def test_patching_the_middle_of_an_object_keeps_the_rest(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("p", b"0123456789")
        fh = await c.open(f"{ROOT}/p", os.O_RDWR)
        await c.ops.write(fh, 3, b"abc")
        await c.close(fh)
        assert c.backend.data("p") == b"012abc6789"

    run(test, tmp_path)


def test_appending_past_the_end(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("log", b"line1\n")
        fh = await c.open(f"{ROOT}/log", os.O_WRONLY | os.O_APPEND)
        await c.ops.write(fh, 6, b"line2\n")
        await c.close(fh)
        assert c.backend.data("log") == b"line1\nline2\n"

    run(test, tmp_path)


@pytest.mark.parametrize("size", [0, 4, 20])
def test_truncate_without_a_handle_uploads_the_new_size(tmp_path: Path, size: int) -> None:
    async def test(c: Client) -> None:
        c.backend.put("t", b"0123456789")
        await c.truncate(f"{ROOT}/t", size)
        assert c.backend.data("t") == b"0123456789"[:size].ljust(size, b"\0")

    run(test, tmp_path)


def test_fsync_stores_what_is_written_so_far(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/s", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        await c.ops.write(fh, 0, b"first")
        await c.ops.fsync(fh, False)
        assert c.backend.data("s") == b"first"
        await c.ops.write(fh, 5, b" second")
        await c.close(fh)
        assert c.backend.data("s") == b"first second"

    run(test, tmp_path)


def test_two_writers_of_one_file_lose_nothing(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("shared", b"..........")
        a, b = await c.open(f"{ROOT}/shared", os.O_RDWR), await c.open(f"{ROOT}/shared", os.O_RDWR)
        await c.ops.write(a, 0, b"AA")
        await c.ops.write(b, 8, b"BB")
        await c.close(a)
        await c.close(b)
        assert c.backend.data("shared") == b"AA......BB"

    run(test, tmp_path)


def test_a_file_being_written_reads_back_what_was_written(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/rw", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        await c.ops.write(fh, 0, b"hello")
        assert bytes(await c.ops.read(fh, 0, 100)) == b"hello"
        await c.close(fh)

    run(test, tmp_path)


def test_a_new_file_shows_in_its_folder_before_and_after_upload(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/new.txt", os.O_WRONLY | os.O_CREAT)
        assert "new.txt" in await c.listdir(ROOT)
        await c.ops.write(fh, 0, b"x")
        await c.close(fh)
        assert "new.txt" in await c.listdir(ROOT)

    run(test, tmp_path)


def test_opening_a_folder_for_reading_as_a_file_is_eisdir(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("d/x", b"1")
        assert await errno_of(c.open(f"{ROOT}/d")) == errno.EISDIR

    run(test, tmp_path)


def test_a_zero_byte_object_reads_empty(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("empty", b"")
        assert await c.read(f"{ROOT}/empty") == b""

    run(test, tmp_path)


def test_small_files_of_a_folder_read_in_order_are_fetched_ahead(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(12):
            c.backend.put(f"ds/{i:03d}", data(1000, i))
        for i in range(12):
            assert await c.read(f"{ROOT}/ds/{i:03d}") == data(1000, i)
        assert c.backend.count("GET") == 12  # each object fetched once, ahead or not

    run(test, tmp_path)


def test_the_cache_stays_within_its_file_limit(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(20):
            c.backend.put(f"many/{i:02d}", b"x" * 100)
        for i in range(20):
            await c.read(f"{ROOT}/many/{i:02d}")
        files, _ = c.fs.cache.stats()
        assert files <= 8

    run(test, tmp_path, "cache_files=8,readahead_files=0")


def test_a_dataset_of_more_files_than_the_sdks_limit_is_fetched_once_over_two_epochs(tmp_path: Path) -> None:
    # By default the mount counts no files (ClearML's 100 would evict the dataset while an epoch reads it):
    # bytes and the disk's free space decide.
    async def test(c: Client) -> None:
        for i in range(150):
            c.backend.put(f"ds/{i:03d}", data(100, i))
        for _epoch in range(2):
            for i in range(150):
                assert await c.read(f"{ROOT}/ds/{i:03d}") == data(100, i)
        assert c.backend.count("GET") == 150
        assert c.fs.cache.stats()[0] == 150

    run(test, tmp_path, "readahead_files=0")


def test_a_file_count_set_in_clearml_conf_or_as_an_option_applies_to_the_mount(tmp_path: Path) -> None:
    def file_limit(settings: Settings, *options: str) -> int | None:
        return build(settings, parse_options(["fetch_processes=0", *options]), MemoryPool(settings)).cache.file_limit

    unset = settings_for(tmp_path / "cache")
    assert file_limit(unset) is None
    assert file_limit(unset, "cache_files=20") == 20
    configured = dataclasses.replace(unset, cache_file_limit=8, cache_file_limit_set=True)
    assert file_limit(configured) == 8
    assert file_limit(configured, "cache_files=20") == 20


# -- rename and unlink of open files ------------------------------------------------------------------------------
async def _write_fh(c: Client, fh: int, offset: int, data: bytes) -> int:
    for start in range(0, len(data), 128 * 1024):
        await c.ops.write(fh, offset + start, data[start:start + 128 * 1024])
    return offset + len(data)


@pytest.mark.parametrize("size", [10, 20 * 1024 * 1024])  # (the large one is uploading while written)
def test_a_file_renamed_while_written_lands_under_its_new_name(tmp_path: Path, size: int) -> None:
    async def test(c: Client) -> None:
        first, more = os.urandom(size), os.urandom(1000)
        fh = await c.open(f"{ROOT}/x.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        end = await _write_fh(c, fh, 0, first)
        await c.rename(f"{ROOT}/x.tmp", f"{ROOT}/x")
        await _write_fh(c, fh, end, more)
        await c.close(fh)
        assert c.backend.data("x") == first + more
        assert c.backend.data("x.tmp") is None
        assert await c.read(f"{ROOT}/x") == first + more
        assert "x.tmp" not in await c.listdir(ROOT)

    run(test, tmp_path)


@pytest.mark.parametrize("size", [10, 20 * 1024 * 1024])
def test_files_open_for_writing_move_with_their_folder(tmp_path: Path, size: int) -> None:
    async def test(c: Client) -> None:
        c.backend.put("step.tmp/done.bin", b"uploaded before")
        first, more = os.urandom(size), os.urandom(1000)
        fh = await c.open(f"{ROOT}/step.tmp/model.pt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        end = await _write_fh(c, fh, 0, first)
        await c.rename(f"{ROOT}/step.tmp", f"{ROOT}/step")
        await _write_fh(c, fh, end, more)
        await c.close(fh)
        assert sorted(k for k in c.backend.objects) == ["step/done.bin", "step/model.pt"]
        assert c.backend.data("step/model.pt") == first + more
        assert await c.read(f"{ROOT}/step/model.pt") == first + more
        assert await c.listdir(ROOT) == ["step"]

    run(test, tmp_path)


def test_a_renamed_open_file_replaces_the_object_at_its_new_name(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("x", b"old")
        fh = await c.open(f"{ROOT}/x.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        await c.ops.write(fh, 0, b"new")
        await c.rename(f"{ROOT}/x.tmp", f"{ROOT}/x")
        await c.close(fh)
        assert c.backend.data("x") == b"new"

    run(test, tmp_path)


@pytest.mark.parametrize("size", [10, 20 * 1024 * 1024])
def test_an_unlinked_open_file_goes_on_and_is_never_uploaded(tmp_path: Path, size: int) -> None:
    async def test(c: Client) -> None:
        data = os.urandom(size)
        fh = await c.open(f"{ROOT}/scratch", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        end = await _write_fh(c, fh, 0, data)
        await c.unlink(f"{ROOT}/scratch")
        await _write_fh(c, fh, end, b"tail")
        assert await c.read_fh(fh, 0, size + 4) == data + b"tail"  # (TemporaryFile: create, unlink, use)
        await c.write(f"{ROOT}/scratch", b"someone else's")  # the name is free for a new file
        await c.close(fh)
        assert c.backend.data("scratch") == b"someone else's"
        assert await c.fs.writeback.upload_pending() == 0
        assert c.backend.data("scratch") == b"someone else's"

    run(test, tmp_path)


def test_an_object_unlinked_while_read_is_still_read_by_its_handle(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("r", b"content")
        fh = await c.open(f"{ROOT}/r")
        await c.unlink(f"{ROOT}/r")
        assert await c.read_fh(fh) == b"content"
        await c.ops.release(fh)
        assert c.backend.data("r") is None

    run(test, tmp_path)


def test_a_close_that_waited_for_a_rename_uploads_under_the_new_name(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/x.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        await c.ops.write(fh, 0, b"data")
        moving, go_on = threading.Event(), threading.Event()
        move = c.fs.cache.move

        def slow_move(url: str, new_url: str, etag: str) -> None:
            moving.set()
            go_on.wait(10)  # the rename holds the file's lock meanwhile
            move(url, new_url, etag)

        c.fs.cache.move = slow_move  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.rename, f"{ROOT}/x.tmp", f"{ROOT}/x")
            await trio.to_thread.run_sync(moving.wait, 10)
            nursery.start_soon(c.close, fh)  # its upload waits for the lock, then goes where the file is now
            await trio.sleep(0.1)
            go_on.set()
        assert c.backend.data("x") == b"data"
        assert c.backend.data("x.tmp") is None

    run(test, tmp_path)
