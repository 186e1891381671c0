"""A cache disk that fills up: a write that does not fit fails and publishes nothing, the old object stays as it
was, no upload is left half-done on the server, and the cache frees itself for what comes next.

Each test puts the cache on a small tmpfs of its own and acts through a real mount of SeaweedFS (S3), Azurite
(Azure) or the GCS emulator; the server is checked through the providers' own SDKs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import servers, stores
from tests.mounting import at, mounted, no_mounts_left  # noqa: F401 - a session fixture, used by being imported
from tests.stores import Store, random_bytes

MIB = 1024 * 1024
DISK = "24m"  # the cache's tmpfs


@dataclass(frozen=True)
class Remote:
    """One server, as the tests see it through its SDK: objects by key, and what an upload left half-done."""

    store: Store
    put: Callable[[str, bytes], None]
    get: Callable[[str], bytes | None]
    leftovers: Callable[[str], list[str]]  # unfinished multipart uploads / uncommitted blocks of a key

    def key(self, url: str) -> str:
        return url[len(self.store.root) + 1 :]


def s3_remote(sw: servers.SeaweedFS) -> Remote:
    client = sw.client()

    def get(key: str) -> bytes | None:
        try:
            return bytes(client.get_object(Bucket=sw.bucket, Key=key)["Body"].read())
        except client.exceptions.NoSuchKey:
            return None

    def leftovers(key: str) -> list[str]:
        uploads = client.list_multipart_uploads(Bucket=sw.bucket, Prefix=key).get("Uploads", [])
        return [u["UploadId"] for u in uploads if u["Key"] == key]

    return Remote(
        stores.seaweed_store(sw), lambda k, d: client.put_object(Bucket=sw.bucket, Key=k, Body=d), get, leftovers
    )


def azure_remote(az: servers.Azurite) -> Remote:
    from azure.core.exceptions import ResourceNotFoundError

    container = az.service_client().get_container_client(az.container)

    def get(key: str) -> bytes | None:
        try:
            return bytes(container.get_blob_client(key).download_blob().readall())
        except ResourceNotFoundError:
            return None

    def leftovers(key: str) -> list[str]:
        try:
            return [b.id for b in container.get_blob_client(key).get_block_list("uncommitted")[1]]
        except ResourceNotFoundError:
            return []

    def put(key: str, data: bytes) -> None:
        container.get_blob_client(key).upload_blob(data, overwrite=True)

    return Remote(stores.azure_store(az), put, get, leftovers)


def gcs_remote(gcs: servers.GCSEmulator) -> Remote:
    bucket = gcs.client().bucket(gcs.bucket)

    def get(key: str) -> bytes | None:
        blob = bucket.get_blob(key)
        return None if blob is None else bytes(blob.download_as_bytes())

    # GCS has no partial objects: an upload that is not finished stores nothing.
    return Remote(
        stores.gcs_store(gcs), lambda k, d: bucket.blob(k).upload_from_string(d), get, lambda key: []
    )


REMOTES: dict[str, Callable[[Any], Remote]] = {
    "seaweedfs": s3_remote, "azurite": azure_remote, "gcs_emulator": gcs_remote,
}


@pytest.fixture(params=list(REMOTES))
def remote(request: pytest.FixtureRequest) -> Remote:
    return REMOTES[request.param](request.getfixturevalue(request.param))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def mount_conf(tmp_path: Path, disk: Path, store: Store) -> Path:
    conf = stores.write_conf(tmp_path / "c.conf", disk / "cache", store)
    conf.chmod(0o600)
    return conf


def write_chunks(path: Path, count: int, seed: int) -> int | None:
    """Write `count` random 4 MiB chunks into `path` (created or truncated); the errno it failed with, if any."""
    try:
        with path.open("wb") as f:
            for i in range(count):
                f.write(random_bytes(4 * MIB, seed + i))
    except OSError as exc:
        return exc.errno
    return None


def digest(data: bytes | None) -> str:
    return "absent" if data is None else hashlib.sha256(data).hexdigest()


def test_an_overwrite_the_cache_disk_cannot_hold_fails_and_leaves_the_old_object(
    remote: Remote, small_disk: Path, tmp_path: Path
) -> None:
    """48 MiB over a 16 MiB object, with a 24 MiB cache disk: the write fails with ENOSPC, the server keeps the
    old object byte for byte, nothing is left half-uploaded, and small objects read fine afterwards."""
    base = remote.store.fresh_prefix()
    url, old = f"{base}/model.bin", random_bytes(16 * MIB, 1)
    remote.put(remote.key(url), old)
    small = {f"{base}/small-{i}.txt": os.urandom(1024) for i in range(5)}
    for small_url, data in small.items():
        remote.put(remote.key(small_url), data)
    with mounted(mount_conf(tmp_path, small_disk, remote.store), tmp_path / "mnt") as mnt:
        assert digest(at(mnt, url).read_bytes()) == digest(old)  # now in the cache, too
        assert write_chunks(at(mnt, url), 12, 100) == errno.ENOSPC
        assert digest(remote.get(remote.key(url))) == digest(old), "a partial write replaced the object"
        assert remote.leftovers(remote.key(url)) == []
        for small_url, data in small.items():
            assert at(mnt, small_url).read_bytes() == data
        assert digest(at(mnt, url).read_bytes()) == digest(old)
    # Unmounting uploads what is dirty: the failed write must not be among it.
    assert digest(remote.get(remote.key(url))) == digest(old)
    assert remote.leftovers(remote.key(url)) == []


def test_a_new_file_the_cache_disk_cannot_hold_fails_and_is_not_created(
    remote: Remote, small_disk: Path, tmp_path: Path
) -> None:
    base = remote.store.fresh_prefix()
    url = f"{base}/too-big.bin"
    remote.put(remote.key(f"{base}/other.txt"), b"x")
    with mounted(mount_conf(tmp_path, small_disk, remote.store), tmp_path / "mnt") as mnt:
        assert write_chunks(at(mnt, url), 8, 200) == errno.ENOSPC
        assert remote.get(remote.key(url)) is None
        assert remote.leftovers(remote.key(url)) == []
        assert not at(mnt, url).exists()
        assert sorted(os.listdir(at(mnt, base))) == ["other.txt"]
        at(mnt, f"{base}/fits.bin").write_bytes(random_bytes(4 * MIB, 3))  # the disk has room again
    assert remote.get(remote.key(url)) is None
    assert digest(remote.get(remote.key(f"{base}/fits.bin"))) == digest(random_bytes(4 * MIB, 3))


def test_objects_larger_than_the_cache_disk_are_read_from_the_server(
    seaweedfs: servers.SeaweedFS, small_disk: Path, tmp_path: Path
) -> None:
    """A 40 MiB object through a 24 MiB cache disk: read whole and right, the rest served without keeping it."""
    remote = s3_remote(seaweedfs)
    url, data = f"{remote.store.fresh_prefix()}/big.bin", random_bytes(40 * MIB, 7)
    remote.put(remote.key(url), data)
    with mounted(mount_conf(tmp_path, small_disk, remote.store), tmp_path / "mnt") as mnt:
        assert digest(at(mnt, url).read_bytes()) == digest(data)
        assert digest(at(mnt, url).read_bytes()) == digest(data)


def test_the_cache_keeps_room_on_its_disk_by_evicting_what_nobody_uses(
    seaweedfs: servers.SeaweedFS, small_disk: Path, tmp_path: Path
) -> None:
    """Five 6 MiB objects read in turn through a 24 MiB cache disk: every read succeeds, and the cache evicts
    the oldest so that its free-space rule (10 % of the disk by default) holds after each."""
    remote = s3_remote(seaweedfs)
    base = remote.store.fresh_prefix()
    objects = {f"{base}/shard-{i}.bin": random_bytes(6 * MIB, 20 + i) for i in range(5)}
    for url, data in objects.items():
        remote.put(remote.key(url), data)
    with mounted(mount_conf(tmp_path, small_disk, remote.store), tmp_path / "mnt") as mnt:
        for url, data in objects.items():
            assert digest(at(mnt, url).read_bytes()) == digest(data)
        st = os.statvfs(small_disk)
        assert st.f_bavail * st.f_frsize >= 0.1 * st.f_blocks * st.f_frsize - 6 * MIB  # one object's slack
        # A write that fits once the unused entries are gone succeeds (ENOSPC is answered by evicting).
        at(mnt, f"{base}/written.bin").write_bytes(random_bytes(12 * MIB, 9))
    assert digest(remote.get(remote.key(f"{base}/written.bin"))) == digest(random_bytes(12 * MIB, 9))
