"""Kernel passthrough through a real mount: a cached file is read by the kernel itself, not by the daemon.
Write-only opens, the other I/O mode the mount picks per open, are at the end.

Whether the daemon read a file's bytes is told by its /proc/<pid>/io: passthrough reads are the reader's.
The kernel allows one I/O mode per open inode (fs/fuse/iomode.c); a wrong answer would fail an open with
EIO, so the mixes of opens are tried here too.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from clearmlfs.errors import ConfigError
from clearmlfs.fs.passthrough import (
    DROP_MARGIN,
    DROP_STEP,
    DropBehind,
    capabilities,
    kernel_supports,
    parallel_lookups_supported,
    pyfuse3_supports,
    readdir_cache_supported,
    write_views_supported,
)
from clearmlfs.mount import parse_options
from clearmlfs.urls import url_to_mount_path
from tests import servers, stores
from tests.mounting import daemon_pid, digest, mounted, no_mounts_left, resident_bytes  # noqa: F401 - session fixture, used by being imported

MIB = 1024 * 1024
SIZE = 8 * MIB  # above small_file_size's 4 MiB: streamed in by the daemon on the first open


def passthrough_available() -> bool:
    """What this installation can do: a pyfuse3 that passes backing files on (the patched build; the stock one
    from the registry cannot), and a kernel that takes them. Where either is missing, the tests check that the
    mount works without it."""
    return pyfuse3_supports() and kernel_supports()


class Mount(NamedTuple):
    root: Path
    bucket: Path  # the bucket's folder in it
    pid: int  # the daemon's


@pytest.fixture()
def mount(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """mount(options) → a new mount."""
    store = stores.seaweed_store(seaweedfs)
    conf = stores.write_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)
    with contextlib.ExitStack() as stack:

        def mount(options: str = "ttl=30,list_ttl=30") -> Mount:
            mnt = stack.enter_context(mounted(conf, tmp_path / "mnt", extra_args=["-o", options]))
            pid = daemon_pid(tmp_path / "mnt")
            assert pid is not None
            return Mount(mnt, mnt / url_to_mount_path(store.root), pid)

        yield mount


@pytest.fixture()
def put(seaweedfs: servers.SeaweedFS):
    client = seaweedfs.client()

    def put(key: str, data: bytes) -> None:
        client.put_object(Bucket=seaweedfs.bucket, Key=key, Body=data)

    return put


def new_key(put, data: bytes) -> str:
    key = f"passthrough-{uuid.uuid4().hex[:8]}/model.bin"
    put(key, data)
    return key


def daemon_read(pid: int) -> int:
    """Bytes the daemon has read with read(2)-like calls so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def drop_page_caches() -> None:
    """Empty the kernel's clean page cache: a later read must be served by someone, not by cached pages."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def settle() -> None:
    """Let the daemon see the RELEASE of files just closed: the kernel sends it after close(2) returns."""
    time.sleep(0.3)


def read_through(path: Path, pid: int) -> tuple[bytes, int]:
    """(content, bytes the daemon read meanwhile)."""
    before = daemon_read(pid)
    data = path.read_bytes()
    return data, daemon_read(pid) - before


# -- the setup gives the mount what passthrough needs -------------------------------------------------
def test_the_capabilities_reported_are_those_of_the_installed_pyfuse3_and_kernel() -> None:
    """`clearmlfs config` tells what this installation can do: the patched pyfuse3 (scripts/setup.sh builds it,
    or installs the stock one with a warning when it cannot) and the kernel decide, and the tests below expect
    exactly that."""
    said = capabilities()
    assert ("kernel passthrough on" in said) == passthrough_available(), said
    assert ("write views on" in said) == write_views_supported(), said
    assert ("parallel lookups on" in said) == parallel_lookups_supported(), said
    assert ("listings cached by the kernel on" in said) == readdir_cache_supported(), said


# -- reads ----------------------------------------------------------------------------------------------
def test_a_cached_file_is_read_by_the_kernel_not_by_the_daemon(mount, put, tmp_path) -> None:
    folder, pid = mount()[1:]
    said = "kernel passthrough on" if passthrough_available() else "kernel passthrough off"
    assert said in (tmp_path / "mnt.mount.log").read_text()  # what the mount found, at once
    data = os.urandom(SIZE)
    path = folder / new_key(put, data)
    first, _ = read_through(path, pid)
    assert digest(first) == digest(data)
    drop_page_caches()  # neither the FUSE page cache nor the cache file's pages hold it now
    again, daemon_bytes = read_through(path, pid)
    assert digest(again) == digest(data)
    if passthrough_available():
        assert daemon_bytes < MIB, f"the daemon read {daemon_bytes} bytes of a cached file"
    else:  # an older kernel: the mount works as before, through the daemon
        assert daemon_bytes >= SIZE


def test_with_passthrough_off_the_daemon_serves_every_read(mount, put) -> None:
    folder, pid = mount("ttl=30,list_ttl=30,passthrough=off")[1:]
    data = os.urandom(SIZE)
    path = folder / new_key(put, data)
    assert digest(read_through(path, pid)[0]) == digest(data)
    drop_page_caches()
    again, daemon_bytes = read_through(path, pid)
    assert digest(again) == digest(data)
    assert daemon_bytes >= SIZE


def test_a_cached_file_maps_and_reads_in_pieces(mount, put) -> None:
    folder = mount().bucket
    data = os.urandom(SIZE)
    path = folder / new_key(put, data)
    assert digest(path.read_bytes()) == digest(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        assert digest(view[SIZE - 4096:]) == digest(data[SIZE - 4096:])
        assert digest(view[:]) == digest(data)
        f.seek(3 * MIB + 17)
        assert digest(f.read(MIB)) == digest(data[3 * MIB + 17:4 * MIB + 17])


# -- mixes of opens of one file -------------------------------------------------------------------------
def test_an_open_made_while_a_streaming_one_is_open_is_served_too(mount, put) -> None:
    folder = mount().bucket
    data = os.urandom(SIZE)
    path = folder / new_key(put, data)
    with open(path, "rb") as streaming:  # not cached yet: the daemon streams it in (the kernel's cached mode)
        assert digest(streaming.read(MIB)) == digest(data[:MIB])
        assert digest(streaming.read()) == digest(data[MIB:])  # complete now
        with open(path, "rb") as second:  # complete, but must join the cached mode: no EIO
            assert digest(second.read()) == digest(data)
    with open(path, "rb") as third, open(path, "rb") as fourth:  # passthrough, sharing one backing file
        assert digest(third.read()) == digest(data)
        assert digest(fourth.read()) == digest(data)


def test_a_writer_waits_for_passthrough_readers_to_close(mount, put) -> None:
    folder = mount().bucket
    data = os.urandom(SIZE)
    path = folder / new_key(put, data)
    assert digest(path.read_bytes()) == digest(data)  # cached
    settle()  # or the next open joins the cached mode of the one just closed
    reader = open(path, "rb")  # noqa: SIM115 - held open across the writer's attempt
    try:
        assert digest(reader.read(MIB)) == digest(data[:MIB])
        if passthrough_available():
            for mode in ("r+b", "ab"):  # a write-only open too, though it would bypass the page cache
                with pytest.raises(OSError) as refused:
                    open(path, mode)  # noqa: SIM115
                assert refused.value.errno == errno.ETXTBSY
        assert digest(reader.read()) == digest(data[MIB:])  # the refused writer changed nothing
    finally:
        reader.close()
    with open(path, "r+b") as writer:  # the reader is gone
        writer.write(b"new head")
    settle()
    assert digest(path.read_bytes()) == digest(b"new head" + data[8:])


def test_an_open_while_the_object_changed_reads_the_version_already_open(mount, put) -> None:
    folder = mount("ttl=0.2,list_ttl=0.2").bucket
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    key = new_key(put, old)
    path = folder / key
    assert digest(path.read_bytes()) == digest(old)
    settle()
    with open(path, "rb") as held:
        put(key, new)
        time.sleep(0.5)  # past the ttl: the next open sees the new version on the server
        with open(path, "rb") as during:  # no EIO; the kernel allows one backing file while `held` is open
            content = during.read()
        assert digest(content) == digest(old if passthrough_available() else new)
        if passthrough_available():
            assert digest(held.read()) == digest(old)
        else:  # in the kernel's cached mode the opens of one inode share its page cache, which `during` filled
            assert digest(held.read()) in (digest(old), digest(new))
    settle()
    assert digest(path.read_bytes()) == digest(new)  # once the old version is closed


def test_a_direct_access_file_is_read_and_written_by_the_kernel_while_readers_have_it_open(mount, tmp_path) -> None:
    root, _, pid = mount()
    local = tmp_path / "local" / "data.bin"
    local.parent.mkdir()
    data = os.urandom(SIZE)
    local.write_bytes(data)
    through = root / url_to_mount_path(f"file://{local}")
    drop_page_caches()
    with open(through, "rb") as reader:
        before = daemon_read(pid)
        assert digest(reader.read()) == digest(data)
        with open(through, "ab") as writer:  # no ETXTBSY: its writes belong in the local file
            writer.write(b"appended")
        if passthrough_available():
            assert daemon_read(pid) - before < MIB
            assert reader.read() == b"appended"  # the kernel reads the file itself, at its current size
    assert local.read_bytes()[-8:] == b"appended"


def test_the_mount_option_is_on_or_off() -> None:
    assert parse_options([]).passthrough is True
    assert parse_options(["ro,passthrough=off"]).passthrough is False
    assert parse_options(["passthrough=on"]).passthrough is True
    with pytest.raises(ConfigError, match="passthrough=maybe"):
        parse_options(["passthrough=maybe"])


# -- write-only opens: writes go straight to the daemon, not through the kernel's page cache ------------
def test_a_write_only_open_bypasses_the_page_cache_and_readers_see_its_writes(mount, put) -> None:
    folder = mount("ttl=30,list_ttl=30,passthrough=off").bucket  # readers in the kernel's cached mode
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    path = folder / new_key(put, old)
    with open(path, "rb") as reader:
        assert digest(reader.read()) == digest(old)
        assert resident_bytes(reader.fileno(), SIZE) == SIZE
        with open(path, "r+b") as writer:  # may be read back: writes through the page cache, as before
            writer.write(new[:MIB])
        assert resident_bytes(reader.fileno(), SIZE) == SIZE
        with open(path, "wb") as writer:
            writer.write(new)
            # Only the 8 MiB it wrote, straight to the daemon; the kernel dropped the pages they replaced.
            assert resident_bytes(reader.fileno(), SIZE) == 0
        reader.seek(0)
        assert digest(reader.read()) == digest(new)
    settle()
    assert digest(path.read_bytes()) == digest(new)


def test_a_reader_opened_beside_a_write_only_open_reads_through_the_daemon(mount, put) -> None:
    _, folder, pid = mount()  # passthrough on: the reader must not be handed the file being written
    data = os.urandom(SIZE)
    path = folder / new_key(put, os.urandom(SIZE))
    with open(path, "wb") as writer:
        writer.write(data[:MIB])
        writer.flush()
        # No EIO: cached mode beside the writer's direct I/O, its reads served by the daemon.
        content, daemon_bytes = read_through(path, pid)
        assert digest(content) == digest(data[:MIB])
        assert daemon_bytes >= MIB
        writer.write(data[MIB:])
    settle()
    assert digest(path.read_bytes()) == digest(data)


# -- dropping the FUSE pages a sequential cached-mode read leaves behind ---------------------------------
def test_drop_behind_follows_a_sequential_run_at_a_distance() -> None:
    behind, size = DropBehind(), 1 << 40
    spans = []
    for offset in range(0, DROP_MARGIN + 3 * DROP_STEP, MIB):
        behind.advance(offset, MIB, size)
        span = behind.due()
        if span is not None:
            spans.append(span)
            behind.dropped = sum(span)
    assert spans == [(0, DROP_STEP), (DROP_STEP, DROP_STEP), (2 * DROP_STEP, DROP_STEP)]


def test_drop_behind_starts_over_after_a_jump_and_drops_all_but_the_tail_at_the_end() -> None:
    behind, size = DropBehind(), 10 * DROP_MARGIN
    behind.advance(0, MIB, size)
    behind.advance(5 * DROP_MARGIN, MIB, size)  # a jump: nothing before it is dropped
    assert behind.due() is None
    behind.advance(size - MIB, MIB, size)  # another jump, to the last bytes
    assert behind.due() is None
    behind = DropBehind()
    for offset in range(0, 3 * MIB, MIB):
        behind.advance(offset, MIB, 3 * MIB)
    assert behind.due() == (0, 2 * MIB)  # the whole run but its last request
    behind, size = DropBehind(), 10 * DROP_MARGIN
    behind.advance(size - MIB, MIB, size)  # the last bytes first (a zip's directory), then back to the start:
    behind.advance(0, MIB, size)  # a new run, and nothing ahead of it is dropped
    assert behind.due() is None
