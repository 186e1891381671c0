"""`--log-level debug` tells what happened: one line per remote request (method, URL without query string,
range, status, bytes, time) and one per FUSE operation (its arguments, outcome and time), on every provider."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clearmlfs.urls import url_to_mount_path
from tests import stores
from tests.mounting import mounted, no_mounts_left  # noqa: F401 - a session fixture, used by being imported

STORES = {
    "seaweedfs": stores.seaweed_store, "azurite": stores.azure_store, "gcs_emulator": stores.gcs_store,
}
REQUEST = re.compile(r"clearmlfs\.requests: (GET|PUT|HEAD|POST|[A-Z][A-Za-z]+) (\S+)( \[[^]]*\])? -> (\d{3}), "
                     r"(\d+|\?) bytes, [\d.]+ ms")
OPERATION = re.compile(r"clearmlfs\.fs\.operations: (\w+)\((.*)\) -> (ok|E[A-Z]+), [\d.]+ ms")


@pytest.mark.parametrize("server", list(STORES))
def test_debug_log_has_a_line_per_request_and_per_operation(
    server: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = STORES[server](request.getfixturevalue(server))
    conf = stores.write_conf(tmp_path / "c.conf", tmp_path / "cache", store)
    conf.chmod(0o600)
    url = f"{store.fresh_prefix()}/hello.txt"
    with mounted(conf, tmp_path / "mnt", log_level="debug") as mnt:
        path = mnt / url_to_mount_path(url)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"hello, log")
        assert (mnt / url_to_mount_path(store.root) / "missing.txt").exists() is False
    log = (tmp_path / "mnt.mount.log").read_text()
    requests = [m for m in REQUEST.finditer(log)]
    assert requests, f"no request lines in the debug log:\n{log[-3000:]}"
    folder = url.split("/")[-2]  # in the object URLs, or (GCS uploads name the object in their body) the listings
    assert any(m.group(4).startswith("2") and folder in m.group(2) for m in requests)
    secret = re.compile(r"(?i)(sig|signature|credential|token|key)=(?!…)")
    assert not any(secret.search(m.group(2)) for m in requests), "a signature or token reached the log"
    operations = {(m.group(1), m.group(3)) for m in OPERATION.finditer(log)}
    assert {("create", "ok"), ("write", "ok"), ("flush", "ok"), ("lookup", "ENOENT")} <= operations, operations
    assert "hello, log" not in log  # data written is counted, never shown
