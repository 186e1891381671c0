"""`clearmlfs.StorageManager` answers as `clearml.StorageManager` (2.1.12) does: the same calls, on one clearml.conf,
one cache folder and the same real servers, through both (sdk_differential.py), and the same answers: return
value, exception class, cache path, and what lands on the server.

Where clearmlfs differs on purpose the test asserts both answers and says why (`DIFFERENCE:`); the README's
table lists them.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import logging
import os
import socket
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clearmlfs import StorageManager
from clearmlfs import cache as cache_module
from clearmlfs.cache import CacheContext
from tests import servers, stores
from tests.fileserver import FileServer
from tests.sdk_differential import Call, Outcome, both, call, run_ours, run_sdk, signatures
from tests.stores import Store

SDK_PROVIDERS = ["seaweedfs", "moto", "gcs"]  # (Azurite: the SDK cannot be pointed at its endpoint)
MARKER = "Zq9-SECRET-MARKER-7Kx"


@pytest.fixture(params=SDK_PROVIDERS)
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "seaweedfs":
        return stores.seaweed_store(request.getfixturevalue("seaweedfs"))
    if request.param == "moto":
        return stores.moto_store(request.getfixturevalue("moto_s3"))
    return stores.gcs_store(request.getfixturevalue("gcs_emulator"))


def _conf(tmp_path: Path, *stores_: Store, extra: dict[str, Any] | None = None) -> Path:
    conf, _ = stores.conf_for(tmp_path, "clearml", *stores_, extra=extra)
    return conf


def _cache(conf: Path) -> Path:
    return Path(json.loads(conf.read_text())["sdk"]["storage"]["cache"]["default_base_dir"])


def _put(url: str, data: bytes, tmp_path: Path) -> None:
    src = tmp_path / f"put-{uuid.uuid4().hex}"
    src.write_bytes(data)
    StorageManager.upload_file(str(src), url)


def _same(sdk: list[Outcome], ours: list[Outcome], calls: list[Call], tmp_path: Path) -> None:
    """Each call answered alike; an exception matches when ours is (a subclass of) the SDK's class."""
    for c, theirs, mine in zip(calls, sdk, ours, strict=True):
        where = f"{c.method}{c.args}: SDK {theirs}, clearmlfs {mine}"
        assert mine.value == theirs.value, where
        assert (mine.exc is None) == (theirs.exc is None), where
        if theirs.exc is not None:
            assert mine.exc == theirs.exc or theirs.exc in _bases(mine.exc), where


def _bases(exc: str | None) -> set[str]:
    import builtins

    from clearmlfs import errors, storage_manager

    for module in (builtins, errors, storage_manager):
        cls = getattr(module, exc or "", None)
        if isinstance(cls, type):
            return {k.__name__ for k in cls.__mro__}
    return set()


def test_every_public_classmethod_of_the_sdk_has_the_same_signature(tmp_path: Path) -> None:
    theirs, ours = signatures(_conf(tmp_path))
    assert {name: ours.get(name) for name in theirs} == theirs
    assert set(ours) - set(theirs) == {"configure", "settings"}  # (clearmlfs's own)


# -- reads and metadata ---------------------------------------------------------------------------------------
TRICKY_NAMES = ["plain.bin", "with space.bin", "ünïcødé €.bin", "what?.bin", "x" * 230 + ".tar.pt", "noext"]


def test_reads_metadata_and_cache_names_answer_as_the_sdk(store: Store, tmp_path: Path) -> None:
    conf = _conf(tmp_path, store)
    StorageManager.configure(conf)
    base = store.fresh_prefix()
    for i, name in enumerate(TRICKY_NAMES):
        _put(f"{base}/{name}", f"body {i}".encode(), tmp_path)
    _put(f"{base}/sub/deep.txt", b"deep", tmp_path)
    calls = [call("get_local_copy", f"{base}/{name}") for name in TRICKY_NAMES]  # cache file names
    calls += [
        call("exists_file", f"{base}/plain.bin"), call("exists_file", f"{base}/missing.bin"),
        call("exists_file", f"{base}/sub"), call("exists_file", f"{base}/sub/"),
        call("get_metadata", f"{base}/plain.bin"), call("get_metadata", f"{base}/plain.bin", True),
        call("get_metadata", f"{base}/plain.bin", False, True),
        call("get_file_size_bytes", f"{base}/plain.bin"), call("get_file_size_bytes", f"{base}/missing.bin"),
        call("list", base), call("list", base + "/", True), call("list", f"{base}/sub", False, True),
        call("list", f"{base}/sub", True, True, True), call("list", f"{base}/nothing"),
        call("get_stream", f"{base}/sub/deep.txt"), call("get_stream", f"{base}/sub/deep.txt", 2),
        call("get_local_copy", f"{base}/missing.bin"),
        call("get_local_copy", f"{base}/plain.bin", "other-context"),
        call("download_file", f"{base}/sub/deep.txt", str(tmp_path / "dl")),
        call("download_file", f"{base}/missing.bin", str(tmp_path / "dl")),
    ]
    ours = run_ours(conf, calls)  # first: the cache names are ours, the SDK finds the files under its own
    sdk = run_sdk(conf, calls).outcomes
    _same(sdk, ours, calls, tmp_path)
    assert ours[-2].value is not None and Path(ours[-2].value).read_bytes() == b"deep"


