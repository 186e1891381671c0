"""Servers over https whose certificate the system does not trust (a self-signed MinIO, say): the `verify`
setting of an S3 credentials entry is honoured as the SDK honours it, and a refused certificate is said at once,
with the setting that would trust it, instead of being retried as a network failure.

(The ClearML fileserver's `api.verify_certificate`: tests/test_fileserver.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearmlfs import StorageManager
from clearmlfs.errors import ConfigError
from tests import servers, stores
from tests.sdk_differential import both, call
from tests.stores import Store, random_bytes


@pytest.fixture()
def moto_tls(tmp_path: Path) -> Iterator[tuple[servers.MotoS3, Path]]:
    """moto's S3 over https with a self-signed certificate: (the server, its certificate)."""
    running = servers.start_moto(tmp_path / "moto", tls=tmp_path / "tls")
    try:
        yield running.info, tmp_path / "tls" / "cert.pem"
    finally:
        running.stop()
        StorageManager.configure(settings=None)


def _conf(path: Path, moto: servers.MotoS3, **verify: object) -> Path:
    entry = {"host": moto.host, "key": moto.key, "secret": moto.secret, "secure": True, "multipart": True, **verify}
    store = Store("moto-tls", f"s3://{moto.host}/{moto.bucket}", {"aws": {"s3": {"credentials": [entry]}}})
    return stores.write_conf(path, path.parent / f"{path.stem}-cache", store)


def test_a_self_signed_s3_server_is_refused_clearly_and_trusted_with_verify(
    moto_tls: tuple[servers.MotoS3, Path], tmp_path: Path
) -> None:
    moto, cert = moto_tls
    src = tmp_path / "model.bin"
    src.write_bytes(random_bytes(300_000, seed=9))
    url = f"s3://{moto.host}/{moto.bucket}/tls/model.bin"

    StorageManager.configure(_conf(tmp_path / "strict.conf", moto))
    started = time.monotonic()
    with pytest.raises(ConfigError, match="certificate") as raised:
        StorageManager.upload_file(str(src), url)
    assert "verify" in str(raised.value) and moto.secret not in str(raised.value)
    assert time.monotonic() - started < 20, "a refused certificate was retried as if the network had failed"

    for name, verify in (("bundle", str(cert)), ("unchecked", False)):
        conf = _conf(tmp_path / f"{name}.conf", moto, verify=verify)
        target = f"{url}.{name}"
        sdk, ours = both(conf, call("upload_file", str(src), target), call("get_file_size_bytes", target))
        assert ours == sdk, name
        assert ours[1].value == src.stat().st_size, name
