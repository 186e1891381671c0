"""A file's mtime and mode kept in object metadata by the Azure and GCS backends, the content type and the SDK's hash
they store and read as the ClearML SDK does, against the real emulators."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from clearmlfs.backends import Attrs, Backend, BackendPool, ObjectInfo, Prefix
from clearmlfs.backends import gcs as gcs_backend
from clearmlfs.config import load_settings
from clearmlfs.errors import NotFound
from clearmlfs.urls import parse_url
from tests import servers, stores
from tests.stores import Store

MIB = 1024 * 1024
ATTRS = Attrs(mtime_ns=1_700_000_000_123_456_789, mode=0o100644)
LATER = Attrs(mtime_ns=1_800_000_000_000_000_001, mode=0o100600)


class Provider:
    """A backend for a fresh folder of one emulator's bucket, and the SDK's own view of its objects."""

    def __init__(self, store: Store, server: Any, tmp_path: Path) -> None:
        conf = stores.write_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)
        url = parse_url(store.fresh_prefix())
        self.backend: Backend = BackendPool(load_settings(conf)).get(url)
        self.prefix = url.key
        self.server = server

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def put_raw(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        """Store an object as another tool would, with metadata of its own."""
        if isinstance(self.server, servers.Azurite):
            container = self.server.service_client().get_container_client(self.server.container)
            container.upload_blob(key, data, metadata=metadata, overwrite=True)
        else:
            blob = self.server.client().bucket(self.server.bucket).blob(key)
            blob.metadata = metadata
            blob.upload_from_string(data)

    def raw_content_type(self, key: str) -> str:
        if isinstance(self.server, servers.Azurite):
            container = self.server.service_client().get_container_client(self.server.container)
            return str(container.get_blob_client(key).get_blob_properties().content_settings.content_type)
        return str(self.server.client().bucket(self.server.bucket).get_blob(key).content_type)

    def raw_metadata(self, key: str) -> dict[str, str]:
        if isinstance(self.server, servers.Azurite):
            container = self.server.service_client().get_container_client(self.server.container)
            return dict(container.get_blob_client(key).get_blob_properties().metadata)
        return dict(self.server.client().bucket(self.server.bucket).get_blob(key).metadata or {})


@pytest.fixture(params=["azurite", "gcs"])
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Provider:
    if request.param == "azurite":
        server = request.getfixturevalue("azurite")
        return Provider(stores.azure_store(server), server, tmp_path)
    server = request.getfixturevalue("gcs_emulator")
    return Provider(stores.gcs_store(server), server, tmp_path)


def _file(path: Path, size: int) -> Path:
    path.write_bytes(stores.random_bytes(size, seed=size))
    return path


def _listed(backend: Backend, prefix: str, delimiter: str | None) -> dict[str, ObjectInfo]:
    return {e.key: e for e in backend.list(prefix, delimiter) if not isinstance(e, Prefix)}


class _Chunks:
    """A reader that cannot seek, as a file being written is."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(size)


# 10 MiB: over the Azure single-put size (blocks) and the GCS chunk size (a resumable upload).
@pytest.mark.parametrize("size", [1024, 10 * MIB], ids=["1KiB", "10MiB"])
def test_uploaded_attrs_show_in_stat_and_listings(provider: Provider, tmp_path: Path, size: int) -> None:
    backend, key = provider.backend, provider.key("dir/model.bin")
    info = backend.upload(_file(tmp_path / "src", size), key, attrs=ATTRS)
    assert info.attrs == ATTRS and info.attrs_known
    assert backend.stat(key).attrs == ATTRS
    assert _listed(backend, provider.prefix + "/dir/", "/")[key].attrs == ATTRS
    assert _listed(backend, provider.prefix + "/", None)[key].attrs == ATTRS
    assert backend.download(key, tmp_path / "back").attrs == ATTRS


def test_upload_without_attrs_stores_none(provider: Provider, tmp_path: Path) -> None:
    backend, key = provider.backend, provider.key("plain.bin")
    backend.upload(_file(tmp_path / "src", 1024), key, attrs=ATTRS)
    assert backend.upload(_file(tmp_path / "src", 1024), key).attrs == Attrs()
    assert backend.stat(key).attrs == Attrs()


def test_streamed_upload_stores_attrs(azurite: servers.Azurite, tmp_path: Path) -> None:
    provider = Provider(stores.azure_store(azurite), azurite, tmp_path)  # (GCS uploads files whole, never streams)
    backend, key = provider.backend, provider.key("streamed.bin")
    assert backend.stream_threshold is not None
    data = stores.random_bytes(backend.stream_threshold + MIB, seed=7)
    info = backend.upload_stream(_Chunks(data), key, attrs=ATTRS)
    assert info.attrs == ATTRS
    assert backend.stat(key).attrs == ATTRS
    assert backend.read(key) == data