def test_local_files_answer_as_the_sdk(tmp_path: Path) -> None:
    """file:// URLs and plain paths: read in place, listed relative to the folder listed (None for a file or a
    missing folder). DIFFERENCE: uploading a folder as a file raises IsADirectoryError in the SDK here (ValueError
    on the object stores), clearmlfs's UploadFailed (a ValueError) everywhere."""
    root = tmp_path / "store"
    for rel in ("a/1.txt", "a/b/2.txt", "a/b/c/3.txt", "c.txt", "cd/4.txt", "arch/x.zip"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_zip(ENTRIES) if rel.endswith(".zip") else rel.encode())
    conf = _conf(tmp_path)
    url = f"file://{root}"
    calls = [
        call("list", f"{url}/a/b"), call("list", f"{url}/a/b/", True), call("list", f"{url}/a/b", True, True),
        call("list", f"{url}/c.txt"), call("list", f"{url}/nothing"),
        call("get_metadata", f"{url}/a/1.txt"), call("get_metadata", f"{url}/a/1.txt", True),
        call("exists_file", f"{url}/a/1.txt"), call("exists_file", f"{url}/a"), call("exists_file", f"{url}/a/no"),
        call("get_local_copy", f"{url}/a/1.txt"), call("get_local_copy", str(root / "a/1.txt")),
        call("get_local_copy", f"{url}/a/missing"), call("get_local_copy", f"{url}/arch/x.zip"),
        call("get_local_copy", f"{url}/arch/x.zip", None, False), call("get_file_size_bytes", f"{url}/c.txt"),
        call("get_stream", f"{url}/c.txt"),
        call("upload_file", str(root / "c.txt"), f"{url}/up/c.txt"),
        call("upload_file", str(root / "nope"), f"{url}/up/nope"),
    ]
    sdk, ours = both(conf, *calls, call("upload_file", str(root / "a"), f"{url}/up/folder"))
    for outcome in (*sdk, *ours):  # (a folder's walk order is the filesystem's)
        if isinstance(outcome.value, list):
            outcome.value.sort(key=str)
    _same(sdk[:-1], ours[:-1], calls, tmp_path)
    assert sdk[-1].exc == "IsADirectoryError" and ours[-1].exc == "UploadFailed"


def test_missing_object_metadata_and_stream_are_none(store: Store, tmp_path: Path) -> None:
    """DIFFERENCE: the SDK's S3 driver answers get_metadata of a missing object with ``{"size": None, "name"}``
    (its object is loaded lazily), and its GCS driver get_stream with an empty stream; clearmlfs answers None to
    both, as the SDK documents for an error."""
    conf = _conf(tmp_path, store)
    url = f"{store.fresh_prefix()}/missing.bin"
    sdk, ours = both(conf, call("get_metadata", url), call("get_stream", url))
    assert ours == [Outcome(None, None)] * 2
    assert sdk[0].exc is None and (sdk[0].value is None or sdk[0].value["size"] is None)
    assert sdk[1].exc is None and sdk[1].value in (None, "")


def test_zero_byte_object(store: Store, tmp_path: Path) -> None:
    """DIFFERENCE: get_local_copy of a zero-byte object is an empty file in clearmlfs, None in the SDK (which
    treats an empty download as a failure). download_file without skip_zero_size_check: None in both."""
    conf = _conf(tmp_path, store)
    StorageManager.configure(conf)
    url = f"{store.fresh_prefix()}/empty.bin"
    _put(url, b"", tmp_path)
    calls = [
        call("download_file", url, str(tmp_path / "dl")),
        call("download_file", url, str(tmp_path / "dl2"), False, True),
        call("exists_file", url), call("get_file_size_bytes", url),
    ]
    sdk, ours = both(conf, *calls, call("get_local_copy", url))
    _same(sdk[:-1], ours[:-1], calls, tmp_path)
    assert sdk[-1] == Outcome(None, None)
    assert ours[-1].value is not None and Path(ours[-1].value).read_bytes() == b""


