"""Stored times and modes through real mounts: what utimens, chmod and uploads store in object metadata, read
back by a new mount on an empty cache (SeaweedFS, Azurite, the GCS emulator), the keys peers write, and
`rsync -a` run twice."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests import servers, stores
from tests.mounting import at, mounted, no_mounts_left  # noqa: F401 - a session fixture, used by being imported
from tests.stores import conf_for
from tests.test_mount import Target, make_target

OLD = 1_600_000_000_123_456_789  # nanoseconds: what cp -p and rsync -a set
MIB = 1024 * 1024


@pytest.mark.parametrize("provider", ["seaweedfs", "azurite", "gcs"])
def test_times_and_modes_are_read_back_by_a_new_mount_on_an_empty_cache(
    provider: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target: Target = make_target(provider, request)
    base = target.store.fresh_prefix()
    conf, _ = conf_for(tmp_path, "first", target.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        folder.mkdir(parents=True)
        (folder / "set").write_bytes(b"a" * 1000)
        os.utime(folder / "set", ns=(OLD, OLD))  # a clean object: stored by the server, nothing re-sent
        (folder / "set").chmod(0o600)
        with open(folder / "open", "wb") as f:  # while written: stored with the content
            f.write(b"b" * (2 * MIB))
            os.utime(f.fileno(), ns=(OLD + 1, OLD + 1))
            os.fchmod(f.fileno(), 0o640)
        (folder / "plain").write_bytes(b"c")
        before = {name: (folder / name).stat() for name in ("set", "open", "plain")}
    assert (before["set"].st_mtime_ns, stat.S_IMODE(before["set"].st_mode)) == (OLD, 0o600)
    assert (before["open"].st_mtime_ns, stat.S_IMODE(before["open"].st_mode)) == (OLD + 1, 0o640)
    assert target.read(f"{base}/set") == b"a" * 1000

    conf, _ = conf_for(tmp_path, "second", target.store)  # its own, empty, cache
    with mounted(conf, tmp_path / "mnt2") as mnt:
        folder = at(mnt, base)
        listed = {entry.name: entry.stat() for entry in os.scandir(folder)}  # as `ls -l` sees them
        for name, st in before.items():
            again = (folder / name).stat()
            assert (again.st_mtime_ns, again.st_mode) == (st.st_mtime_ns, st.st_mode), name
            assert (listed[name].st_mtime_ns, listed[name].st_mode) == (st.st_mtime_ns, st.st_mode), name


def test_metadata_keys_are_those_peers_read_and_theirs_are_read(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    prefix = base.split("/", 4)[4]  # s3://HOST/BUCKET/<prefix>
    client = seaweedfs.client()
    client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/rclone", Body=b"r",
                      Metadata={"mtime": "1500000000.25"})
    client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/s3fs", Body=b"s",
                      Metadata={"mtime": "1500000001", "mode": str(stat.S_IFREG | 0o755)})
    client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/none", Body=b"n")
    conf, cache = conf_for(tmp_path, "peers", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        assert (folder / "rclone").stat().st_mtime_ns == 1_500_000_000_250_000_000
        s3fs = (folder / "s3fs").stat()
        assert (s3fs.st_mtime_ns, stat.S_IMODE(s3fs.st_mode)) == (1_500_000_001 * 10**9, 0o755)
        last_modified = client.head_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/none")["LastModified"]
        assert (folder / "none").stat().st_mtime == last_modified.timestamp()  # no metadata: the server's time
        os.utime(folder / "none", ns=(OLD, OLD))
        assert not list(cache.rglob("none"))  # stored on the server: nothing was downloaded
    head = client.head_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/none")
    assert head["Metadata"]["mtime"] == "1600000000.123456789"
    assert client.get_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/none")["Body"].read() == b"n"


def test_gcsfuse_times_are_read_on_gcs(gcs_emulator: servers.GCSEmulator, tmp_path: Path) -> None:
    store = stores.gcs_store(gcs_emulator)
    base = store.fresh_prefix()
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob(base.split("/", 3)[3] + "/g")
    blob.metadata = {"gcsfuse_mtime": "2020-01-02T03:04:05.123456789Z"}
    blob.upload_from_string(b"g")
    conf, _ = conf_for(tmp_path, "gcsfuse", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        assert (at(mnt, base) / "g").stat().st_mtime_ns == 1_577_934_245_123_456_789


def _rsync(src: Path, dst: Path) -> int:
    """`rsync -a` of `src` into `dst`: how many files it transferred."""
    out = subprocess.run(["rsync", "-a", "--stats", f"{src}/", f"{dst}/"], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    found = re.search(r"Number of regular files transferred: ([\d,]+)", out)
    assert found, out
    return int(found[1].replace(",", ""))


def test_rsync_a_twice_transfers_nothing_the_second_time(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for index, (name, size, mode) in enumerate([("a.bin", 1000, 0o644), ("b.pt", 3 * MIB, 0o600),
                                                ("sub/c.txt", 10, 0o755), ("empty", 0, 0o644)]):
        (src / name).write_bytes(os.urandom(size))
        (src / name).chmod(mode)
        os.utime(src / name, ns=(OLD + index, OLD + index))
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    conf, _ = conf_for(tmp_path, "first", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        at(mnt, base).mkdir(parents=True)
        assert _rsync(src, at(mnt, base)) == 4
    conf, _ = conf_for(tmp_path, "second", store)  # a new mount, on an empty cache
    with mounted(conf, tmp_path / "mnt2") as mnt:
        assert _rsync(src, at(mnt, base)) == 0
        for name in ("a.bin", "b.pt", "sub/c.txt", "empty"):
            assert (at(mnt, base) / name).read_bytes() == (src / name).read_bytes()
