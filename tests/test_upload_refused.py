"""An upload the server refuses for good, through a real mount of SeaweedFS behind the fault proxy: the file is
kept, not retried for ever, reported by `clearmlfs status` and `clearmlfs umount`, and uploaded once told to."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

from tests import servers, stores
from tests.mounting import at, clearmlfs, mounted, no_mounts_left  # noqa: F401 - a session fixture
from tests.proxy import Proxy
from tests.stores import conf_for


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(clearmlfs(*args), capture_output=True, text=True, timeout=120)


def test_a_refused_upload_is_kept_reported_and_retried_when_told(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    base = store.fresh_prefix()
    url = f"{base}/refused.bin"
    conf, _ = conf_for(tmp_path, "refused", store)
    mountpoint = tmp_path / "mnt"
    with mounted(conf, mountpoint, check_unmount=False) as mnt:
        at(mnt, base).mkdir(parents=True)
        f = open(at(mnt, url), "wb")  # noqa: SIM115 - the close is what is tested
        f.write(b"keep me")
        f.flush()
        seaweedfs_proxy.fail_next(1, 403)  # the upload at close: access denied
        try:
            f.close()
        except OSError as exc:
            assert exc.errno == errno.EIO
        else:
            raise AssertionError("close() succeeded though the upload was refused")
        puts = seaweedfs_proxy.count("PUT")
        assert at(mnt, url).read_bytes() == b"keep me"  # the mount still serves what was written
        status = run("status", "--config", conf)
        assert status.returncode == 0 and "failed" in status.stdout and url in status.stdout, status.stdout
        assert "access denied" in status.stdout
        umount = run("umount", mountpoint)
        assert umount.returncode == 1, umount
        assert url in umount.stderr and "could not be uploaded" in umount.stderr
    assert seaweedfs_proxy.count("PUT") == puts  # not retried: not at unmount, not by the loop
    assert seaweedfs.client().list_objects_v2(Bucket=seaweedfs.bucket, Prefix=url.split("/", 4)[4]).get(
        "KeyCount", 0) == 0

    assert run("cache", "retry", url, "--config", conf).returncode == 0
    with mounted(conf, mountpoint):  # the next mount's retry loop uploads it at once
        pass
    body = seaweedfs.client().get_object(Bucket=seaweedfs.bucket, Key=url.split("/", 4)[4])["Body"].read()
    assert body == b"keep me"
    assert "every file is uploaded" in run("status", "--config", conf).stdout