def test_a_file_changed_on_the_server_is_downloaded_again(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """DIFFERENCE: the SDK reuses its cached copy whatever the server now holds (until force_download); clearmlfs
    compares the server's ETag first and downloads the new content into the same cache file."""
    store = stores.seaweed_store(seaweedfs)
    conf = _conf(tmp_path, store)
    StorageManager.configure(conf)
    url = f"{store.fresh_prefix()}/weights.bin"
    _put(url, b"version 1", tmp_path)
    (first,) = run_sdk(conf, [call("get_local_copy", url)]).outcomes
    _put(url, b"version 2", tmp_path)
    (stale,) = run_sdk(conf, [call("get_local_copy", url)]).outcomes
    assert stale == first and Path(first.value).read_bytes() == b"version 1"
    (forced,) = run_sdk(conf, [call("get_local_copy", url, None, True, None, True)]).outcomes
    assert forced == first and Path(first.value).read_bytes() == b"version 2"
    _put(url, b"version 3", tmp_path)
    (ours,) = run_ours(conf, [call("get_local_copy", url)])
    assert ours == first and Path(ours.value).read_bytes() == b"version 3"


@pytest.mark.parametrize("api", [
    {"files_server": "http://files.example:8081/"}, {"api_server": "http://127.0.0.1:8008"},
    {"api_server": "https://api.example.com", "web_server": "https://app.example.com"},
    {"api_server": "https://api.example.com"}, {"api_server": "http://127.0.0.1:1"},
], ids=["set", "8008", "web", "api-dot", "unknown"])
def test_files_server_is_found_as_the_sdk_finds_it(api: dict[str, str], tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    text = json.loads(conf.read_text())
    text["api"] = api
    conf.write_text(json.dumps(text))
    calls = [call("get_files_server")]
    sdk, ours = both(conf, *calls)
    _same(sdk, ours, calls, tmp_path)


# -- uploads and folders --------------------------------------------------------------------------------------
def _tree(root: Path) -> Path:
    for rel, data in {"a.txt": b"a", "sub/b.json": b"{}", "sub/deeper/c.bin": b"c" * 3000, "z y ü.txt": b"u"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_uploads_and_folders_land_alike(store: Store, tmp_path: Path) -> None:
    conf = _conf(tmp_path, store)
    src = _tree(tmp_path / "src")
    base = store.fresh_prefix()

    def calls(side: str) -> list[Call]:
        at = f"{base}/{side}"
        return [
            call("upload_file", str(src / "a.txt"), f"{at}/one/a.txt"),
            call("upload_file", str(src / "sub/b.json"), f"{at}/one/b.json"),
            call("upload_file", str(tmp_path / "missing.txt"), f"{at}/one/missing.txt"),
            call("upload_file", str(src / "sub"), f"{at}/one/a-folder"),
            call("upload_folder", str(src), f"{at}/tree"),
            call("upload_folder", str(src), f"{at}/json", "*.json"),
            call("upload_folder", str(tmp_path / "no-such-folder"), f"{at}/none"),
            call("list", f"{at}/tree"),
            call("download_folder", f"{at}/tree", str(tmp_path / side / "down")),
            call("download_folder", f"{at}/tree", str(tmp_path / side / "down-json"), "*.json"),
            call("download_folder", f"{at}/nothing", str(tmp_path / side / "down-nothing")),
        ]

    sdk = run_sdk(conf, calls("sdk")).outcomes
    ours = run_ours(conf, calls("ours"))

    def relative(outcomes: list[Outcome], side: str) -> list[Outcome]:
        text = json.dumps([o.__dict__ for o in outcomes]).replace(f"/{side}/", "/SIDE/")
        return [Outcome(**o) for o in json.loads(text)]

    _same(relative(sdk, "sdk"), relative(ours, "ours"), calls("x"), tmp_path)
    for folder in ("down", "down-json", "down-nothing"):
        assert _files(tmp_path / "sdk" / folder, "sdk") == _files(tmp_path / "ours" / folder, "ours"), folder
    assert (tmp_path / "ours" / "down-nothing").is_dir()
    StorageManager.configure(conf)
    for name in ("one/a.txt", "one/b.json", "tree/sub/deeper/c.bin", "tree/z y ü.txt"):
        assert _object(f"{base}/sdk/{name}") == _object(f"{base}/ours/{name}"), name


def test_content_type_is_guessed_from_the_object_name(store: Store, tmp_path: Path) -> None:
    """The SDK's S3 uploads guess the content type from the object's name (binary/octet-stream when it tells
    nothing); so do clearmlfs's, on every provider. DIFFERENCE: the SDK's GCS uploads guess from the local
    file's name (application/octet-stream when it tells nothing), clearmlfs from the object's, as on S3 and Azure
    (a file written through the mount has no name of its own on this machine)."""
    conf = _conf(tmp_path, store)
    (tmp_path / "notes.txt").write_text("text")
    (tmp_path / "blob").write_bytes(b"\0")
    base = store.fresh_prefix()
    uploads = [("notes.txt", "same.txt"), ("blob", "table.json"), ("notes.txt", "data.unknown-suffix")]

    def calls(side: str) -> list[Call]:
        return [call("upload_file", str(tmp_path / local), f"{base}/{side}/{name}") for local, name in uploads]

    sdk, ours = run_sdk(conf, calls("sdk")).outcomes, run_ours(conf, calls("ours"))
    assert [o.exc for o in sdk + ours] == [None] * 6
    theirs = {name: _content_type(f"{base}/sdk/{name}") for _, name in uploads}
    mine = {name: _content_type(f"{base}/ours/{name}") for _, name in uploads}
    default = "application/octet-stream" if store.root.startswith("gs://") else "binary/octet-stream"
    assert mine == {"same.txt": "text/plain", "table.json": "application/json", "data.unknown-suffix": default}
    if store.root.startswith("gs://"):
        assert theirs == {"same.txt": "text/plain", "table.json": default, "data.unknown-suffix": "text/plain"}
    else:
        assert theirs == mine


def _put_hashed(url: str, data: bytes, sha256: str) -> None:
    """Store an object with the ``sha256`` metadata the SDK writes with `upload_hash` (boto3 / google client)."""
    from clearmlfs.urls import parse_url

    parsed = parse_url(url)
    if parsed.scheme == "s3":
        _s3_client(parsed).put_object(Bucket=parsed.bucket, Key=parsed.key, Body=data, Metadata={"sha256": sha256})
        return
    blob = _gcs_client().bucket(parsed.bucket).blob(parsed.key)
    blob.metadata = {"sha256": sha256}
    blob.upload_from_string(data)


def test_read_hash_gives_the_sha256_the_sdk_stored(store: Store, tmp_path: Path) -> None:
    """get_metadata and list(with_metadata=True) with read_hash add ``hash`` when the object's metadata has a
    ``sha256`` (S3's listing carries no metadata: each object is asked, as the SDK does)."""
    conf = _conf(tmp_path, store)
    StorageManager.configure(conf)
    base = store.fresh_prefix()
    _put_hashed(f"{base}/hashed.bin", b"hashed", "ab" * 32)
    _put(f"{base}/plain.bin", b"plain", tmp_path)
    calls = [
        call("get_metadata", f"{base}/hashed.bin", False, True), call("get_metadata", f"{base}/hashed.bin"),
        call("get_metadata", f"{base}/plain.bin", True, True),
        call("list", base, False, True, True), call("list", base, True, True, True), call("list", base, False, True),
    ]
    sdk, ours = both(conf, *calls)
    _same(sdk, ours, calls, tmp_path)
    assert ours[0].value == {"size": 6, "name": f"{base[len(store.root) + 1:]}/hashed.bin", "hash": "ab" * 32}
    assert [sorted(d) for d in ours[3].value] == [["hash", "name", "size"], ["name", "size"]]


def test_fileserver_upload_returns_the_url_quoted(fileserver: FileServer, tmp_path: Path) -> None:
    """upload_file to the fileserver returns the URL with its path %-quoted, as the SDK's (a link)."""
    conf = _conf(tmp_path)
    text = json.loads(conf.read_text())
    text["api"] = fileserver.api_conf()
    conf.write_text(json.dumps(text))
    (tmp_path / "f.txt").write_text("x")
    folder = f"{fileserver.files_server}/t-{uuid.uuid4().hex[:8]}"
    calls = [call("upload_file", str(tmp_path / "f.txt"), f"{folder}/{side}/{name}")
             for side in ("sdk", "ours") for name in ("plain.txt", "with space.txt", "ünï €.txt")]
    sdk, ours = run_sdk(conf, calls[:3]).outcomes, run_ours(conf, calls[3:])
    assert [o.value.replace("/sdk/", "/SIDE/") for o in sdk] == [o.value.replace("/ours/", "/SIDE/") for o in ours]
    assert ours[1].value == f"{folder}/ours/with%20space.txt"


def test_upload_without_waiting(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """DIFFERENCE: with wait_for_upload=False the SDK returns its thread pool's pending result (an ApplyResult,
    whatever the file), clearmlfs the URL, as the signature says, and a missing file raises FileNotFoundError at
    once instead of failing in the background."""
    store = stores.seaweed_store(seaweedfs)
    conf = _conf(tmp_path, store)
    (tmp_path / "f.txt").write_text("later")
    base = store.fresh_prefix()
    calls = [call("upload_file", str(tmp_path / "f.txt"), f"{base}/f.txt", False),
             call("upload_file", str(tmp_path / "missing.txt"), f"{base}/missing.txt", False)]
    sdk, ours = both(conf, *calls)
    assert sdk == [Outcome("ApplyResult", None)] * 2
    assert ours == [Outcome(f"{base}/f.txt", None), Outcome(None, "FileNotFoundError")]
    deadline = time.monotonic() + 30
    while (stream := StorageManager.get_stream(f"{base}/f.txt")) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stream is not None and b"".join(stream) == b"later"


def _files(root: Path, side: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)).replace(f"/{side}/", "/SIDE/"): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


def _object(url: str) -> tuple[bytes, str | None]:
    """An object's bytes and its content type as stored on the server."""
    stream = StorageManager.get_stream(url)
    assert stream is not None, url
    return b"".join(stream), _content_type(url)


def _content_type(url: str) -> str | None:
    from clearmlfs.urls import parse_url

    parsed = parse_url(url)
    if parsed.scheme == "s3":
        content_type: str = _s3_client(parsed).head_object(Bucket=parsed.bucket, Key=parsed.key)["ContentType"]
        return content_type
    blob = _gcs_client().bucket(parsed.bucket).get_blob(parsed.key)
    return None if blob is None else blob.content_type


def _s3_client(parsed: Any) -> Any:
    """A plain boto3 client with the keys clearml.conf gives `parsed`'s bucket (as configured in StorageManager)."""
    import boto3
    import botocore.config

    entry = StorageManager.settings().s3_for(parsed)
    return boto3.client(
        "s3", endpoint_url=f"http://{entry.host}", aws_access_key_id=entry.key, aws_secret_access_key=entry.secret,
        config=botocore.config.Config(s3={"addressing_style": "path"}), region_name="us-east-1",
    )


def _gcs_client() -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test-project", credentials=AnonymousCredentials())


# -- credentials ----------------------------------------------------------------------------------------------
def _entry(host: str, keys: tuple[str, str], bucket: str | None = None) -> dict[str, Any]:
    entry = {"host": host, "key": keys[0], "secret": keys[1], "secure": False}
    return {**entry, "bucket": bucket} if bucket else entry


def test_credentials_are_matched_as_the_sdk(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """Per-bucket entries (key-a may use bucket-a only, key-b bucket-b only), a host entry with the admin keys,
    and an entry with a wrong secret."""
    host = seaweedfs.host
    entries = [
        _entry(host, seaweedfs.key_a, seaweedfs.bucket_a),
        _entry(host, (seaweedfs.key_b[0], "wrong-" + MARKER), seaweedfs.bucket_b),
        _entry(host, seaweedfs.admin),
    ]
    conf = _conf(tmp_path, extra={"aws": {"s3": {"credentials": entries}}})
    admin = seaweedfs.client()
    name = f"t-{uuid.uuid4().hex[:8]}/x.txt"
    for bucket in (seaweedfs.bucket_a, seaweedfs.bucket_b, seaweedfs.bucket):
        admin.put_object(Bucket=bucket, Key=name, Body=b"x")
    calls = []
    for bucket in (seaweedfs.bucket_a, seaweedfs.bucket_b, seaweedfs.bucket):
        url = f"s3://{host}/{bucket}/{name}"
        calls += [call("exists_file", url), call("get_local_copy", url), call("get_file_size_bytes", url),
                  call("list", url.rsplit("/", 1)[0])]
    sdk, ours = both(conf, *calls)
    _same(sdk, ours, calls, tmp_path)
    assert [o.value for o in ours[0:12:4]] == [True, False, True]  # bucket-b's entry has the wrong secret


def test_bucket_named_like_a_longer_one_gets_its_own_credentials(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """DIFFERENCE: the SDK matches an entry's bucket as a text prefix of the URL, so bucket-a's entry (key-a) also
    serves s3://host/bucket-ab/..., which key-a may not read; clearmlfs matches whole path segments and uses the
    host entry there."""
    host = seaweedfs.host
    entries = [
        _entry(host, seaweedfs.key_a, seaweedfs.bucket_a),
        _entry(host, seaweedfs.admin),
    ]
    conf = _conf(tmp_path, extra={"aws": {"s3": {"credentials": entries}}})
    admin = seaweedfs.client()
    servers.create_s3_buckets(admin, ["bucket-ab"])
    admin.put_object(Bucket="bucket-ab", Key="x.txt", Body=b"x")
    sdk, ours = both(conf, call("exists_file", f"s3://{host}/bucket-ab/x.txt"))
    assert sdk == [Outcome(False, None)] and ours == [Outcome(True, None)]


# -- archives -------------------------------------------------------------------------------------------------
def _zip(names: list[str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for n in names:
            zf.writestr(n, n)
    return out.getvalue()


def _tar(names: list[str], mode: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tf:  # type: ignore[call-overload]
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(n.encode())
            tf.addfile(info, io.BytesIO(n.encode()))
    return out.getvalue()


ENTRIES = ["top.txt", "d/inner.txt", "sp ace/ü.txt"]
ARCHIVES = {
    "a.zip": _zip(ENTRIES), "b.tar.gz": _tar(ENTRIES, "w:gz"), "c.tgz": _tar(ENTRIES, "w:gz"),
    "d.tar": _tar(ENTRIES, "w"), "with space ü.zip": _zip(ENTRIES), "UPPER.TGZ": _tar(ENTRIES, "w:gz"),
}
FOLDER_NAMES = [None, "plain", "has/slash", "sp ace", "ünï€", "%25 and ?"]


def test_archives_are_extracted_to_the_sdks_folders(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """.zip, .tar.gz and .tgz are extracted (into the same folder names, for every `name`), .tar is not."""
    store = stores.seaweed_store(seaweedfs)
    conf = _conf(tmp_path, store)
    StorageManager.configure(conf)
    base = store.fresh_prefix()
    for name, data in ARCHIVES.items():
        _put(f"{base}/{name}", data, tmp_path)
    calls = [call("get_local_copy", f"{base}/{name}", None, True, folder)
             for name in ARCHIVES for folder in FOLDER_NAMES]
    calls += [call("get_local_copy", f"{base}/a.zip", "ctx", False)]
    ours = run_ours(conf, calls)  # first: the folder names are ours, the SDK finds the folders under its own
    sdk = run_sdk(conf, calls).outcomes
    _same(sdk, ours, calls, tmp_path)
    for c, outcome in zip(calls[:-1], ours, strict=False):
        path = Path(outcome.value)
        if c.args[0].endswith("d.tar"):
            assert path.is_file()
        else:
            assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == sorted(ENTRIES)


def test_an_archive_the_sdk_extracted_is_reused(store: Store, tmp_path: Path) -> None:
    conf = _conf(tmp_path, store)
    StorageManager.configure(conf)
    url = f"{store.fresh_prefix()}/model.zip"
    _put(url, _zip(ENTRIES), tmp_path)
    (sdk,) = run_sdk(conf, [call("get_local_copy", url)]).outcomes
    (Path(sdk.value) / "left-by-the-sdk").write_text("kept")
    (ours,) = run_ours(conf, [call("get_local_copy", url)])
    assert ours == sdk
    assert (Path(ours.value) / "left-by-the-sdk").read_text() == "kept"  # not extracted again


def test_an_archive_changed_on_the_server_is_extracted_anew(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """DIFFERENCE: the SDK reuses its cached archive (and folder) whatever the server now holds; clearmlfs checks
    the ETag, downloads the new archive and extracts it into the same folder."""
    store = stores.seaweed_store(seaweedfs)
    conf = _conf(tmp_path, store)
    StorageManager.configure(conf)
    url = f"{store.fresh_prefix()}/model.tgz"
    _put(url, _tar(["v1.txt"], "w:gz"), tmp_path)
    (first,) = run_sdk(conf, [call("get_local_copy", url)]).outcomes
    _put(url, _tar(["v2.txt"], "w:gz"), tmp_path)
    (sdk,) = run_sdk(conf, [call("get_local_copy", url)]).outcomes
    assert sdk == first and sorted(p.name for p in Path(sdk.value).iterdir()) == ["v1.txt"]
    (ours,) = run_ours(conf, [call("get_local_copy", url)])
    assert ours == sdk and sorted(p.name for p in Path(ours.value).iterdir()) == ["v2.txt"]


# -- cache limits ---------------------------------------------------------------------------------------------
def test_cache_file_limit_is_per_context_as_in_the_sdk(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """A new context takes the limit given (even below the default), a used one only raises it; the cleanup that
    precedes each download keeps as many files as the limit says, in each context's own folder."""
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    for side in ("sdk", "ours"):
        (tmp_path / side).mkdir()
    confs = {side: _conf(tmp_path / side, store) for side in ("sdk", "ours")}
    StorageManager.configure(confs["ours"])
    for i in range(6):
        _put(f"{base}/f{i}.bin", b"%d" % i, tmp_path)
    calls = [call("set_cache_file_limit", 3, "small"), call("set_cache_file_limit", 2, "small"),
             call("set_cache_file_limit", 5), call("set_cache_file_limit", 500),
             call("set_cache_file_limit", 200, "big")]
    calls += [call("get_local_copy", f"{base}/f{i}.bin", "small") for i in range(6)]
    calls += [call("get_local_copy", f"{base}/f{i}.bin") for i in range(2)]
    sdk = run_sdk(confs["sdk"], calls).outcomes
    ours = run_ours(confs["ours"], calls)
    limits = [o.value for o in ours[:5]]
    assert limits == [o.value for o in sdk[:5]] == [3, 3, 5, 500, 200]

    def kept(side: str, context: str) -> list[str]:
        folder = _cache(confs[side]) / "storage_manager" / context
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".lock."))

    assert kept("ours", "small") == kept("sdk", "small") and len(kept("ours", "small")) < 6
    assert kept("ours", "global") == kept("sdk", "global")


# -- an unreachable server ------------------------------------------------------------------------------------
@pytest.fixture()
def unreachable(tmp_path: Path) -> Iterator[dict[str, Store]]:
    """S3 entries for a port where nothing listens (refused) and one whose listener never answers (dead)."""
    refused, dead = socket.socket(), socket.socket()
    refused.bind(("127.0.0.1", 0))
    dead.bind(("127.0.0.1", 0))
    dead.listen(0)
    hosts = {"refused": refused, "dead": dead}
    try:
        yield {name: stores.s3_host_store(name, f"127.0.0.1:{s.getsockname()[1]}", "b", "k", MARKER)
               for name, s in hosts.items()}
    finally:
        refused.close()
        dead.close()


def _offline_calls(store: Store, tmp_path: Path) -> list[Call]:
    url = f"{store.root}/x/file.bin"
    return [
        call("exists_file", url), call("get_local_copy", url), call("get_file_size_bytes", url, True),
        call("list", f"{store.root}/x"), call("download_file", url, str(tmp_path / "dl")),
        call("get_stream", url),
    ]


def test_refused_connection_answers_as_the_sdk(unreachable: dict[str, Store], tmp_path: Path) -> None:
    """Nothing listens: False / None as in the SDK (which answers at once; so does clearmlfs: a refused
    connection is not retried). Uploads raise a ValueError in both. DIFFERENCE: download_folder raises the
    provider's own connection error in the SDK (botocore's EndpointConnectionError), clearmlfs's Transient."""
    store = unreachable["refused"]
    conf = _conf(tmp_path, store)
    (tmp_path / "f.txt").write_text("x")
    calls = _offline_calls(store, tmp_path) + [call("upload_file", str(tmp_path / "f.txt"), f"{store.root}/x/up")]
    folder = call("download_folder", f"{store.root}/x", str(tmp_path / "dlf"))
    sdk, ours = both(conf, *calls, folder)
    _same(sdk[:-1], ours[:-1], calls, tmp_path)
    assert sdk[-1].exc == "EndpointConnectionError" and ours[-1].exc == "Transient"


def test_dead_server_answers_false_and_none(unreachable: dict[str, Store], tmp_path: Path) -> None:
    """A listener that never answers: the SDK gives the same answers as for a refused connection, after minutes
    of botocore retries (182 s for exists_file, measured); clearmlfs within its operation budget. Only ours is
    run here."""
    store = unreachable["dead"]
    conf = _conf(tmp_path, store)
    text = json.loads(conf.read_text())
    text["clearmlfs"] = {"op_timeout": 2, "connect_timeout": 1, "read_timeout": 1}  # (a short test)
    conf.write_text(json.dumps(text))
    calls = [c for c in _offline_calls(store, tmp_path) if c.method != "download_file"]
    assert run_ours(conf, calls) == [Outcome(False, None)] + [Outcome(None, None)] * 4


# -- secrets --------------------------------------------------------------------------------------------------
def test_no_secret_in_any_log_line_on_every_error_path(
    seaweedfs: servers.SeaweedFS, azurite: servers.Azurite, unreachable: dict[str, Store], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every secret field of the conf holds the marker; the API's error paths (server down, wrong key, missing
    object, failed upload, no fileserver) are taken with every logger at DEBUG, and the marker never shows."""
    wrong = stores.s3_host_store("wrong", seaweedfs.host, seaweedfs.bucket_a, seaweedfs.key_a[0], MARKER)
    good = stores.seaweed_store(seaweedfs)
    azure_key = base64.b64encode(MARKER.encode()).decode()  # (Azure keys are base64)
    azure = stores.azure_store(azurite)
    azure.conf["azure"]["storage"]["containers"][0]["account_key"] = azure_key
    conf = _conf(tmp_path, wrong, unreachable["refused"], azure)
    text = json.loads(conf.read_text())
    text["api"]["credentials"] = {"access_key": "ak", "secret_key": MARKER}
    conf.write_text(json.dumps(text))
    (tmp_path / "f.txt").write_text("x")
    calls = [c for st in (wrong, unreachable["refused"], azure) for c in _offline_calls(st, tmp_path)]
    calls += [
        call("get_metadata", f"{wrong.root}/missing"), call("get_local_copy", f"{good.root}/missing"),
        call("upload_file", str(tmp_path / "f.txt"), f"{wrong.root}/up"),
        call("upload_file", str(tmp_path / "f.txt"), f"{azure.root}/up"),
        call("upload_folder", str(tmp_path), f"{wrong.root}/folder"),
        call("download_folder", f"{wrong.root}/x", str(tmp_path / "dlf")),
        call("download_folder", f"{unreachable['refused'].root}/x", str(tmp_path / "dlf")),
        call("get_files_server"),
    ]
    with caplog.at_level(logging.DEBUG):
        outcomes = run_ours(conf, calls)
        for url in (f"{unreachable['refused'].root}/up", f"{wrong.root}/up"):
            with pytest.raises(ValueError) as raised:
                StorageManager.upload_file(str(tmp_path / "f.txt"), url)
            assert MARKER not in str(raised.value) and azure_key not in str(raised.value)
    assert [o.exc for o in outcomes[-3:]] == ["AccessDenied", "Transient", "ValueError"]
    leaked = [r.getMessage() for r in caplog.records if MARKER in r.getMessage() or azure_key in r.getMessage()]
    assert not leaked, leaked[:3]
    assert len(caplog.records) > len(calls)  # the error paths were taken, and logged


# -- the mount's pins -----------------------------------------------------------------------------------------
def test_a_pin_linked_to_its_cache_file_is_no_cached_file_to_the_sdk(
    seaweedfs: servers.SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount pins an open file by a lock file that is a hard link to the cache file (cache.Pin). The SDK's
    cleanup takes it for a lock file by its name, as an empty one: it keeps the same files either way, counts no
    link as a cached file, and breaks on none. (clearml 2.1.12 deletes files beyond its count even when pinned,
    and then the lock files of the names gone: the open file stays readable through the pin all the same.)"""
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    for side in ("linked", "separate"):
        (tmp_path / side).mkdir()
    confs = {side: _conf(tmp_path / side, store) for side in ("linked", "separate")}
    StorageManager.configure(confs["linked"])
    for i in range(5):
        _put(f"{base}/f{i}.bin", b"%d" % i * 1000, tmp_path)
    calls = [call("set_cache_file_limit", 2)] + [call("get_local_copy", f"{base}/f{i}.bin") for i in range(1, 5)]
    kept: dict[str, list[str]] = {}
    for side, conf in confs.items():
        StorageManager.configure(conf)
        first = Path(StorageManager.get_local_copy(f"{base}/f0.bin"))
        cache = CacheContext(_cache(conf), file_limit=0, min_free="0")
        with monkeypatch.context() as patch:
            if side == "separate":
                patch.setattr(cache_module.os, "link", _refuse_link)
            pin = cache.open_pinned(first, os.O_RDONLY)
        assert pin.linked == (side == "linked") and pin.path.stat().st_nlink == (2 if pin.linked else 1)
        sdk = run_sdk(conf, calls).outcomes
        assert all(o.exc is None for o in sdk) and all(o.value for o in sdk[1:])
        kept[side] = sorted(p.name for p in first.parent.iterdir() if not p.name.startswith(".lock."))
        assert os.pread(pin.fd, 10, 0) == b"0" * 10
        if first.exists():  # (not deleted by the SDK's cleanup): never evicted by ours while open
            cache.clean()
            assert first.exists()
        pin.release()
        assert not any(p.name.startswith(".lock.") for p in first.parent.iterdir())
    assert kept["linked"] == kept["separate"]


def _refuse_link(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
