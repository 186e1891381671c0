"""Azure and GCS backends against local servers (Azurite, gcp-storage-emulator).

Scratch: each server is started on a free port for the module and polled until it answers.
Skipped when a server binary is missing (AZURITE_BLOB / GCS_EMULATOR point at them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from clearmlfs.backends.base import Backend, ObjectInfo, Prefix
from clearmlfs.config import AzureContainer, GCSBucket
from clearmlfs.errors import AccessDenied, NotFound

AZURITE = os.environ.get("AZURITE_BLOB", "/tmp/azurite/node_modules/.bin/azurite-blob")
GCS_EMULATOR = os.environ.get("GCS_EMULATOR", "/tmp/scratch/bin/gcp-storage-emulator")
AZ_ACCOUNT = "devstoreaccount1"
# Azurite's published development key, not a secret.
AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
PAGE = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"server for {url} did not answer within {timeout}s")


def _serve(cmd: list[str], url: str) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_up(url, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def azure_cfg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureContainer]:
    if not shutil.which(AZURITE):
        pytest.skip("Azurite not installed")
    port = _free_port()
    data = tmp_path_factory.mktemp("azurite")
    cmd = [AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data)]
    cmd += ["--skipApiVersionCheck", "--loose", "--disableTelemetry"]
    endpoint = f"http://127.0.0.1:{port}/{AZ_ACCOUNT}"
    for _ in _serve(cmd, endpoint):
        yield AzureContainer(AZ_ACCOUNT, AZ_KEY, endpoint=endpoint)


@pytest.fixture(scope="module")
def gcs_host(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[str]:
    if not shutil.which(GCS_EMULATOR):
        pytest.skip("gcp-storage-emulator not installed")
    port = _free_port()
    host = f"http://127.0.0.1:{port}"
    cmd = [GCS_EMULATOR, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"]
    for _ in _serve(cmd, f"{host}/storage/v1/b"):
        monkeypatch_module.setenv("STORAGE_EMULATOR_HOST", host)
        yield host


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _azure(cfg: AzureContainer, **kw: int) -> Backend:
    from azure.storage.blob import BlobServiceClient

    from clearmlfs.backends.azure import AzureBackend

    name = f"c{uuid.uuid4().hex[:12]}"
    BlobServiceClient(
        cfg.account_url, credential={"account_name": AZ_ACCOUNT, "account_key": AZ_KEY}
    ).create_container(name)
    return AzureBackend(cfg, name, **kw)


def _gcs(**kw: int) -> Backend:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from clearmlfs.backends.gcs import GCSBackend

    name = f"b{uuid.uuid4().hex[:12]}"
    storage.Client(project="clearmlfs", credentials=AnonymousCredentials()).create_bucket(name)
    return GCSBackend(GCSBucket(), name, **kw)


@pytest.fixture(params=["azure", "gcs"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "azure":
        b = _azure(request.getfixturevalue("azure_cfg"), page_size=PAGE)
    else:
        request.getfixturevalue("gcs_host")
        b = _gcs(page_size=PAGE)
    yield b
    b.close()


def _put(backend: Backend, tmp_path: Path, key: str, data: bytes) -> ObjectInfo:
    src = tmp_path / f"src-{uuid.uuid4().hex}"
    src.write_bytes(data)
    return backend.upload(src, key)


@pytest.mark.parametrize("size", [1024, 40 * 1024 * 1024])
def test_uploaded_file_downloads_byte_identical(backend: Backend, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    up = _put(backend, tmp_path, "dir/blob.bin", data)
    dest = tmp_path / "out.bin"
    down = backend.download("dir/blob.bin", dest)
    assert dest.read_bytes() == data
    assert up.size == down.size == size
    assert up.etag == down.etag == backend.stat("dir/blob.bin").etag


def test_download_truncates_an_existing_destination(backend: Backend, tmp_path: Path) -> None:
    _put(backend, tmp_path, "k", b"short")
    dest = tmp_path / "out"
    dest.write_bytes(b"x" * 1000)
    backend.download("k", dest)
    assert dest.read_bytes() == b"short"


def test_read_returns_requested_ranges(backend: Backend, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    _put(backend, tmp_path, "r", data)
    assert backend.read("r") == data
    assert backend.read("r", 0, 10) == data[:10]
    assert backend.read("r", 5000, 100) == data[5000:5100]
    assert backend.read("r", len(data) - 7) == data[-7:]
    assert backend.read("r", len(data) - 7, 100) == data[-7:]
    assert backend.read("r", len(data)) == b""
    assert backend.read("r", len(data) + 100, 10) == b""
    assert backend.read("r", 3, 0) == b""


def test_reading_an_empty_object_returns_nothing(backend: Backend, tmp_path: Path) -> None:
    _put(backend, tmp_path, "empty", b"")
    assert backend.stat("empty").size == 0
    assert backend.read("empty") == b""
    assert backend.read("empty", 10) == b""


def test_delimited_listing_shows_objects_and_prefixes(backend: Backend, tmp_path: Path) -> None:
    for key in ("a/1", "a/2", "a/b/3", "c"):
        _put(backend, tmp_path, key, key.encode())
    entries = list(backend.list("a/"))
    assert sorted(e.key for e in entries if isinstance(e, ObjectInfo)) == ["a/1", "a/2"]
    assert [e for e in entries if isinstance(e, Prefix)] == [Prefix("a/b/")]
    top = list(backend.list(""))
    assert {e.key for e in top} == {"a/", "c"}
    assert sorted(e.key for e in backend.list("", None)) == ["a/1", "a/2", "a/b/3", "c"]


def test_listing_paginates_through_1100_objects(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "tiny"
    src.write_bytes(b"x")
    keys = [f"p/obj{i:04d}" for i in range(100)] + [f"p/sub/x{i:04d}" for i in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: backend.upload(src, k), keys))
    assert sorted(e.key for e in backend.list("p/", None)) == keys
    shallow = list(backend.list("p/"))
    assert [e for e in shallow if isinstance(e, Prefix)] == [Prefix("p/sub/")]
    assert len(shallow) == 101
    assert len(list(backend.list("p/sub/"))) == 1000


def test_stat_of_missing_key_is_not_found_naming_the_url(backend: Backend) -> None:
    with pytest.raises(NotFound, match=f"{backend.url_prefix}/no/such/key"):
        backend.stat("no/such/key")
    with pytest.raises(NotFound):
        backend.read("no/such/key")
    with pytest.raises(NotFound):
        backend.download("no/such/key", Path(os.devnull))


def test_deleted_object_is_gone_and_deleting_again_is_fine(backend: Backend, tmp_path: Path) -> None:
    _put(backend, tmp_path, "gone", b"bye")
    backend.delete("gone")
    with pytest.raises(NotFound):
        backend.stat("gone")
    backend.delete("gone")


def test_copy_creates_an_identical_object(backend: Backend, tmp_path: Path) -> None:
    _put(backend, tmp_path, "orig", b"payload")
    info = backend.copy("orig", "dup/copy")
    assert info.key == "dup/copy" and info.size == 7
    assert backend.read("dup/copy") == b"payload"
    with pytest.raises(NotFound):
        backend.copy("missing", "x")


def test_overwriting_changes_the_etag(backend: Backend, tmp_path: Path) -> None:
    first = _put(backend, tmp_path, "v", b"one")
    second = _put(backend, tmp_path, "v", b"two!")
    assert first.etag != second.etag
    assert backend.stat("v") == second


def test_wrong_azure_account_key_is_access_denied_without_leaking_it(azure_cfg: AzureContainer) -> None:
    from clearmlfs.backends.azure import AzureBackend

    good = _azure(azure_cfg)
    bad_key = "AAAA" + AZ_KEY[4:]
    bad_cfg = AzureContainer(AZ_ACCOUNT, bad_key, endpoint=azure_cfg.account_url)
    bad = AzureBackend(bad_cfg, good.url_prefix.rsplit("/", 1)[1])
    with pytest.raises(AccessDenied) as info:
        bad.stat("anything")
    assert good.url_prefix in str(info.value)
    assert bad_key not in str(info.value) and AZ_KEY not in str(info.value)
    with pytest.raises(AccessDenied):
        list(bad.list(""))


def test_azure_connection_string_is_accepted(azure_cfg: AzureContainer, tmp_path: Path) -> None:
    from clearmlfs.backends.azure import AzureBackend

    plain = _azure(azure_cfg)
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};"
        f"BlobEndpoint={azure_cfg.account_url};"
    )
    via_conn = AzureBackend(
        AzureContainer(AZ_ACCOUNT, connection_string=conn), plain.url_prefix.rsplit("/", 1)[1]
    )
    _put(plain, tmp_path, "k", b"v")
    assert via_conn.read("k") == b"v"
    assert (
        via_conn.url_prefix
        == plain.url_prefix
        == f"azure://{AZ_ACCOUNT}.blob.core.windows.net/" + (plain.url_prefix.rsplit("/", 1)[1])
    )
