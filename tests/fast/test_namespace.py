"""Lookups, listings and changes to the namespace, through the Operations class over an in-memory bucket."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from clearmlfs.backends import ObjectInfo, Prefix
from clearmlfs.errors import AccessDenied
from tests.fast.harness import CTX, HOST, ROOT, Client, MemoryPool, errno_of, is_dir, memory_mount, run, settings_for


def test_the_configured_levels_are_listed(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        assert await c.listdir("") == ["s3", "file"]
        assert await c.listdir("s3") == [HOST]
        assert await c.listdir(f"s3/{HOST}") == ["bucket"]
        assert is_dir(await c.attrs(ROOT))

    run(test, tmp_path)


def test_keys_show_as_files_and_prefixes_as_folders(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for key in ("a.txt", "d/b.txt", "d/e/c.txt"):
            c.backend.put(key, b"x" * 3)
        assert sorted(await c.listdir(ROOT)) == ["a.txt", "d"]
        assert sorted(await c.listdir(f"{ROOT}/d")) == ["b.txt", "e"]
        assert (await c.attrs(f"{ROOT}/d/e/c.txt")).st_size == 3
        assert is_dir(await c.attrs(f"{ROOT}/d/e"))

    run(test, tmp_path)


def test_a_prefix_wins_over_an_object_of_the_same_name(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("a", b"object")
        c.backend.put("a/b", b"under it")
        assert is_dir(await c.attrs(f"{ROOT}/a"))
        assert await c.read(f"{ROOT}/a/b") == b"under it"

    run(test, tmp_path)


@pytest.mark.parametrize("key", ["a//b", "../x", "./y", "z/./w"])
def test_keys_that_cannot_be_names_are_not_shown(tmp_path: Path, key: str) -> None:
    async def test(c: Client) -> None:
        c.backend.put(key, b"hidden")
        c.backend.put("shown", b"x")
        listed = await c.listdir(ROOT)
        assert "shown" in listed and ".." not in listed and "." not in listed and "" not in listed

    run(test, tmp_path)


@pytest.mark.parametrize("path", [f"{ROOT}/missing", f"{ROOT}/no/such/file", "gs", "azure", "nothing"])
def test_a_missing_name_is_enoent(tmp_path: Path, path: str) -> None:
    async def test(c: Client) -> None:
        assert await errno_of(c.attrs(path)) == errno.ENOENT

    run(test, tmp_path)


def test_a_miss_right_after_a_listing_costs_no_request(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("present", b"x")
        await c.listdir(ROOT)
        before = len(c.backend.requests)
        assert await errno_of(c.attrs(f"{ROOT}/absent")) == errno.ENOENT
        assert len(c.backend.requests) == before

    run(test, tmp_path)


def test_mkdir_writes_a_marker_and_rmdir_removes_it(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        await c.mkdir(f"{ROOT}/new")
        assert c.backend.data("new/") == b""
        assert is_dir(await c.attrs(f"{ROOT}/new"))
        await c.rmdir(f"{ROOT}/new")
        assert c.backend.data("new/") is None

    run(test, tmp_path)


def test_rmdir_of_a_folder_with_objects_is_enotempty(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("full/x", b"1")
        assert await errno_of(c.rmdir(f"{ROOT}/full")) == errno.ENOTEMPTY
        assert c.backend.data("full/x") == b"1"

    run(test, tmp_path)


def test_rmdir_of_a_file_is_enotdir_and_unlink_of_a_folder_eisdir(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("f", b"1")
        c.backend.put("d/x", b"1")
        assert await errno_of(c.rmdir(f"{ROOT}/f")) == errno.ENOTDIR
        assert await errno_of(c.unlink(f"{ROOT}/d")) == errno.EISDIR

    run(test, tmp_path)


def test_unlink_deletes_the_object_and_its_cached_copy(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("gone.txt", b"bye")
        assert await c.read(f"{ROOT}/gone.txt") == b"bye"
        await c.unlink(f"{ROOT}/gone.txt")
        assert c.backend.data("gone.txt") is None
        assert await errno_of(c.attrs(f"{ROOT}/gone.txt")) == errno.ENOENT
        assert c.fs.cache.stats()[0] == 0

    run(test, tmp_path)


def test_rename_of_a_file_copies_on_the_server_and_deletes_the_old_key(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("old.bin", b"content")
        await c.rename(f"{ROOT}/old.bin", f"{ROOT}/new.bin")
        assert c.backend.data("new.bin") == b"content" and c.backend.data("old.bin") is None
        assert c.backend.count("COPY") == 1 and c.backend.count("GET") == 0
        assert await c.read(f"{ROOT}/new.bin") == b"content"

    run(test, tmp_path)


def test_rename_without_replace_onto_an_existing_object_is_eexist(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("a", b"a")
        c.backend.put("b", b"b")
        flags = pyfuse3.RENAME_NOREPLACE
        assert await errno_of(c.rename(f"{ROOT}/a", f"{ROOT}/b", flags)) == errno.EEXIST
        assert c.backend.data("b") == b"b"

    run(test, tmp_path)


def test_a_folder_renames_with_everything_under_it(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for name in ("dir/", "dir/x", "dir/sub/y", "dir/sub/deep/z"):
            c.backend.put(name, name.encode())
        sub_inode = await c.inode(f"{ROOT}/dir/sub")
        await c.rename(f"{ROOT}/dir", f"{ROOT}/dir2")
        assert sorted(c.backend.objects) == ["dir2/", "dir2/sub/deep/z", "dir2/sub/y", "dir2/x"]
        assert await c.listdir(ROOT) == ["dir2"]
        assert await c.read(f"{ROOT}/dir2/sub/deep/z") == b"dir/sub/deep/z"
        assert await c.inode(f"{ROOT}/dir2/sub") == sub_inode  # (inodes move with their paths)
        assert await errno_of(c.attrs(f"{ROOT}/dir/x")) == errno.ENOENT
        assert not list(c.fs.cache.state_folder.glob("*.rename"))  # the journal is gone

    run(test, tmp_path)


def test_a_folder_over_the_limit_is_exdev_so_that_mv_copies(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(4):
            c.backend.put(f"dir/{i}", b"1")
        assert await errno_of(c.rename(f"{ROOT}/dir", f"{ROOT}/dir2")) == errno.EXDEV
        assert sorted(c.backend.objects) == [f"dir/{i}" for i in range(4)]

    run(test, tmp_path, "rename_dir_limit=3")


def test_a_folder_renames_onto_an_empty_one_but_not_onto_a_full_one_or_a_file(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for name in ("a/x", "empty/", "full/y", "file"):
            c.backend.put(name, b"1")
        assert await errno_of(c.rename(f"{ROOT}/a", f"{ROOT}/full")) == errno.ENOTEMPTY
        assert await errno_of(c.rename(f"{ROOT}/a", f"{ROOT}/file")) == errno.ENOTDIR
        await c.rename(f"{ROOT}/a", f"{ROOT}/empty")
        assert sorted(c.backend.objects) == ["empty/", "empty/x", "file", "full/y"]

    run(test, tmp_path)


def test_a_failed_copy_undoes_the_folder_rename(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(5):
            c.backend.put(f"dir/{i}", b"1")
        original = c.backend.copy
        calls = 0

        def failing_copy(src: str, dst: str) -> ObjectInfo:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise AccessDenied("injected")
            return original(src, dst)

        c.backend.copy = failing_copy  # type: ignore[method-assign]
        assert await errno_of(c.rename(f"{ROOT}/dir", f"{ROOT}/dir2")) == errno.EACCES
        assert sorted(c.backend.objects) == [f"dir/{i}" for i in range(5)]
        assert not list(c.fs.cache.state_folder.glob("*.rename"))

    run(test, tmp_path)


@pytest.mark.parametrize("phase", ["copy", "delete"])
def test_a_folder_rename_cut_short_is_undone_or_finished_by_the_next_mount(tmp_path: Path, phase: str) -> None:
    async def main() -> None:
        pool = MemoryPool(settings_for(tmp_path / "cache"))
        bucket = pool.bucket()
        names = ["", "x", "sub/y"]
        for name in names:
            bucket.put(f"dir/{name}", name.encode())
        # A crash after copying two of three objects (phase copy), or after copying all and deleting one (delete).
        bucket.copy("dir/", "dir2/")
        bucket.copy("dir/x", "dir2/x")
        async with memory_mount(tmp_path, pool=pool) as c:
            journal = c.fs.cache.begin_rename(f"{bucket.url_prefix}/dir", f"{bucket.url_prefix}/dir2", names)
            if phase == "delete":
                bucket.copy("dir/sub/y", "dir2/sub/y")
                bucket.delete("dir/x")
                c.fs.cache.renamed_all(journal)
            c.fs.writeback._nursery = None  # (the crash)
        async with memory_mount(tmp_path, pool=pool) as c:
            whole = "dir" if phase == "copy" else "dir2"
            assert sorted(bucket.objects) == [f"{whole}/", f"{whole}/sub/y", f"{whole}/x"]
            assert not list(c.fs.cache.state_folder.glob("*.rename"))

    trio.run(main)


def test_rename_exchange_is_not_supported(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("a", b"a")
        c.backend.put("b", b"b")
        assert await errno_of(c.rename(f"{ROOT}/a", f"{ROOT}/b", pyfuse3.RENAME_EXCHANGE)) == errno.ENOTSUP

    run(test, tmp_path)


@pytest.mark.parametrize("where", ["", "s3", f"s3/{HOST}"])
def test_objects_cannot_be_created_above_a_bucket(tmp_path: Path, where: str) -> None:
    async def test(c: Client) -> None:
        name = f"{where}/x.txt".lstrip("/")
        assert await errno_of(c.write(name, b"x")) in (errno.ENOTSUP, errno.EINVAL)
        assert await errno_of(c.mkdir(f"{where}/d".lstrip("/"))) in (errno.ENOTSUP, errno.EINVAL)

    run(test, tmp_path)


@pytest.mark.parametrize("action", ["write", "mkdir", "unlink", "rmdir", "rename"])
def test_a_read_only_mount_refuses_every_change_with_erofs(tmp_path: Path, action: str) -> None:
    async def test(c: Client) -> None:
        c.backend.put("f", b"1")
        c.backend.put("d/", b"")
        attempts = {
            "write": lambda: c.write(f"{ROOT}/new", b"x"), "mkdir": lambda: c.mkdir(f"{ROOT}/nd"),
            "unlink": lambda: c.unlink(f"{ROOT}/f"), "rmdir": lambda: c.rmdir(f"{ROOT}/d"),
            "rename": lambda: c.rename(f"{ROOT}/f", f"{ROOT}/g"),
        }
        assert await errno_of(attempts[action]()) == errno.EROFS
        assert c.backend.data("f") == b"1"

    run(test, tmp_path, "ro")


def test_statfs_reports_the_cache_disk_and_a_name_limit(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        data = await c.ops.statfs(pyfuse3.RequestContext())
        assert data.f_namemax == 255 and data.f_blocks > 0

    run(test, tmp_path)


def test_the_direct_access_level_shows_local_files(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "f.txt").write_bytes(b"on disk")

    async def test(c: Client) -> None:
        path = "file" + str(local)
        assert "f.txt" in await c.listdir(path)
        assert await c.read(f"{path}/f.txt") == b"on disk"
        await c.write(f"{path}/g.txt", b"written in place")
        assert (local / "g.txt").read_bytes() == b"written in place"
        assert c.backend.requests == []

    run(test, tmp_path)


def test_unknown_inodes_are_enoent(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        assert await errno_of(c.ops.getattr(10**9, pyfuse3.RequestContext())) == errno.ENOENT

    run(test, tmp_path)


def test_opendir_of_a_file_is_enotdir(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("f", b"1")
        assert await errno_of(c.ops.opendir(await c.inode(f"{ROOT}/f"), pyfuse3.RequestContext())) == errno.ENOTDIR

    run(test, tmp_path)


def test_xattrs_tell_the_url_etag_and_whether_it_is_cached(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        info = c.backend.put("x.bin", b"12345")
        inode = await c.inode(f"{ROOT}/x.bin")
        ctx = pyfuse3.RequestContext()
        assert await c.ops.getxattr(inode, b"user.clearml.url", ctx) == f"s3://{HOST}/bucket/x.bin".encode()
        assert await c.ops.getxattr(inode, b"user.clearml.etag", ctx) == info.etag.encode()
        assert await c.ops.getxattr(inode, b"user.clearml.cached", ctx) == b"false"
        await c.read(f"{ROOT}/x.bin")
        assert await c.ops.getxattr(inode, b"user.clearml.cached", ctx) == b"true"
        assert await errno_of(c.ops.getxattr(inode, b"user.other", ctx)) == pyfuse3.ENOATTR
        assert sorted(await c.ops.listxattr(inode, ctx)) == sorted(
            [b"user.clearml.url", b"user.clearml.etag", b"user.clearml.cached"])

    run(test, tmp_path)


def test_an_object_changed_on_the_server_is_seen_after_ttl(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("v", b"one")
        assert await c.read(f"{ROOT}/v") == b"one"
        c.backend.put("v", b"two, longer")
        await trio.sleep(0.05)  # the ttl of this mount: attributes older than that are asked for again
        assert await c.read(f"{ROOT}/v") == b"two, longer"

    run(test, tmp_path, "ttl=0.02,list_ttl=0.02")



async def _while_d_is_listed(c: Client, changes: Callable[[], Awaitable[None]]) -> None:
    """Run `changes` while a listing of folder d, taken from the server before them, is still on its way: it is
    delivered (to a lookup under d) only once they are done."""
    taken, answer = threading.Event(), threading.Event()
    list_now = c.backend.list

    def late_list(prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        entries = list(list_now(prefix, delimiter))  # the server's answer as of now...
        if prefix.endswith("d/") and not taken.is_set():
            taken.set()
            answer.wait(10)  # ...delivered after the changes
        return iter(entries)

    c.backend.list = late_list  # type: ignore[method-assign]
    folder = c.fs.ops.ns.table.at(f"{ROOT}/d")
    assert folder is not None
    folder.listed = 0.0  # the next lookup under it lists it again
    async with trio.open_nursery() as nursery:
        nursery.start_soon(errno_of, c.attrs(f"{ROOT}/d/other"))
        await trio.to_thread.run_sync(taken.wait, 10)
        await changes()
        answer.set()


def test_a_listing_sent_before_an_upload_does_not_bring_back_the_old_size(tmp_path: Path) -> None:
    """A listing in flight while a flush uploads answers with the object as it was: the node must keep what
    the upload made, or the kernel is told the old size and an O_APPEND writer writes inside the file."""

    async def test(c: Client) -> None:
        c.backend.put("d/f.bin", b"o" * 30)
        assert await c.listdir(f"{ROOT}/d") == ["f.bin"]
        await _while_d_is_listed(c, lambda: c.write(f"{ROOT}/d/f.bin", b"n" * 100))
        assert (await c.attrs(f"{ROOT}/d/f.bin")).st_size == 100
        fh = await c.open(f"{ROOT}/d/f.bin", os.O_WRONLY | os.O_APPEND)
        await c.ops.write(fh, (await c.attrs(f"{ROOT}/d/f.bin")).st_size, b"+")
        await c.close(fh)
        assert c.backend.data("d/f.bin") == b"n" * 100 + b"+"

    run(test, tmp_path)


def test_a_listing_sent_before_a_create_or_a_delete_shows_the_change(tmp_path: Path) -> None:
    """A listing answered with the folder as it was before a file was uploaded, or deleted, here: the new file
    is there all the same, and the deleted one is not brought back."""

    async def test(c: Client) -> None:
        c.backend.put("d/gone.bin", b"x")
        assert await c.listdir(f"{ROOT}/d") == ["gone.bin"]

        async def create_and_delete() -> None:
            await c.write(f"{ROOT}/d/new.bin", b"n" * 10)
            await c.unlink(f"{ROOT}/d/gone.bin")

        await _while_d_is_listed(c, create_and_delete)
        assert await c.listdir(f"{ROOT}/d") == ["new.bin"]
        assert (await c.attrs(f"{ROOT}/d/new.bin")).st_size == 10
        assert await errno_of(c.attrs(f"{ROOT}/d/gone.bin")) == errno.ENOENT

    run(test, tmp_path)


# -- names and limits ------------------------------------------------------------------------------------------
def test_a_name_over_255_bytes_is_enametoolong(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        long = "n" * 256
        assert await errno_of(c.attrs(f"{ROOT}/{long}")) == errno.ENAMETOOLONG
        assert await errno_of(c.open(f"{ROOT}/{long}", os.O_WRONLY | os.O_CREAT)) == errno.ENAMETOOLONG
        assert await errno_of(c.mkdir(f"{ROOT}/{long}")) == errno.ENAMETOOLONG
        await c.write(f"{ROOT}/short", b"x")
        assert await errno_of(c.rename(f"{ROOT}/short", f"{ROOT}/{long}")) == errno.ENAMETOOLONG
        assert c.backend.data("short") == b"x"

    run(test, tmp_path)


def test_a_key_over_1024_bytes_is_refused_when_created_not_when_uploaded(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        path = ROOT
        for i in range(4):  # 4 folders of 200 bytes: "0...0/1...1/2...2/3...3/" is 804 bytes
            path = f"{path}/{str(i) * 200}"
            await c.mkdir(path)
        assert await errno_of(c.open(f"{path}/{'f' * 221}", os.O_WRONLY | os.O_CREAT)) == errno.ENAMETOOLONG
        assert await errno_of(c.mkdir(f"{path}/{'d' * 220}")) == errno.ENAMETOOLONG  # (its marker ends in /)
        await c.write(f"{path}/{'f' * 220}", b"fits")  # exactly 1,024 bytes
        assert b"fits" in [c.backend.data(k) for k in c.backend.objects]

    run(test, tmp_path)


@pytest.mark.parametrize("call", ["symlink", "mknod", "link"])
def test_links_devices_and_fifos_are_eperm(tmp_path: Path, call: str) -> None:
    async def test(c: Client) -> None:
        await c.write(f"{ROOT}/f", b"x")
        folder, name = await c.inode(ROOT), b"new"
        action = {
            "symlink": lambda: c.ops.symlink(folder, name, b"f", CTX),
            "mknod": lambda: c.ops.mknod(folder, name, 0o10644, 0, CTX),
            "link": lambda: c.ops.link(c_inode, folder, name, CTX),
        }
        c_inode = await c.inode(f"{ROOT}/f")
        assert await errno_of(action[call]()) == errno.EPERM

    run(test, tmp_path)


def test_readdir_gives_dot_and_dotdot_first(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        c.backend.put("d/a", b"x")
        assert await c.readdir(f"{ROOT}/d") == [".", "..", "a"]
        assert (await c.readdir(""))[:2] == [".", ".."]

    run(test, tmp_path)


@pytest.mark.parametrize("name", [".git", ".Trash-0", "autorun.inf~", "x", "-a"])
def test_names_that_cannot_be_buckets_are_enoent_without_asking(tmp_path: Path, name: str) -> None:
    async def test(c: Client) -> None:
        pool = c.fs.backends
        assert isinstance(pool, MemoryPool)
        before = set(pool.buckets)
        assert await errno_of(c.attrs(f"s3/{HOST}/{name}")) == errno.ENOENT
        assert await errno_of(c.attrs(f"azure/{name}")) == errno.ENOENT
        assert set(pool.buckets) == before  # no bucket was asked about

    run(test, tmp_path)
