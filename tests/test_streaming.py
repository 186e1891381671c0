"""Streaming reads through a real mount: what the server is asked for, counted by a proxy in front of it."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clearmlfs.urls import url_to_mount_path
from tests import servers, stores
from tests.mounting import daemon_pid, digest, mounted, no_mounts_left  # noqa: F401 - session fixture, used by being imported
from tests.proxy import Proxy

MIB, GIB = 1024 * 1024, 1024 * 1024 * 1024


@pytest.fixture(scope="module")
def big_object(seaweedfs: servers.SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A 1 GiB object in SeaweedFS (key, local copy)."""
    local = tmp_path_factory.mktemp("big") / "big.bin"
    rng = np.random.default_rng(1)
    with open(local, "wb") as f:
        for _ in range(GIB // (64 * MIB)):
            f.write(rng.bytes(64 * MIB))
    key = "streaming/big.bin"
    seaweedfs.client().upload_file(str(local), seaweedfs.bucket, key)
    yield key, local
    local.unlink()


@pytest.fixture()
def proxied_mount(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> Iterator[tuple[Proxy, Path]]:
    with Proxy(upstream=seaweedfs.endpoint) as proxy:
        store = stores.seaweed_store(seaweedfs, host=proxy.host)
        conf = stores.write_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)
        with mounted(conf, tmp_path / "mnt") as mnt:
            yield proxy, mnt / url_to_mount_path(store.root)


def test_reading_the_tail_of_a_huge_object_fetches_only_a_small_part(big_object, proxied_mount) -> None:
    key, local = big_object
    proxy, bucket = proxied_mount
    with open(local, "rb") as f:
        f.seek(-1024, os.SEEK_END)
        expected = f.read()
    proxy.reset()
    with open(bucket / key, "rb") as f:
        f.seek(-1024, os.SEEK_END)
        assert f.read() == expected
        sent = proxy.bytes_sent(path_contains=key)
    assert sent < 32 * MIB, f"{sent / MIB:.1f} MiB fetched to read 1 KiB at the end of a 1 GiB object"


def test_random_reads_of_a_huge_object_fetch_about_what_they_read(big_object, proxied_mount) -> None:
    key, local = big_object
    proxy, bucket = proxied_mount
    rng = np.random.default_rng(2)
    offsets = [int(o) // 4096 * 4096 for o in rng.integers(1, GIB - 64 * 1024, 300)]
    proxy.reset()
    with open(local, "rb") as expected, open(bucket / key, "rb") as f:
        for offset in offsets:
            expected.seek(offset)
            assert os.pread(f.fileno(), 64 * 1024, offset) == expected.read(64 * 1024)
    read = len(offsets) * 64 * 1024
    sent = proxy.bytes_sent(path_contains=key)
    assert sent <= 2 * read + 8 * MIB, f"{sent / MIB:.1f} MiB fetched for {read / MIB:.1f} MiB of random reads"
    proxy.reset()
    with open(local, "rb") as expected, open(bucket / key, "rb") as f:  # kept: read again from the cache file
        for offset in offsets[:50]:
            expected.seek(offset)
            assert os.pread(f.fileno(), 64 * 1024, offset) == expected.read(64 * 1024)
    assert proxy.bytes_sent(path_contains=key) == 0


def test_first_bytes_are_readable_before_the_object_is_down(big_object, proxied_mount) -> None:
    key, local = big_object
    proxy, bucket = proxied_mount
    proxy.reset()
    with open(bucket / key, "rb") as f:
        head = f.read(MIB)
        sent = proxy.bytes_sent(path_contains=key)
    with open(local, "rb") as f:
        assert head == f.read(MIB)
    assert sent < GIB // 4, f"{sent / MIB:.0f} MiB fetched before the first MiB was returned"


def test_concurrent_readers_share_one_download_and_the_result_is_cached(big_object, proxied_mount) -> None:
    key, local = big_object
    proxy, bucket = proxied_mount
    expected = digest(local.read_bytes())
    proxy.reset()
    results: list[str] = []

    def read_all() -> None:
        hasher = hashlib.sha256()
        with open(bucket / key, "rb") as f:
            while chunk := f.read(4 * MIB):
                hasher.update(chunk)
        results.append(hasher.hexdigest())

    readers = [threading.Thread(target=read_all) for _ in range(8)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert results == [expected] * 8
    sent = proxy.bytes_sent(path_contains=key)
    assert sent <= 1.05 * GIB, f"8 readers caused {sent / GIB:.2f} GiB of downloads"
    proxy.reset()
    with open(bucket / key, "rb") as f:  # complete in the cache now: served without a download
        assert digest(f.read()) == expected
    assert proxy.bytes_sent(path_contains=key) == 0


def _file_backed_resident(pid: int) -> int:
    """The bytes of mapped files resident in `pid`'s memory (RssFile): a mapping of a cache file counts there."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssFile in /proc/{pid}/status")


def test_streaming_a_huge_object_does_not_keep_its_pages_in_the_daemon(big_object, proxied_mount, tmp_path) -> None:
    # Replies are sent from a mapping of the cache file while it streams in: only the pages of the reply in
    # hand may stay mapped, or the daemon's resident memory would grow to the object's size.
    key, local = big_object
    _, bucket = proxied_mount
    pid = daemon_pid(tmp_path / "mnt")
    assert pid is not None
    before, peak = _file_backed_resident(pid), 0
    hasher = hashlib.sha256()
    with open(bucket / key, "rb") as f:
        while chunk := f.read(16 * MIB):
            hasher.update(chunk)
            peak = max(peak, _file_backed_resident(pid))
    assert hasher.hexdigest() == digest(local.read_bytes())
    assert peak - before < 64 * MIB, f"the daemon held {(peak - before) / MIB:.0f} MiB of mapped files while streaming"
