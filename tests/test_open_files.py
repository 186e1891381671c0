"""Rename and unlink of files still open, through a real mount of SeaweedFS: the patterns of libraries that save
atomically (write x.tmp, rename to x, close) and of tempfile.TemporaryFile (create, unlink, keep using)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests import servers, stores
from tests.mounting import at, mounted, no_mounts_left  # noqa: F401 - a session fixture, used by being imported
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
