"""A real clearmlfs mount (subprocess), used only the way a user would: open(), os.*, shutil and coreutils.

Objects are checked, or changed behind the mount's back, through each provider's own SDK.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import servers, stores
from tests.mounting import (  # noqa: F401 - no_mounts_left is a session fixture, used by being imported
    MountError,
    at,
    clearmlfs,
    mount_options,
    mounted,
    no_mounts_left,
    poll,
    stop_foreground,
)
from tests.proxy import Proxy
from tests.stores import Store

KIB, MIB = 1024, 1024 * 1024
METADATA_TTL_DEADLINE = 10.0  # the mount's metadata TTL is ~1 s; generous for a loaded 2-core machine
PROVIDERS = ["seaweedfs", "moto", "seaweedfs-no-multipart", "azurite", "gcs"]


# ---------------------------------------------------------------------------------------------------------
# Providers: a Store plus direct SDK access to its objects
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    store: Store
    get: Callable[[str], bytes]  # object key -> content, through the SDK
    put: Callable[[str, bytes], None]

    def key(self, url: str) -> str:
        assert url.startswith(self.store.root + "/"), url
        return url[len(self.store.root) + 1 :]

    def read(self, url: str) -> bytes:
        return self.get(self.key(url))

    def write(self, url: str, data: bytes) -> None:
        self.put(self.key(url), data)


def s3_target(store: Store, client: Any, bucket: str) -> Target:
    return Target(
        store,
        get=lambda key: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
        put=lambda key, data: client.put_object(Bucket=bucket, Key=key, Body=data),
    )


def make_target(name: str, request: pytest.FixtureRequest) -> Target:
    if name.startswith("seaweedfs"):
        sw: servers.SeaweedFS = request.getfixturevalue("seaweedfs")
        store = stores.seaweed_store(sw, multipart=name == "seaweedfs")
        return s3_target(store, sw.client(), sw.bucket)
    if name == "moto":
        moto: servers.MotoS3 = request.getfixturevalue("moto_s3")
        return s3_target(stores.moto_store(moto), moto.client(), moto.bucket)
    if name == "azurite":
        az: servers.Azurite = request.getfixturevalue("azurite")
        container = az.service_client().get_container_client(az.container)
        return Target(
            stores.azure_store(az),
            get=lambda key: container.get_blob_client(key).download_blob().readall(),
            put=lambda key, data: container.get_blob_client(key).upload_blob(data, overwrite=True),
        )
    gcs: servers.GCSEmulator = request.getfixturevalue("gcs_emulator")
    bucket = gcs.client().bucket(gcs.bucket)
    return Target(
        stores.gcs_store(gcs),
        get=lambda key: bucket.blob(key).download_as_bytes(),
        put=lambda key, data: bucket.blob(key).upload_from_string(data),
    )


@pytest.fixture(params=PROVIDERS)
def target(request: pytest.FixtureRequest) -> Target:
    return make_target(request.param, request)


@pytest.fixture
def seaweed(request: pytest.FixtureRequest) -> Target:
    return make_target("seaweedfs", request)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def data(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-ish bytes."""
    block = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(2048))  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def write_file(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(data(size, seed))
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def sh(*cmd: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """A coreutils command; its stderr is part of the failure message."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr.strip()}")
    return done


def cat_to(src: Path, dest: Path) -> Path:
    with dest.open("wb") as out:
        done = subprocess.run(["cat", str(src)], stdout=out, stderr=subprocess.PIPE, timeout=300)
    assert done.returncode == 0, f"cat {src}: {done.stderr.decode(errors='replace').strip()}"
    return dest


def cache_file(cache_dir: Path, url: str) -> Path:
    """Where ClearML's StorageManager keeps ``url``: computed here independently of clearmlfs.cache."""
    digest = hashlib.md5(url.encode(), usedforsecurity=False).hexdigest()
    return cache_dir / "storage_manager" / "global" / f"{digest}.{url.rsplit('/', 1)[-1]}"


def conf_for(tmp: Path, name: str, *store: Store, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """A clearml.conf named ``name`` with its own, empty cache folder; (conf, cache_dir)."""
    cache = tmp / f"cache-{name}"
    cache.mkdir()
    conf = stores.write_conf(tmp / f"{name}.conf", cache, *store, extra=extra)
    conf.chmod(0o600)  # it holds credentials; the mount warns about a readable one
    return conf, cache


def errno_of(action: Callable[[], object]) -> int:
    with pytest.raises(OSError) as failed:
        action()
    return failed.value.errno or 0


def s3_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


# ---------------------------------------------------------------------------------------------------------
# Round trips, per provider
# ---------------------------------------------------------------------------------------------------------


def test_cp_round_trip_survives_remount_with_empty_cache(target: Target, tmp_path: Path) -> None:
    base = target.store.fresh_prefix()
    small, big = write_file(tmp_path / "small.bin", KIB, 1), write_file(tmp_path / "big.bin", 64 * MIB, 2)
    conf, _ = conf_for(tmp_path, "first", target.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder = at(mnt, base)
        sh("mkdir", "-p", folder)
        sh("cp", small, big, folder)
        assert sorted(os.listdir(folder)) == ["big.bin", "small.bin"]
        assert os.stat(folder / "big.bin").st_size == 64 * MIB

    # The objects themselves, fetched by the provider's SDK.
    for src in (small, big):
        assert hashlib.sha256(target.read(f"{base}/{src.name}")).hexdigest() == sha256(src)

    conf2, cache2 = conf_for(tmp_path, "second", target.store)
    with mounted(conf2, tmp_path / "mnt") as mnt:
        for src in (small, big):
            assert os.stat(at(mnt, f"{base}/{src.name}")).st_size == src.stat().st_size
            assert sha256(cat_to(at(mnt, f"{base}/{src.name}"), tmp_path / "back.bin")) == sha256(src)
    # Read through the managed cache: ClearML's StorageManager would find the same file.
    assert sha256(cache_file(cache2, f"{base}/big.bin")) == sha256(big)


def test_object_overwritten_behind_the_mount_is_reread_on_next_open(target: Target, tmp_path: Path) -> None:
    url = f"{target.store.fresh_prefix()}/weights.bin"
    # Same size on purpose: the change must be noticed by more than the length.
    old, new = data(4 * KIB, 1), data(4 * KIB, 2)
    target.write(url, old)
    conf, _ = conf_for(tmp_path, "c", target.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        path = at(mnt, url)
        assert path.read_bytes() == old
        target.write(url, new)
        assert poll(lambda: path.read_bytes() == new, METADATA_TTL_DEADLINE), "still the old content"


# ---------------------------------------------------------------------------------------------------------
# Namespace, listing
# ---------------------------------------------------------------------------------------------------------


def test_root_lists_the_configured_schemes_and_file(seaweed: Target, tmp_path: Path) -> None:
    conf, _ = conf_for(tmp_path, "c", seaweed.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        # Only the schemes clearml.conf configures (the GCS emulator's variable does not count).
        assert sorted(os.listdir(mnt)) == ["file", "s3"]
        assert sh("ls", at(mnt, seaweed.store.root)).returncode == 0


def test_ten_thousand_objects_list_completely(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    prefix = base[len(store.root) + 1 :]
    client = servers.s3_client(seaweedfs.endpoint, *seaweedfs.admin, max_pool_connections=32)
    names = [f"obj-{i:05d}.txt" for i in range(10_000)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{n}", Body=b"x"), names))

    conf, _ = conf_for(tmp_path, "c", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(at(mnt, base))) == names
        listed = sh("ls", "-1", at(mnt, base)).stdout.split()
        assert listed == names


def test_a_folder_listed_again_is_answered_by_the_kernel_until_its_listing_changes(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    """The kernel keeps what readdir returned (cache_readdir): listing a folder again while the mount's listing of
    it stands costs the daemon no readdir (a warm `find`). A file made through the mount shows at once; one made
    elsewhere once the listing is past `list_ttl` and listed again."""
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    prefix = base[len(store.root) + 1 :]
    client = seaweedfs.client()
    names = [f"f{i:03d}" for i in range(300)]
    for name in names:
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{name}", Body=b"x")
    conf, _ = conf_for(tmp_path, "c", store)
    readdirs = lambda: (tmp_path / "mnt.mount.log").read_text().count("operations: readdir(")  # noqa: E731
    with mounted(conf, tmp_path / "mnt", log_level="debug", extra_args=["-o", "list_ttl=3"]) as mnt:
        folder = at(mnt, base)
        assert sorted(os.listdir(folder)) == names
        first = readdirs()
        for _ in range(3):
            assert sorted(os.listdir(folder)) == names
        assert readdirs() == first, "the kernel did not answer the listing again: the daemon was asked"
        (folder / "made-here").write_bytes(b"y")
        assert "made-here" in os.listdir(folder)
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/made-elsewhere", Body=b"z")
        time.sleep(3.5)
        assert sorted(os.listdir(folder)) == sorted([*names, "made-here", "made-elsewhere"])


def test_find_over_a_three_level_tree_matches_the_server(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    prefix = base[len(store.root) + 1 :]
    client = seaweedfs.client()
    rel = ["top.txt"]
    rel += [f"d{i}/f{j}.bin" for i in range(3) for j in range(2)]
    rel += [f"d{i}/e{k}/g{j}.bin" for i in range(3) for k in range(2) for j in range(3)]
    rel += ["d0/e0/deep/leaf.txt", "d2/only-dir/leaf.txt"]
    for name in rel:
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{name}", Body=name.encode())

    conf, _ = conf_for(tmp_path, "c", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        root = at(mnt, base)
        files = subprocess.run(
            ["find", ".", "-type", "f"], cwd=root, capture_output=True, text=True, timeout=120, check=True
        ).stdout.split()
        dirs = subprocess.run(
            ["find", ".", "-mindepth", "1", "-type", "d"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.split()
        assert (root / "d1" / "e1" / "g2.bin").read_bytes() == b"d1/e1/g2.bin"
    server = [k[len(prefix) + 1 :] for k in s3_keys(client, seaweedfs.bucket, prefix + "/")]
    assert sorted(f[2:] for f in files) == server == sorted(rel)
    expected_dirs = {str(Path(name).parents[i]) for name in rel for i in range(len(Path(name).parents) - 1)}
    assert sorted(d[2:] for d in dirs) == sorted(expected_dirs)


def test_bucket_without_an_entry_is_reached_with_the_default_credentials(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    seaweedfs.client().put_object(Bucket="bucket-a", Key=f"{prefix}/hello.txt", Body=b"hello a")
    # Only defaults (key A), no credentials entry at all; http because the server is plain.
    default = {"aws": {"s3": {"key": seaweedfs.key_a[0], "secret": seaweedfs.key_a[1], "secure": False}}}
    conf, _ = conf_for(tmp_path, "c", extra=default)
    with mounted(conf, tmp_path / "mnt") as mnt:
        bucket = at(mnt, f"s3://{seaweedfs.host}/bucket-a")
        assert prefix in sh("ls", bucket).stdout.split()
        assert sh("cat", bucket / prefix / "hello.txt").stdout == "hello a"


# ---------------------------------------------------------------------------------------------------------
# Direct access (file://)
# ---------------------------------------------------------------------------------------------------------


def test_file_urls_are_read_and_written_in_place(seaweed: Target, tmp_path: Path) -> None:
    folder = tmp_path / "local data"  # a space, as real paths have
    folder.mkdir()
    original = folder / "notes.txt"
    original.write_bytes(b"first line\n")
    conf, cache = conf_for(tmp_path, "c", seaweed.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        through = at(mnt, f"file://{original}")
        assert through == mnt / "file" / str(original).lstrip("/")
        assert sh("cat", through).stdout == "first line\n"
        with open(through, "ab") as f:
            f.write(b"second line\n")
        assert original.read_bytes() == b"first line\nsecond line\n"  # at once: nothing to upload
        original.write_bytes(b"changed outside\n")
        assert through.read_bytes() == b"changed outside\n"
        sh("cp", through, folder / "copy.txt")
        assert "copy.txt" in os.listdir(through.parent)
    assert [p for p in cache.rglob("*") if p.is_file() and "notes" in p.name] == []
    assert (folder / "copy.txt").read_bytes() == b"changed outside\n"


# ---------------------------------------------------------------------------------------------------------
# Failed uploads
# ---------------------------------------------------------------------------------------------------------


def write_and_close(path: Path, payload: bytes) -> None:
    """open/write/close as separate syscalls, so the failing one is known."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, payload)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)


def test_refused_upload_fails_close_with_eio_and_keeps_the_bytes(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    url = f"{store.fresh_prefix()}/result.bin"
    payload = data(100 * KIB, 7)
    conf, cache = conf_for(tmp_path, "c", store)
    # (refused for good, the file stays in the cache: `clearmlfs umount` exits 1 naming it, test_upload_refused.py)
    with mounted(conf, tmp_path / "mnt", check_unmount=False) as mnt:
        path = at(mnt, url)
        path.parent.mkdir()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        seaweedfs_proxy.fail_next(1000, status=403)  # every request from now on: AccessDenied
        assert errno_of(lambda: os.close(fd)) == errno.EIO
        seaweedfs_proxy.reset()
        assert cache_file(cache, url).read_bytes() == payload
        key = url[len(store.root) + 1 :]
        assert s3_keys(seaweedfs.client(), seaweedfs.bucket, key) == []


def test_write_to_a_bucket_the_key_may_not_use_fails_no_later_than_close(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    # An entry for bucket-b that carries key A, which SeaweedFS allows on bucket-a only. The mount may refuse
    # at open (its lookup is denied: EACCES) or at close (the upload is refused: EIO); never silently.
    entry = {
        "host": seaweedfs.host,
        "bucket": "bucket-b",
        "key": seaweedfs.key_a[0],
        "secret": seaweedfs.key_a[1],
        "secure": False,
    }
    root = f"s3://{seaweedfs.host}/bucket-b"
    store = Store("bucket-b-with-key-a", root, {"aws": {"s3": {"credentials": [entry]}}})
    url = f"{root}/denied-{uuid.uuid4().hex[:8]}.bin"
    conf, cache = conf_for(tmp_path, "c", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        try:
            fd = os.open(at(mnt, url), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except PermissionError:
            pass
        else:
            os.write(fd, b"not allowed")
            assert errno_of(lambda: os.close(fd)) == errno.EIO
            assert cache_file(cache, url).read_bytes() == b"not allowed"
    key_b = seaweedfs.client(*seaweedfs.key_b)
    assert s3_keys(key_b, "bucket-b", url[len(root) + 1 :]) == []


# ---------------------------------------------------------------------------------------------------------
# Namespace changes
# ---------------------------------------------------------------------------------------------------------


def test_mkdir_rmdir_rm_and_mv(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    prefix = base[len(store.root) + 1 :]
    client = seaweedfs.client()

    def keys() -> list[str]:
        # Relative to the test's folder, without that folder's own marker (`mkdir -p` makes it).
        return [k[len(prefix) + 1 :] for k in s3_keys(client, seaweedfs.bucket, prefix + "/") if k != prefix + "/"]

    src = write_file(tmp_path / "a.bin", 10 * KIB, 3)
    conf, _ = conf_for(tmp_path, "c", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        root = at(mnt, base)
        sh("mkdir", "-p", root / "empty")
        assert keys() == ["empty/"] and (root / "empty").is_dir()
        sh("rmdir", root / "empty")
        assert keys() == [] and not (root / "empty").exists()

        sh("mkdir", root / "d")
        sh("cp", src, root / "d" / "a.bin")
        assert errno_of(lambda: os.rmdir(root / "d")) == errno.ENOTEMPTY
        sh("mv", root / "d" / "a.bin", root / "d" / "b.bin")
        assert os.listdir(root / "d") == ["b.bin"]
        assert "d/a.bin" not in keys() and "d/b.bin" in keys()
        assert client.get_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/d/b.bin")["Body"].read() == src.read_bytes()
        sh("rm", root / "d" / "b.bin")
        assert "d/b.bin" not in keys()
        sh("rmdir", root / "d")
        assert keys() == []


def test_a_directory_renames_with_everything_under_it(target: Target, tmp_path: Path) -> None:
    base = target.store.fresh_prefix()
    names = ["x.txt", "sub/y.txt", "sub/deep/z.txt"]
    for name in names:
        target.write(f"{base}/old/{name}", name.encode())
    conf, _ = conf_for(tmp_path, "c", target.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        root = at(mnt, base)
        os.rename(root / "old", root / "new")
        assert os.listdir(root) == ["new"]
        assert (root / "new" / "sub" / "deep" / "z.txt").read_bytes() == b"sub/deep/z.txt"
    with mounted(conf, tmp_path / "mnt2") as mnt:  # another mount: the server says the same
        root = at(mnt, base)
        assert os.listdir(root) == ["new"]
        assert sorted(str(p.relative_to(root / "new")) for p in (root / "new").rglob("*.txt")) == sorted(names)
    for name in names:
        assert target.read(f"{base}/new/{name}") == name.encode()
        with pytest.raises(Exception):  # noqa: B017 - each SDK raises its own "not found"
            target.read(f"{base}/old/{name}")


def test_a_directory_of_1000_objects_renames_on_the_server(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    prefix = base[len(store.root) + 1 :]
    client = seaweedfs.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/old/{i:04d}", Body=b"x"),
                      range(1000)))
    conf, _ = conf_for(tmp_path, "c", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        root = at(mnt, base)
        os.rename(root / "old", root / "new")
        assert len(os.listdir(root / "new")) == 1000
    keys = s3_keys(client, seaweedfs.bucket, prefix + "/")
    assert len(keys) == 1000 and all(k.startswith(f"{prefix}/new/") for k in keys)


def test_directory_rename_over_the_limit_is_exdev_and_mv_falls_back_to_copy(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs)
    base = store.fresh_prefix()
    prefix = base[len(store.root) + 1 :]
    client = seaweedfs.client()
    for name in ("old/x.txt", "old/sub/y.txt"):
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{name}", Body=name.encode())
    conf, _ = conf_for(tmp_path, "c", store)
    with mounted(conf, tmp_path / "mnt", extra_args=["-o", "rename_dir_limit=1"]) as mnt:
        root = at(mnt, base)
        assert errno_of(lambda: os.rename(root / "old", root / "new")) == errno.EXDEV
        sh("mv", root / "old", root / "new")
        assert os.listdir(root) == ["new"]
        assert (root / "new" / "sub" / "y.txt").read_bytes() == b"old/sub/y.txt"
    files = [k for k in s3_keys(client, seaweedfs.bucket, prefix + "/") if not k.endswith("/")]
    assert files == [f"{prefix}/new/sub/y.txt", f"{prefix}/new/x.txt"]


def test_append_overwrite_and_truncate_existing_objects(seaweed: Target, tmp_path: Path) -> None:
    url = f"{seaweed.store.fresh_prefix()}/log.txt"
    seaweed.write(url, b"hello world")
    conf, _ = conf_for(tmp_path, "c", seaweed.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        path = at(mnt, url)
        with open(path, "ab") as f:
            f.write(b"!!")
        assert seaweed.read(url) == b"hello world!!"
        with open(path, "r+b") as f:
            f.seek(6)
            f.write(b"WORLD")
        assert seaweed.read(url) == b"hello WORLD!!"
        sh("truncate", "-s", "5", path)
        assert seaweed.read(url) == b"hello" and os.stat(path).st_size == 5
        with open(path, "wb") as f:
            f.write(b"new")
        assert seaweed.read(url) == b"new" and path.read_bytes() == b"new"
        open(path, "wb").close()  # O_TRUNC, nothing written
        assert seaweed.read(url) == b"" and os.stat(path).st_size == 0


def test_statvfs_reports_the_cache_filesystem(seaweed: Target, tmp_path: Path) -> None:
    conf, cache = conf_for(tmp_path, "c", seaweed.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        ours, cache_fs = os.statvfs(mnt), os.statvfs(cache)
    assert ours.f_blocks * ours.f_frsize == pytest.approx(cache_fs.f_blocks * cache_fs.f_frsize, rel=0.01)
    assert ours.f_bavail * ours.f_frsize == pytest.approx(cache_fs.f_bavail * cache_fs.f_frsize, rel=0.05)


def test_numpy_memory_maps_an_npy_written_through_the_mount(seaweed: Target, tmp_path: Path) -> None:
    url = f"{seaweed.store.fresh_prefix()}/embeddings.npy"
    array = np.arange(3 * 1000 * 64, dtype=np.float32).reshape(3, 1000, 64)
    expected = io.BytesIO()
    np.save(expected, array)
    conf, _ = conf_for(tmp_path, "c", seaweed.store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        path = at(mnt, url)
        path.parent.mkdir()
        np.save(path, array)
        assert seaweed.read(url) == expected.getvalue()
        loaded = np.load(path, mmap_mode="r")
        assert np.array_equal(loaded, array)
        del loaded  # the map pins the open file; unmount would be busy
    conf2, _ = conf_for(tmp_path, "fresh", seaweed.store)
    with mounted(conf2, tmp_path / "mnt") as mnt:
        loaded = np.load(at(mnt, url), mmap_mode="r")
        assert loaded.shape == (3, 1000, 64) and float(loaded[2, 999, 63]) == float(array[2, 999, 63])
        del loaded


# ---------------------------------------------------------------------------------------------------------
# Mount options and lifecycle
# ---------------------------------------------------------------------------------------------------------


def test_read_only_mount_refuses_writes_and_allow_other_is_passed(seaweed: Target, tmp_path: Path) -> None:
    url = f"{seaweed.store.fresh_prefix()}/ro.txt"
    seaweed.write(url, b"read me")
    conf, _ = conf_for(tmp_path, "c", seaweed.store)
    with mounted(conf, tmp_path / "mnt", extra_args=["-o", "ro,allow_other"]) as mnt:
        assert {"ro", "allow_other"} <= set(mount_options(mnt))
        path = at(mnt, url)
        assert path.read_bytes() == b"read me"
        assert errno_of(lambda: open(path, "ab")) == errno.EROFS
        assert errno_of(lambda: os.mkdir(path.parent / "new")) == errno.EROFS


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_mount_unmounts_cleanly_on_signal(seaweed: Target, tmp_path: Path, sig: signal.Signals) -> None:
    url = f"{seaweed.store.fresh_prefix()}/kept.txt"
    conf, _ = conf_for(tmp_path, "c", seaweed.store)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "fg.log"
    cmd = clearmlfs("mount", "-f", "--config", conf, "--log-file", log, mountpoint)
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert poll(lambda: os.path.ismount(mountpoint) or process.poll() is not None, 30.0)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        path = at(mountpoint, url)
        path.parent.mkdir()
        path.write_bytes(b"before the signal")
        assert stop_foreground(process, sig) == 0, process.stderr.read().decode()[-3000:] if process.stderr else ""
        assert not os.path.ismount(mountpoint)
        assert seaweed.read(url) == b"before the signal"
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], timeout=30)
        if process.poll() is None:
            servers.stop_process(process)


def test_mount_failure_is_one_line_and_nonzero(tmp_path: Path) -> None:
    missing_conf = tmp_path / "no-such.conf"
    (tmp_path / "mnt").mkdir()
    done = subprocess.run(
        clearmlfs("mount", "--config", missing_conf, tmp_path / "mnt"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "no-such.conf" in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")

    conf, _ = conf_for(tmp_path, "c")
    done = subprocess.run(
        clearmlfs("mount", "--config", conf, tmp_path / "not-a-folder"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_mounted_helper_reports_a_failed_mount_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="exited"), mounted(tmp_path / "no-such.conf", tmp_path / "mnt"):
        pass


@pytest.fixture(autouse=True)
def _fail_fast_without_fuse() -> Iterator[None]:
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: these tests need FUSE (run `make setup`, and a privileged container)")
    yield
