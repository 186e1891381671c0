"""Names and their limits through a real mount of SeaweedFS: too long a name or key, links and special files,
"." and "..", and the names tools probe for among buckets."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import servers, stores
from tests.mounting import at, mounted, no_mounts_left  # noqa: F401 - a session fixture, used by being imported
from tests.stores import conf_for


@pytest.fixture
def mount(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> tuple[Path, Path, str, servers.SeaweedFS]:
    store = stores.seaweed_store(seaweedfs)
    conf, _ = conf_for(tmp_path, "names", store)
    return conf, tmp_path, store.fresh_prefix(), seaweedfs


def errno_of(path: Path, action: str) -> int | None:
    try:
        if action == "create":
            path.write_bytes(b"x")
        elif action == "mkdir":
            path.mkdir()
        elif action == "stat":
            path.stat()
        elif action == "symlink":
            path.symlink_to("elsewhere")
        elif action == "mkfifo":
            os.mkfifo(path)
    except OSError as exc:
        return exc.errno
    return None


def server_keys(sw: servers.SeaweedFS, prefix: str) -> list[str]:
    listed = sw.client().list_objects_v2(Bucket=sw.bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_a_300_byte_name_and_a_1100_byte_key_are_enametoolong(mount: tuple[Path, Path, str, Any]) -> None:
    conf, tmp_path, base, sw = mount
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        folder.mkdir(parents=True)
        for action in ("create", "mkdir", "stat"):
            assert errno_of(folder / ("n" * 300), action) == errno.ENAMETOOLONG, action
        deep = folder
        for i in range(4):
            deep = deep / (str(i) * 250)
            deep.mkdir()
        # the key is already over 1,000 bytes: a 100-byte name makes it about 1,100
        assert errno_of(deep / ("f" * 100), "create") == errno.ENAMETOOLONG
        (deep / "ok").write_bytes(b"fits")  # (a key just under the limit is fine)
        assert (deep / "ok").read_bytes() == b"fits"
    key_prefix = base.split("/", 4)[4] + "/"  # s3://HOST/BUCKET/<prefix>
    keys = server_keys(sw, key_prefix)
    assert not any(k.endswith("f" * 100) or "n" * 300 in k for k in keys), keys
    assert any(k.endswith("/ok") for k in keys)


def test_links_fifos_are_eperm_and_readdir_has_dots(mount: tuple[Path, Path, str, Any]) -> None:
    conf, tmp_path, base, _ = mount
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(b"x")
        assert errno_of(folder / "link", "symlink") == errno.EPERM
        assert errno_of(folder / "fifo", "mkfifo") == errno.EPERM
        try:
            os.link(folder / "f", folder / "hard")
        except OSError as exc:
            assert exc.errno == errno.EPERM
        else:
            raise AssertionError("a hard link was made")
        listed = subprocess.run(["ls", "-a", str(folder)], capture_output=True, text=True, check=True)
        assert listed.stdout.split() == [".", "..", "f"]


def test_names_that_cannot_be_buckets_answer_enoent_quietly(
    mount: tuple[Path, Path, str, Any], seaweedfs: servers.SeaweedFS
) -> None:
    conf, tmp_path, _, _ = mount
    with mounted(conf, tmp_path / "mnt") as mnt:
        for name in (".git", ".Trash-0", "HEAD~"):
            assert errno_of(mnt / "s3" / seaweedfs.host / name, "stat") == errno.ENOENT
        log = (tmp_path / "mnt.mount.log").read_text()
    assert "WARNING" not in log, log
