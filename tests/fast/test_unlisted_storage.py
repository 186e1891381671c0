"""A storage that cannot list (a ClearML fileserver, under http/): names are found by HEAD, folders are made
here, and a folder shows the names found or made in it. Through the Operations class, over an in-memory
server that refuses listings as the fileserver backend does."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from pathlib import Path

import trio

from clearmlfs.backends import ObjectInfo, Prefix
from clearmlfs.backends.memory import MemoryBackend
from clearmlfs.config import ApiSettings
from clearmlfs.errors import Unsupported
from clearmlfs.mount import build, parse_options, start
from tests.fast.harness import Client, MemoryPool, errno_of, is_dir, memory_mount, settings_for

WEB = "http://web:8081"
HERE = "http/web:8081"


class Unlisted(MemoryBackend):
    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        raise Unsupported("a fileserver cannot list")


def run(test, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        pool = MemoryPool(settings_for(tmp_path / "cache"))
        web = pool.buckets[WEB] = Unlisted(WEB)
        async with memory_mount(tmp_path, pool=pool) as client:
            await test(client, web)

    trio.run(main)


def test_a_file_is_found_by_name_and_a_missing_one_is_not(tmp_path: Path) -> None:
    async def test(c: Client, web: MemoryBackend) -> None:
        web.put("top.bin", b"on the server")
        assert await c.read(f"{HERE}/top.bin") == b"on the server"
        assert await errno_of(c.attrs(f"{HERE}/missing.bin")) == errno.ENOENT
        assert await errno_of(c.attrs(f"{HERE}/d")) == errno.ENOENT  # a folder it cannot tell from nothing

    run(test, tmp_path)


def test_a_folder_made_here_stays_reachable_and_sends_nothing(tmp_path: Path) -> None:
    async def test(c: Client, web: MemoryBackend) -> None:
        web.put("runs/r1/model.pt", b"weights")
        await c.mkdir(f"{HERE}/runs")
        await c.mkdir(f"{HERE}/runs/r1")
        assert is_dir(await c.attrs(f"{HERE}/runs/r1"))  # (looked up again: the Client has no dentry cache)
        assert await c.read(f"{HERE}/runs/r1/model.pt") == b"weights"
        assert sorted(web.objects) == ["runs/r1/model.pt"]  # no folder marker

    run(test, tmp_path)


def test_a_folder_shows_the_names_found_or_written_in_it(tmp_path: Path) -> None:
    async def test(c: Client, web: MemoryBackend) -> None:
        for name in ("a", "b", "c"):
            web.put(f"d/{name}", name.encode())
        await c.mkdir(f"{HERE}/d")
        assert await c.listdir(f"{HERE}/d") == []
        await c.attrs(f"{HERE}/d/b")
        await c.write(f"{HERE}/d/new", b"written")
        await c.mkdir(f"{HERE}/d/sub")
        assert sorted(await c.listdir(f"{HERE}/d")) == ["b", "new", "sub"]
        assert web.objects["d/new"].data == b"written"
        inode = await c.inode(f"{HERE}/d/b")
        web.delete("d/b")  # deleted behind the mount's back: once the kernel forgot it, the listing asks again
        await c.ops.forget([(inode, 10**6)])
        assert sorted(await c.listdir(f"{HERE}/d")) == ["new", "sub"]
        await c.unlink(f"{HERE}/d/new")
        assert await c.listdir(f"{HERE}/d") == ["sub"]
        assert "d/new" not in web.objects

    run(test, tmp_path)


def test_folders_are_forgotten_not_renamed(tmp_path: Path) -> None:
    async def test(c: Client, web: MemoryBackend) -> None:
        web.put("d/kept", b"x")
        await c.mkdir(f"{HERE}/d")
        await c.mkdir(f"{HERE}/d/e")
        assert await errno_of(c.rename(f"{HERE}/d/e", f"{HERE}/d/f")) == errno.ENOTSUP
        await c.attrs(f"{HERE}/d/kept")
        assert await errno_of(c.rmdir(f"{HERE}/d")) == errno.ENOTEMPTY
        await c.rmdir(f"{HERE}/d/e")
        assert await c.listdir(f"{HERE}/d") == ["kept"]

    run(test, tmp_path)


def test_files_rename_and_names_it_could_not_serve_back_are_refused(tmp_path: Path) -> None:
    async def test(c: Client, web: MemoryBackend) -> None:
        web.put("a.bin", b"content")
        await c.rename(f"{HERE}/a.bin", f"{HERE}/b.bin")
        assert sorted(web.objects) == ["b.bin"] and await c.read(f"{HERE}/b.bin") == b"content"
        assert await errno_of(c.write(f"{HERE}/50%.bin", b"x")) == errno.EINVAL
        assert await errno_of(c.write(f"{HERE}/q?.bin", b"x")) == errno.EINVAL

    run(test, tmp_path)


def test_times_and_modes_are_not_stored_and_not_refused(tmp_path: Path) -> None:
    async def test(c: Client, web: MemoryBackend) -> None:
        info = web.put("f.bin", b"x")
        await c.setattr(f"{HERE}/f.bin", mtime_ns=1_000_000_000, mode=0o600)
        assert web.stat("f.bin").etag == info.etag  # untouched

    run(test, tmp_path)


def test_a_fileserver_under_a_path_shows_that_path_as_folders(tmp_path: Path) -> None:
    async def main() -> None:
        settings = dataclasses.replace(
            settings_for(tmp_path / "cache"), api=ApiSettings(files_server=f"{WEB}/clearml/files")
        )
        pool = MemoryPool(settings)
        web = pool.buckets[WEB] = Unlisted(WEB)
        web.put("clearml/files/p/model.pt", b"weights")
        fs = build(settings, parse_options(["passthrough=off", "fetch_processes=0"]), pool)
        async with trio.open_nursery() as nursery:
            await start(fs, nursery)
            c = Client(fs, web)
            assert "http" in await c.listdir("")
            assert await c.listdir("http") == ["web:8081"]
            assert await c.listdir(HERE) == ["clearml"]
            assert await c.listdir(f"{HERE}/clearml") == ["files"]
            assert is_dir(await c.attrs(f"{HERE}/clearml/files"))
            await c.mkdir(f"{HERE}/clearml/files/p")
            assert await c.read(f"{HERE}/clearml/files/p/model.pt") == b"weights"
            nursery.cancel_scope.cancel()

    trio.run(main)
