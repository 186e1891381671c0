"""Revalidation that scales: a folder read through is revalidated by listing it, not file by file, and what the
kernel forgets of a folder's listing is kept (compactly) for the next walk."""

from __future__ import annotations

from pathlib import Path

import pyfuse3
import pytest
import trio

from clearmlfs.fs import namespace
from tests.fast.harness import ROOT, Client, run
from tests.fast.test_memory import forget_everything

TTL = 0.2  # this mount's ttl: attributes older than that are asked for again on open


async def read_all(c: Client, folder: str, names: list[str]) -> list[bytes]:
    return [await c.read(f"{ROOT}/{folder}/{name}") for name in names]


async def past_ttl(c: Client) -> None:
    """Let every file's attributes expire, and every revalidating listing with them."""
    await trio.sleep(TTL * 1.5)


def per_file_requests(c: Client, folder: str) -> int:
    return sum(1 for r in c.backend.requests if r.split(" ", 1)[0] in ("GET", "HEAD") and f" {folder}/" in r)


def test_files_of_a_folder_read_through_again_are_revalidated_by_one_listing(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        names = [f"{i:03d}.bin" for i in range(200)]
        for name in names:
            c.backend.put(f"epoch/{name}", name.encode())
        await c.listdir(f"{ROOT}/epoch")
        assert await read_all(c, "epoch", names) == [n.encode() for n in names]
        await past_ttl(c)
        c.backend.requests.clear()
        started = trio.current_time()
        assert await read_all(c, "epoch", names[::-1]) == [n.encode() for n in names[::-1]]
        assert per_file_requests(c, "epoch") <= namespace.LIST_WORTH + 1  # until the rate shows
        # one listing, then one each half ttl while the folder is read (in the background, before it expires)
        assert 1 <= c.backend.count("LIST") <= 2 + (trio.current_time() - started) / (TTL / 2)

    run(test, tmp_path, f"ttl={TTL},list_ttl=10", "readahead_files=0,cache_files=10000")


def test_files_read_for_the_first_time_are_not_revalidated_by_listing(tmp_path: Path) -> None:
    """A first epoch: each open's own GET answers for the file, so listing the folder would only cost."""
    async def test(c: Client) -> None:
        names = [f"{i:03d}.bin" for i in range(200)]
        for name in names:
            c.backend.put(f"cold/{name}", name.encode())
        await c.listdir(f"{ROOT}/cold")
        await past_ttl(c)
        c.backend.requests.clear()
        assert await read_all(c, "cold", names[::-1]) == [n.encode() for n in names[::-1]]
        assert c.backend.count("LIST") == 0
        assert per_file_requests(c, "cold") <= 2 * len(names)  # (the stored time's HEAD at lookup, the GET)

    run(test, tmp_path, f"ttl={TTL},list_ttl=10", "readahead_files=0,cache_files=10000")


def test_a_first_epoch_with_a_few_files_cached_already_lists_nothing(tmp_path: Path) -> None:
    """The few files of a first epoch that are cached already (read before, fetched ahead) are asked about one by
    one: the opens of files never read answer for themselves, and do not make a big folder worth listing."""
    async def test(c: Client) -> None:
        names = [f"{i:03d}.bin" for i in range(200)]
        for name in names:
            c.backend.put(f"cold/{name}", name.encode())
        await c.listdir(f"{ROOT}/cold")
        cached = names[::40]
        assert await read_all(c, "cold", cached) == [n.encode() for n in cached]
        await past_ttl(c)
        c.backend.requests.clear()
        assert await read_all(c, "cold", names[::-1]) == [n.encode() for n in names[::-1]]
        assert c.backend.count("LIST") == 0
        assert c.backend.count("GET") <= len(names)  # (no file fetched twice)

    run(test, tmp_path, f"ttl={TTL},list_ttl=10", "readahead_files=0,cache_files=10000")


def test_a_change_made_elsewhere_is_seen_on_open_after_ttl_when_revalidated_by_listing(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        names = [f"{i:03d}" for i in range(100)]
        for name in names:
            c.backend.put(f"e/{name}", b"old")
        await c.listdir(f"{ROOT}/e")
        await read_all(c, "e", names)  # the folder is being read through: revalidated by listing
        await past_ttl(c)
        await read_all(c, "e", names[:50])
        c.backend.put("e/070", b"new, longer")
        await past_ttl(c)
        c.backend.requests.clear()
        assert await c.read(f"{ROOT}/e/070") == b"new, longer"
        assert await read_all(c, "e", names[71:]) == [b"old"] * 29

    run(test, tmp_path, f"ttl={TTL},list_ttl=10", "readahead_files=0,cache_files=10000")


def test_one_file_of_a_big_folder_is_revalidated_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of many pages is not listed again for the few of its files opened."""
    monkeypatch.setattr(namespace, "LIST_PAGE", 10)  # 300 objects: 30 pages

    async def test(c: Client) -> None:
        for i in range(300):
            c.backend.put(f"big/{i:03d}", b"b")
        await c.listdir(f"{ROOT}/big")
        for i in range(20):
            await c.read(f"{ROOT}/big/{i:03d}")
        await past_ttl(c)
        c.backend.requests.clear()
        for i in range(20):
            assert await c.read(f"{ROOT}/big/{i:03d}") == b"b"
        assert c.backend.count("LIST") == 0
        assert per_file_requests(c, "big") == 20

    run(test, tmp_path, f"ttl={TTL},list_ttl=10", "readahead_files=0,cache_files=10000")


def test_a_walk_after_the_kernel_forgot_a_folder_is_answered_without_listing_again(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for folder in ("a", "b"):
            for i in range(100):
                c.backend.put(f"walk/{folder}/{i:03d}", b"w")
        await c.listdir(f"{ROOT}/walk")
        baseline = len(c.fs.ops.ns.table)
        first = {f: await c.listdir(f"{ROOT}/walk/{f}") for f in ("a", "b")}
        inodes = {f: await c.inode(f"{ROOT}/walk/a/{f}") for f in ("005", "099")}
        await forget_everything(c)
        assert len(c.fs.ops.ns.table) == baseline  # the nodes are gone; their folders' listings keep them
        c.backend.requests.clear()
        assert {f: await c.listdir(f"{ROOT}/walk/{f}") for f in ("a", "b")} == first
        assert {f: await c.inode(f"{ROOT}/walk/a/{f}") for f in ("005", "099")} == inodes  # (`ls -i` stays)
        assert c.backend.requests == []
        assert await c.read(f"{ROOT}/walk/b/042") == b"w"

    run(test, tmp_path, "ttl=60,list_ttl=60,server_times")


def test_a_forgotten_listing_is_let_go_once_too_old_to_answer(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(50):
            c.backend.put(f"old/{i:02d}", b"o")
        await c.listdir(f"{ROOT}/old")
        await trio.sleep(0.3)  # past list_ttl
        await forget_everything(c)
        folder = c.fs.ops.ns.table.at(f"{ROOT}/old")
        assert folder is not None and folder.children is None and folder.gone is None
        assert c.fs.ops.ns.table._kept == 0
        c.backend.requests.clear()
        assert len(await c.listdir(f"{ROOT}/old")) == 50
        assert c.backend.requests.count("LIST old/") == 1

    run(test, tmp_path, "ttl=0.1,list_ttl=0.2,server_times")


def test_files_deleted_elsewhere_leave_a_kept_listing_when_it_is_listed_again(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(20):
            c.backend.put(f"k/{i:02d}", b"k")
        await c.listdir(f"{ROOT}/k")
        await forget_everything(c)
        for i in range(10):
            c.backend.delete(f"k/{i:02d}")
        await trio.sleep(0.3)  # past list_ttl: listed again
        assert sorted(await c.listdir(f"{ROOT}/k")) == [f"{i:02d}" for i in range(10, 20)]
        assert c.fs.ops.ns.table._kept == 0

    run(test, tmp_path, "ttl=0.1,list_ttl=0.2,server_times")


def test_a_snapshot_read_after_its_forgotten_files_were_let_go_gives_them_their_paths(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(5):
            c.backend.put(f"s/{i}", b"s")
        c.backend.put("t/x", b"t")
        fh = await c.opendir(f"{ROOT}/s")
        for i in range(5):
            await c.attrs(f"{ROOT}/s/{i}")
        await forget_everything(c)  # kept by the listing of s
        await trio.sleep(0.3)  # past list_ttl
        await c.attrs(f"{ROOT}/t/x")
        await forget_everything(c)  # ... and let go of, now that the listing is too old to answer
        replied = []
        original = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = lambda token, name, attrs, next_id: replied.append(name) or True
        try:
            await c.ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        finally:
            pyfuse3.readdir_reply = original
            await c.ops.releasedir(fh)
        assert sorted(replied)[2:] == [str(i).encode() for i in range(5)]
        for i in range(5):
            node = c.fs.ops.ns.table.at(f"{ROOT}/s/{i}")
            assert node is not None and node.url.endswith(f"/s/{i}")
        assert c.fs.ops.ns.table.at("0") is None

    run(test, tmp_path, "ttl=0.1,list_ttl=0.2,server_times")


def test_files_forgotten_while_their_stored_times_are_asked_for_stay_whole(tmp_path: Path) -> None:
    """The HEADs that `opendir` starts for the stored times of a folder's files answer after the kernel forgot
    the files: they are kept, and the mount goes on."""

    async def test(c: Client) -> None:
        for i in range(20):
            c.backend.put(f"h/{i:02d}", b"h")
        ns = c.fs.ops.ns
        await ns.listdir(ns.table[await c.inode(f"{ROOT}/h")])  # (listed, no HEAD asked yet)
        c.backend.hold()
        fh = await c.opendir(f"{ROOT}/h")
        await c.ops.releasedir(fh)
        await trio.sleep(0.05)  # (the HEADs are on their way, held)
        for i in range(20):  # the kernel held them (readdirplus), then dropped them
            node = c.fs.ops.ns.table.at(f"{ROOT}/h/{i:02d}")
            assert node is not None
            node.lookups += 1
        await forget_everything(c)
        c.backend.release()
        await trio.sleep(0.05)
        assert sorted(await c.listdir(f"{ROOT}/h")) == [f"{i:02d}" for i in range(20)]
        assert await c.read(f"{ROOT}/h/07") == b"h"

    run(test, tmp_path, "ttl=60,list_ttl=60")


def test_files_kept_by_a_listing_move_with_their_folder(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(5):
            c.backend.put(f"d/sub/{i}", f"{i}".encode())
        await c.listdir(f"{ROOT}/d/sub")
        await forget_everything(c)
        await c.rename(f"{ROOT}/d", f"{ROOT}/e")
        assert sorted(await c.listdir(f"{ROOT}/e/sub")) == [str(i) for i in range(5)]
        assert await c.read(f"{ROOT}/e/sub/3") == b"3"
        node = c.fs.ops.ns.table.at(f"{ROOT}/e/sub/4")
        assert node is not None and node.url.endswith("/e/sub/4")
        assert c.fs.ops.ns.table.at(f"{ROOT}/d/sub/4") is None

    run(test, tmp_path, "ttl=60,list_ttl=60,server_times")
