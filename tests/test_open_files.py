"""Rename and unlink of files still open, through a real mount of SeaweedFS: the patterns of libraries that save
atomically (write x.tmp, rename to x, close) and of tempfile.TemporaryFile (create, unlink, keep using)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests import servers, stores
from tests.mounting import at, daemon_pid, mounted, no_mounts_left, poll  # noqa: F401 - a session fixture
from tests.proxy import Proxy
from tests.stores import conf_for, random_bytes

MIB = 1024 * 1024


def key_of(url: str) -> str:
    return url.split("/", 4)[4]  # s3://HOST/BUCKET/<key>


def server_keys(sw: servers.SeaweedFS, prefix: str) -> list[str]:
    listed = sw.client().list_objects_v2(Bucket=sw.bucket, Prefix=key_of(prefix) + "/")
    names = (o["Key"][len(key_of(prefix)) + 1 :] for o in listed.get("Contents", []))
    return sorted(n for n in names if n)  # (without the folder's own marker)


def unfinished_uploads(sw: servers.SeaweedFS, prefix: str) -> list[Any]:
    return list(sw.client().list_multipart_uploads(Bucket=sw.bucket, Prefix=key_of(prefix)).get("Uploads", []))


@pytest.mark.parametrize("size", [100 * 1024, 40 * MIB])  # the large one is uploading while it is written
def test_a_file_renamed_while_written_is_uploaded_under_its_new_name_only(
    seaweedfs: servers.SeaweedFS, tmp_path: Path, size: int
) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    conf, _ = conf_for(tmp_path, "rename", store)
    first, more = random_bytes(size, 1), random_bytes(MIB, 2)
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        folder.mkdir(parents=True)
        with open(folder / "ckpt.pt.tmp", "wb") as f:
            f.write(first)
            f.flush()
            os.rename(folder / "ckpt.pt.tmp", folder / "ckpt.pt")
            f.write(more)
        assert sorted(os.listdir(folder)) == ["ckpt.pt"]
        assert (folder / "ckpt.pt").read_bytes() == first + more
    assert server_keys(seaweedfs, base) == ["ckpt.pt"]
    body = seaweedfs.client().get_object(Bucket=seaweedfs.bucket, Key=key_of(f"{base}/ckpt.pt"))["Body"].read()
    assert body == first + more
    assert unfinished_uploads(seaweedfs, base) == []


@pytest.mark.parametrize("size", [100 * 1024, 40 * MIB])
def test_a_file_unlinked_while_open_is_used_and_never_uploaded(
    seaweedfs: servers.SeaweedFS, tmp_path: Path, size: int
) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    conf, _ = conf_for(tmp_path, "unlink", store)
    data = random_bytes(size, 3)
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        folder.mkdir(parents=True)
        with tempfile.TemporaryFile(dir=folder) as f:  # created, unlinked at once, then used
            f.write(data)
            f.seek(0)
            assert f.read() == data
            assert os.listdir(folder) == []
    assert server_keys(seaweedfs, base) == []
    assert unfinished_uploads(seaweedfs, base) == []


@pytest.mark.parametrize("size", [100 * 1024, 40 * MIB])  # the large one is uploading while it is written
def test_a_folder_renamed_while_a_file_in_it_is_written_takes_the_file_along(
    seaweedfs: servers.SeaweedFS, tmp_path: Path, size: int
) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    conf, _ = conf_for(tmp_path, "rename-dir", store)
    first, more = random_bytes(size, 4), random_bytes(MIB, 5)
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        (folder / "step-100.tmp").mkdir(parents=True)
        (folder / "step-100.tmp" / "config.json").write_bytes(b"{}")
        with open(folder / "step-100.tmp" / "model.pt", "wb") as f:
            f.write(first)
            f.flush()
            os.rename(folder / "step-100.tmp", folder / "step-100")
            f.write(more)
        assert sorted(os.listdir(folder)) == ["step-100"]
        assert (folder / "step-100" / "model.pt").read_bytes() == first + more
    assert server_keys(seaweedfs, base) == ["step-100/", "step-100/config.json", "step-100/model.pt"]
    body = seaweedfs.client().get_object(Bucket=seaweedfs.bucket, Key=key_of(f"{base}/step-100/model.pt"))
    assert body["Body"].read() == first + more
    assert unfinished_uploads(seaweedfs, base) == []


def test_a_directory_rename_cut_short_by_a_killed_daemon_is_completed_or_undone_by_the_next_mount(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    """The daemon is killed once every copy is sent (the server stalled from then on): the next mount finishes
    the move from its journal if the copies were recorded done, else undoes it; either way every object is under
    one name, and only one."""
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    base = store.fresh_prefix()
    prefix = key_of(base)
    client = seaweedfs.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/old/{i:03d}", Body=b"x"),
                      range(300)))
    conf, _ = conf_for(tmp_path, "crash", store)
    mountpoint = tmp_path / "mnt"
    with mounted(conf, mountpoint, check_unmount=False) as mnt:
        root = at(mnt, base)
        assert len(os.listdir(root / "old")) == 300
        mover = subprocess.Popen(["mv", str(root / "old"), str(root / "new")], stderr=subprocess.DEVNULL)
        # Every copy sent: stall the server, so the deletions that follow hang, and kill the daemon there.
        assert poll(lambda: seaweedfs_proxy.count("PUT") >= 300, 60, 0.005), "the copies never all went out"
        seaweedfs_proxy.stall()
        pid = daemon_pid(mountpoint)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        mover.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)
    seaweedfs_proxy.reset()  # (resumes the stalled requests: they are reset, not forwarded)
    keys = [k["Key"] for k in client.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=prefix + "/").get("Contents", [])]
    assert len([k for k in keys if "/new/" in k]) == 300, "the copies did not all land before the kill"
    with mounted(conf, tmp_path / "mnt2") as mnt:  # completes or undoes the rename from its journal as it starts
        root = at(mnt, base)
        names = os.listdir(root)
        assert names in (["new"], ["old"]), names
        assert len(os.listdir(root / names[0])) == 300
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=seaweedfs.bucket, Prefix=prefix + "/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert len(keys) == 300 and all(k.startswith(f"{prefix}/{names[0]}/") for k in keys), keys[:5]


def test_thousands_of_open_files_under_a_soft_limit_of_1024_all_open(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    """A daemon started with the common soft limit raises it to its hard one; and the handles of one file share
    its pin, so an open file costs the daemon one descriptor, not two."""
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    conf, _ = conf_for(tmp_path, "many", store)
    client, key = seaweedfs.client(), key_of(base)
    for i in range(300):
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{key}/f{i:03d}", Body=b"%d" % i)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # inherited by the daemon
    try:
        with mounted(conf, tmp_path / "mnt") as mounted_at:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 8192), hard))  # the caller's own opens
            folder = at(mounted_at, base)
            pid = daemon_pid(tmp_path / "mnt")
            assert pid is not None
            before = len(os.listdir(f"/proc/{pid}/fd"))
            files = [open(folder / f"f{i % 300:03d}", "rb") for i in range(1500)]  # noqa: SIM115
            try:
                assert [f.read() for f in files[:300]] == [b"%d" % i for i in range(300)]
                held = len(os.listdir(f"/proc/{pid}/fd")) - before
                # one each, one pin per object, and a few the daemon opened meanwhile (connections, logs)
                assert held <= 1500 + 300 + 50, f"{held} descriptors for 1,500 open files of 300 objects"
            finally:
                for f in files:
                    f.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
