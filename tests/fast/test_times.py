"""Stored times and modes (object metadata) through the Operations class over an in-memory bucket, which,
as S3, shows no metadata in its listings."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import trio

from clearmlfs.backends.base import Attrs
from tests.fast.harness import ROOT, Client, memory_mount, run

OLD = 1_600_000_000_123_456_789  # an mtime in nanoseconds, as rsync and cp -p set them


def test_utimens_and_chmod_of_a_clean_object_are_stored_without_a_transfer(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("f", b"content")
        before = len(c.backend.requests)
        attrs = await c.setattr(f"{ROOT}/f", mtime_ns=OLD, mode=stat.S_IFREG | 0o600)
        assert (attrs.st_mtime_ns, stat.S_IMODE(attrs.st_mode)) == (OLD, 0o600)
        assert c.backend.objects["f"].attrs == Attrs(OLD, stat.S_IFREG | 0o600)
        assert c.backend.data("f") == b"content"
        assert not [r for r in c.backend.requests[before:] if r.startswith(("GET", "PUT"))], c.backend.requests

    run(test, tmp_path)


def test_times_and_modes_set_while_written_are_uploaded_with_the_content(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/new", 0o100 | 0o2)  # O_CREAT | O_RDWR
        await c.ops.write(fh, 0, b"abc")
        await c.setattr(f"{ROOT}/new", mtime_ns=OLD, mode=stat.S_IFREG | 0o640)
        assert (await c.attrs(f"{ROOT}/new")).st_mtime_ns == OLD
        await c.close(fh)
        assert c.backend.objects["new"].attrs == Attrs(OLD, stat.S_IFREG | 0o640)
        await c.write(f"{ROOT}/plain", b"x")  # no chmod: its mtime and the default mode are stored all the same
        stored = c.backend.objects["plain"].attrs
        assert stored.mode == stat.S_IFREG | 0o644 and stored.mtime_ns is not None
        assert (await c.attrs(f"{ROOT}/plain")).st_mtime_ns == stored.mtime_ns

    run(test, tmp_path)


def test_a_listed_file_shows_its_stored_time_by_a_head_and_server_times_skips_it(tmp_path: Path) -> None:
    async def check(c: Client, expect_stored: bool) -> None:
        c.backend.put("d/f", b"x")
        stored = dataclasses.replace(c.backend.objects["d/f"], mtime=1.0e9, attrs=Attrs(OLD, 0o100600))
        c.backend.objects["d/f"] = stored
        assert await c.listdir(f"{ROOT}/d") == ["f"]
        heads = c.backend.count("HEAD")
        attrs = await c.attrs(f"{ROOT}/d/f")
        if expect_stored:
            assert (attrs.st_mtime_ns, stat.S_IMODE(attrs.st_mode)) == (OLD, 0o600)
            assert c.backend.count("HEAD") == heads + 1
            await c.attrs(f"{ROOT}/d/f")
            assert c.backend.count("HEAD") == heads + 1  # known now, as long as its ETag stays
        else:
            assert attrs.st_mtime_ns == 1_000_000_000 * 10**9 and c.backend.count("HEAD") == heads

    async def main(options: tuple[str, ...], expect_stored: bool, name: str) -> None:
        async with memory_mount(tmp_path / name, *options) as c:
            await check(c, expect_stored)

    trio.run(main, (), True, "stored")
    trio.run(main, ("server_times",), False, "server")


def test_truncate_updates_mtime_and_ctime(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("f", b"0123456789")
        await c.setattr(f"{ROOT}/f", mtime_ns=OLD)
        attrs = await c.setattr(f"{ROOT}/f", size=4)
        assert attrs.st_size == 4 and attrs.st_mtime_ns > OLD and attrs.st_ctime_ns == attrs.st_mtime_ns
        assert c.backend.data("f") == b"0123"

    run(test, tmp_path)
