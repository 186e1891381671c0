"""The filesystem without FUSE and without servers: `memory_mount` wires it as a mount would (mount.build,
mount.start) over in-memory buckets, and `Client` calls its Operations the way the kernel would."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import trio

from clearmlfs.backends import BackendPool
from clearmlfs.backends.base import Backend
from clearmlfs.backends.memory import MemoryBackend
from clearmlfs.config import S3Credentials, S3Settings, Settings
from clearmlfs.mount import Filesystem, build, parse_options, start
from clearmlfs.urls import StorageURL

HOST, BUCKET = "mem:1", "bucket"
ROOT = f"s3/{HOST}/{BUCKET}"  # the bucket's folder in the mount
CTX = pyfuse3.RequestContext()
READ_SIZE = 128 * 1024  # what the kernel asks for at a time


class MemoryPool(BackendPool):
    """Every bucket is an in-memory one, kept across mounts of the same pool."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.buckets: dict[str, MemoryBackend] = {}

    def _create(self, url: StorageURL, creds: object) -> Backend:
        return self.buckets.setdefault(url.root, MemoryBackend(url.root))

    def bucket(self) -> MemoryBackend:
        return self.buckets.setdefault(f"s3://{HOST}/{BUCKET}", MemoryBackend(f"s3://{HOST}/{BUCKET}"))


def settings_for(cache_dir: Path) -> Settings:
    creds = S3Credentials(bucket=BUCKET, host=HOST, key="k", secret="s", secure=False)
    return Settings(s3=S3Settings(credentials=(creds,)), cache_dir=cache_dir)


class Client:
    """Requests as the kernel makes them, by path (relative to the mount root)."""

    def __init__(self, fs: Filesystem, backend: MemoryBackend) -> None:
        self.fs, self.ops, self.backend = fs, fs.ops, backend

    async def inode(self, path: str) -> int:
        inode = pyfuse3.ROOT_INODE
        for name in filter(None, path.split("/")):
            inode = (await self.ops.lookup(inode, os.fsencode(name), CTX)).st_ino
        return inode

    async def attrs(self, path: str) -> pyfuse3.EntryAttributes:
        return await self.ops.getattr(await self.inode(path), CTX)

    async def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        if flags & os.O_CREAT:
            parent, _, name = path.rpartition("/")
            info, _ = await self.ops.create(await self.inode(parent), os.fsencode(name), 0o644, flags, CTX)
        else:
            info = await self.ops.open(await self.inode(path), flags, CTX)
        return int(info.fh)

    async def close(self, fh: int) -> None:
        try:
            await self.ops.flush(fh)
        finally:
            await self.ops.release(fh)

    async def write(self, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
        fh = await self.open(path, flags)
        try:
            for offset in range(0, len(data), READ_SIZE):
                await self.ops.write(fh, offset, data[offset:offset + READ_SIZE])
        except BaseException:
            with contextlib.suppress(pyfuse3.FUSEError):
                await self.close(fh)
            raise
        await self.close(fh)

    async def read(self, path: str, start: int = 0, size: int | None = None) -> bytes:
        fh = await self.open(path)
        try:
            return await self.read_fh(fh, start, size)
        finally:
            await self.ops.release(fh)

    async def read_fh(self, fh: int, start: int = 0, size: int | None = None) -> bytes:
        out = bytearray()
        offset, end = start, None if size is None else start + size
        while end is None or offset < end:
            want = READ_SIZE if end is None else min(READ_SIZE, end - offset)
            piece = bytes(await self.ops.read(fh, offset, want))
            if not piece:
                break
            out += piece
            offset += len(piece)
        return bytes(out)

    async def listdir(self, path: str) -> list[str]:
        """The names in a folder, as os.listdir gives them (without "." and "..")."""
        return [n for n in await self.readdir(path) if n not in (".", "..")]

    async def opendir(self, path: str) -> int:
        """The handle of an opened folder (opendir may answer with a FileInfo: the kernel's readdir cache)."""
        opened = await self.ops.opendir(await self.inode(path), CTX)
        return opened if isinstance(opened, int) else int(opened.fh)

    async def readdir(self, path: str) -> list[str]:
        """Every name readdir replies with."""
        fh = await self.opendir(path)
        names: list[str] = []

        def reply(token: object, name: bytes, attrs: object, next_id: int) -> bool:
            names.append(os.fsdecode(name))
            return True

        original = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = reply  # the reply buffer is the kernel's; here, a list
        try:
            await self.ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        finally:
            pyfuse3.readdir_reply = original
            await self.ops.releasedir(fh)
        return names

    async def mkdir(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.ops.mkdir(await self.inode(parent), os.fsencode(name), 0o755, CTX)

    async def rmdir(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.ops.rmdir(await self.inode(parent), os.fsencode(name), CTX)

    async def unlink(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.ops.unlink(await self.inode(parent), os.fsencode(name), CTX)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        old_parent, _, old_name = old.rpartition("/")
        new_parent, _, new_name = new.rpartition("/")
        await self.ops.rename(
            await self.inode(old_parent), os.fsencode(old_name), await self.inode(new_parent),
            os.fsencode(new_name), flags, CTX,
        )

    async def truncate(self, path: str, size: int) -> None:
        await self.setattr(path, size=size)

    async def setattr(
        self, path: str, size: int | None = None, mtime_ns: int | None = None, mode: int | None = None
    ) -> pyfuse3.EntryAttributes:
        """truncate, utimens (mtime) and chmod, as one setattr request."""
        attrs = pyfuse3.EntryAttributes()
        given = {"size": size, "mtime": mtime_ns, "mode": mode}
        attrs.st_size, attrs.st_mtime_ns, attrs.st_mode = size or 0, mtime_ns or 0, mode or 0
        # (pyfuse3's SetattrFields is filled in by pyfuse3 alone: its fields cannot be set here)
        fields = SimpleNamespace(**{f"update_{n}": given.get(n) is not None for n in ("size", "mode", "uid", "gid",
                                                                                      "atime", "mtime", "ctime")})
        return await self.ops.setattr(await self.inode(path), attrs, fields, None, CTX)  # type: ignore[arg-type]


async def errno_of(action: Awaitable[Any]) -> int | None:
    try:
        await action
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return None


def is_dir(attrs: pyfuse3.EntryAttributes) -> bool:
    return stat.S_ISDIR(attrs.st_mode)


@contextlib.asynccontextmanager
async def memory_mount(
    tmp_path: Path, *options: str, pool: MemoryPool | None = None
) -> AsyncIterator[Client]:
    """The filesystem over in-memory buckets, with its background tasks running, for the block."""
    settings = settings_for(tmp_path / "cache")
    pool = pool or MemoryPool(settings)
    opts = parse_options(["passthrough=off", "fetch_processes=0", *options])
    fs = build(settings, opts, pool)
    async with trio.open_nursery() as nursery:
        await start(fs, nursery)
        yield Client(fs, pool.bucket())
        nursery.cancel_scope.cancel()


def run(test: Callable[[Client], Awaitable[None]], tmp_path: Path, *options: str) -> None:
    """Run `test` against a fresh in-memory mount."""

    async def main() -> None:
        async with memory_mount(tmp_path, *options) as client:
            await test(client)

    trio.run(main)


__all__ = ["BUCKET", "HOST", "ROOT", "Client", "MemoryPool", "errno", "errno_of", "memory_mount", "run"]