def test_uploads_get_the_content_type_the_sdk_gives_them(provider: Provider, tmp_path: Path) -> None:
    """Guessed from the object's name, as the SDK's Azure uploads (`ContentSettings(get_file_mimetype(name))`,
    binary/octet-stream when the name tells nothing; the SDK cannot reach Azurite) and S3 uploads do. (The SDK's
    GCS uploads guess from the local file's name: tests/test_differential.py.)"""
    backend = provider.backend
    unknown = "binary/octet-stream" if isinstance(provider.server, servers.Azurite) else "application/octet-stream"
    src = _file(tmp_path / "src", 1024)
    expected = {"dir/table.json": "application/json", "notes.txt": "text/plain", "model.unknown-suffix": unknown,
                "archive.tar.gz": "application/x-tar"}
    for name in expected:
        backend.upload(src, provider.key(name), attrs=ATTRS)
    assert {name: provider.raw_content_type(provider.key(name)) for name in expected} == expected
    backend.set_attrs(provider.key("notes.txt"), LATER)
    assert provider.raw_content_type(provider.key("notes.txt")) == "text/plain"


def test_streamed_upload_gets_the_content_type(azurite: servers.Azurite, tmp_path: Path) -> None:
    provider = Provider(stores.azure_store(azurite), azurite, tmp_path)
    backend, key = provider.backend, provider.key("streamed.csv")
    assert backend.stream_threshold is not None
    backend.upload_stream(_Chunks(stores.random_bytes(backend.stream_threshold + MIB, seed=8)), key, attrs=ATTRS)
    assert provider.raw_content_type(key) == "text/csv"


def test_the_sdks_sha256_metadata_shows_in_stat_and_listings(provider: Provider) -> None:
    backend, key = provider.backend, provider.key("hashed.bin")
    provider.put_raw(key, b"hashed", {"sha256": "ab" * 32})
    provider.put_raw(provider.key("plain.bin"), b"plain", {})
    assert backend.stat(key).sha256 == "ab" * 32 and backend.stat(provider.key("plain.bin")).sha256 is None
    listed = _listed(backend, provider.prefix + "/", None)
    assert listed[key].sha256 == "ab" * 32 and listed[provider.key("plain.bin")].sha256 is None


def test_set_attrs_keeps_content_and_other_metadata(provider: Provider) -> None:
    backend, key = provider.backend, provider.key("theirs.bin")
    provider.put_raw(key, b"their content", {"owner": "someone", "mtime": "1500000000.5"})
    before = backend.stat(key)
    assert before.attrs == Attrs(mtime_ns=1_500_000_000_500_000_000)
    info = backend.set_attrs(key, LATER)
    assert info.attrs == LATER and info.size == before.size
    assert backend.stat(key).attrs == LATER
    assert backend.read(key) == b"their content"
    meta = provider.raw_metadata(key)
    assert meta["owner"] == "someone" and meta["mtime"] == "1800000000.000000001" and meta["mode"] == "33152"


def test_set_attrs_with_mtime_only_keeps_stored_mode(provider: Provider, tmp_path: Path) -> None:
    backend, key = provider.backend, provider.key("touched.bin")
    backend.upload(_file(tmp_path / "src", 10), key, attrs=ATTRS)
    info = backend.set_attrs(key, Attrs(mtime_ns=LATER.mtime_ns))
    assert info.attrs == Attrs(LATER.mtime_ns, ATTRS.mode) == backend.stat(key).attrs


def test_set_attrs_on_azure_replaces_a_key_differing_in_case(azurite: servers.Azurite, tmp_path: Path) -> None:
    provider = Provider(stores.azure_store(azurite), azurite, tmp_path)
    backend, key = provider.backend, provider.key("cased.bin")
    provider.put_raw(key, b"x", {"MTime": "1500000000"})
    assert backend.set_attrs(key, LATER).attrs == LATER
    assert backend.stat(key).attrs == LATER
    assert {k.lower(): v for k, v in provider.raw_metadata(key).items()}["mtime"] == "1800000000.000000001"


def test_copy_keeps_attrs(provider: Provider, tmp_path: Path) -> None:
    backend, key = provider.backend, provider.key("orig.bin")
    backend.upload(_file(tmp_path / "src", 2048), key, attrs=ATTRS)
    copied = backend.copy(key, provider.key("copy.bin"))
    assert copied.attrs == ATTRS
    assert backend.stat(provider.key("copy.bin")).attrs == ATTRS


def test_set_attrs_on_a_missing_object_is_not_found(provider: Provider) -> None:
    with pytest.raises(NotFound):
        provider.backend.set_attrs(provider.key("absent.bin"), ATTRS)


def test_gcs_parallel_upload_sends_attrs(
    gcs_emulator: servers.GCSEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files from PARALLEL_THRESHOLD go through the XML multipart upload, whose initiate carries the metadata
    as x-goog-meta- headers; the emulator refuses that upload (501), and the backend falls back."""
    sent: list[dict[str, str]] = []
    real = gcs_backend.transfer_manager.XMLMPUContainer

    def recording(*args: Any, **kwargs: Any) -> Any:
        sent.append(dict(kwargs.get("headers") or {}))
        return real(*args, **kwargs)

    monkeypatch.setattr(gcs_backend.transfer_manager, "XMLMPUContainer", recording)
    provider = Provider(stores.gcs_store(gcs_emulator), gcs_emulator, tmp_path)
    backend, key = provider.backend, provider.key("big.bin")
    info = backend.upload(_file(tmp_path / "src", gcs_backend.PARALLEL_THRESHOLD), key, attrs=ATTRS)
    assert sent and sent[0]["x-goog-meta-mtime"] == "1700000000.123456789"
    assert sent[0]["x-goog-meta-mode"] == str(ATTRS.mode)
    assert info.attrs == ATTRS == backend.stat(key).attrs
