"""Memory follows the kernel: what it forgets leaves the inode table, and per-URL locks last only while used."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fast.harness import ROOT, Client, run


async def forget_everything(c: Client) -> None:
    """FORGET every reference the kernel holds, as it does when its caches are dropped."""
    table = c.fs.ops.ns.table
    held = [(inode, node.lookups) for inode, node in list(table._nodes.items()) if node.lookups > 0 and inode != 1]
    await c.ops.forget(held)


def test_files_the_kernel_forgot_leave_the_table_and_are_found_again(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(200):
            c.backend.put(f"walk/{i:03d}", b"x")
        await c.attrs(f"{ROOT}/walk")
        baseline = len(c.fs.ops.ns.table)
        for i in range(200):
            await c.attrs(f"{ROOT}/walk/{i:03d}")
        assert len(c.fs.ops.ns.table) >= baseline + 200
        await forget_everything(c)
        assert len(c.fs.ops.ns.table) == baseline  # the folders stay; their files are gone
        assert (await c.attrs(f"{ROOT}/walk/150")).st_size == 1  # listed again, found again
        assert await c.read(f"{ROOT}/walk/007") == b"x"

    run(test, tmp_path)


def test_a_file_not_uploaded_yet_stays_when_the_kernel_forgets_it(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        fh = await c.open(f"{ROOT}/dirty", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        await c.ops.write(fh, 0, b"local only")
        await c.ops.release(fh)  # (no flush: the upload has not happened)
        inode = await c.inode(f"{ROOT}/dirty")
        await forget_everything(c)
        assert c.fs.ops.ns.table.get(inode) is not None

    run(test, tmp_path)


def test_a_listing_read_after_its_files_were_forgotten_gives_the_kernel_live_inodes(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        for i in range(5):
            c.backend.put(f"d/{i}", b"y")
        fh = await c.opendir(f"{ROOT}/d")
        for i in range(5):
            await c.attrs(f"{ROOT}/d/{i}")
        await forget_everything(c)
        names = await c.listdir(f"{ROOT}/d")
        await c.ops.releasedir(fh)
        assert sorted(names) == [str(i) for i in range(5)]
        for i in range(5):
            assert await c.read(f"{ROOT}/d/{i}") == b"y"

    run(test, tmp_path)


def test_no_entry_outlives_its_use(tmp_path: Path) -> None:
    """Entries of objects read and written are gone once closed, but for the few small files fetched ahead of
    a reader and not opened yet, and the reader's walk through their folder (both bounded)."""

    async def test(c: Client) -> None:
        for i in range(50):
            c.backend.put(f"l/{i}", b"z" * 10)
        for i in range(50):
            await c.read(f"{ROOT}/l/{i}")  # in numeric order: read-ahead goes by name, and some are never opened
        for i in range(20):
            await c.write(f"{ROOT}/l/w{i}", b"w")
        entries = list(c.fs.writeback.entries)
        assert [e.url for e in entries if e.ready is None and e.walk is None] == []
        assert len(entries) <= 4 * c.fs.small.settings.readahead + 1  # (+ the folder's walk)
        for e in entries:
            e.ready, e.walk = None, None
            c.fs.writeback.entries.release(e)
        assert len(c.fs.writeback.entries) == 0

    run(test, tmp_path)
