"""Reliability of a real mount when things go wrong: injected faults, a killed daemon, many readers, a tiny
cache, hostile object names, leaked secrets, bad configuration and bad requests.

Every test acts through the OS (open/read/write/close, ls, find, the CLI) on a mount of SeaweedFS, usually
through the fault-injecting `Proxy`; the server is checked through boto3.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clearmlfs.backends.s3 import S3Backend, make_client
from clearmlfs.cache import entry_name
from clearmlfs.config import S3Credentials, S3Settings
from tests import servers, stores
from tests.mounting import (
    at,
    clearmlfs,
    daemon_running,
    mounted,
    no_mounts_left,  # noqa: F401 - a session fixture, used by being imported
    poll,
    unmount,
)
from tests.proxy import Proxy
from tests.stores import Store, conf_for, random_bytes

KIB, MIB = 1024, 1024 * 1024
SERVER_DEADLINE = 60.0


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def write_random_file(path: Path, size: int, chunk: int, seed: int) -> Path:
    """`size` bytes of seeded random data, generated `chunk` bytes at a time (seeds seed, seed+1, ...)."""
    with path.open("wb") as f:
        for i in range(size // chunk):
            f.write(random_bytes(chunk, seed + i))
    return path


def key_of(store: Store, url: str) -> str:
    assert url.startswith(store.root + "/"), url
    return url[len(store.root) + 1 :]


def cache_entry(cache: Path, url: str) -> Path:
    return cache / "storage_manager" / "global" / entry_name(url)


def state_of(cache: Path, url: str) -> dict[str, Any] | None:
    path = cache / "clearmlfs" / "global" / f"{entry_name(url)}.json"
    try:
        return dict(json.loads(path.read_text()))
    except OSError:
        return None


def upload_record(cache: Path, url: str) -> Path:
    """Where the mount notes a multipart upload of `url` in progress (CacheContext.note_upload)."""
    return cache / "clearmlfs" / "global" / f"{entry_name(url)}.upload"


def unfinished_uploads(client: Any, bucket: str, key: str) -> list[str]:
    """Multipart uploads of `key` started and neither completed nor aborted, as the server lists them."""
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    return [u["UploadId"] for u in uploads if u["Key"] == key]


def errno_of(action: Callable[[], object]) -> int | None:
    try:
        action()
    except OSError as exc:
        return exc.errno
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def server_bytes(client: Any, bucket: str, key: str) -> bytes | None:
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def tree(root: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    """Every path under `root` (relative), never descending into `skip` (mount points)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in dirs + files:
            found.add(str((here / name).relative_to(root)))
    return found


def run_cli(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(clearmlfs(*args), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# 1. Faults: no wrong bytes, no lost acknowledged writes
# ---------------------------------------------------------------------------------------------------------

N_OPS = 1000
WORKERS = 4
FILES_PER_WORKER = 8
FAULT_RATE = 0.10  # over all kinds together
INJECTED_KINDS = ("503", "reset", "truncate", "stall")
FAULT_SEED = 20240601
STALL_SECONDS = 5.0  # a stalled request costs the mount its 1 s read timeout, then a retry; held at most this long


@dataclass
class FileModel:
    """What one file must hold. `current` is the newest content written through the mount (read-your-writes:
    a failed close keeps the bytes in the cache, dirty, and they are what the mount serves and later uploads);
    `acked` says whether the close that produced it succeeded; None content = unknown (re-created next)."""

    url: str
    current: bytes | None = None
    exists: bool = False
    acked: bool = True
    big: bool = False


@dataclass
class Tally:
    ops: int = 0
    errors: int = 0
    read_errors: int = 0  # reads and range reads that raised: a retry could have served every one
    reads_checked: int = 0
    wrong_reads: int = 0
    wrong_bytes: int = 0
    unacked: int = 0
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def note(self, text: str) -> None:
        with self.lock:
            if len(self.notes) < 20:
                self.notes.append(text)


def differing_bytes(got: bytes, want: bytes) -> int:
    common = min(len(got), len(want))
    a = np.frombuffer(got[:common], dtype=np.uint8)
    b = np.frombuffer(want[:common], dtype=np.uint8)
    return int(np.count_nonzero(a != b)) + abs(len(got) - len(want))


def _write(path: Path, mode: str, data: bytes, offset: int | None = None) -> str:
    """open/write/close; returns where it failed ('open: ENOENT', 'close: EIO', ...) or '' when acknowledged."""
    try:
        f = open(path, mode)  # noqa: SIM115 - each stage's failure is told apart
    except OSError as exc:
        return f"open: {errno.errorcode.get(exc.errno or 0, exc)}"
    try:
        if offset is not None:
            f.seek(offset)
        f.write(data)
        f.flush()
    except OSError as exc:
        errno_of(f.close)
        return f"write: {errno.errorcode.get(exc.errno or 0, exc)}"
    try:
        f.close()
    except OSError as exc:
        return f"close: {errno.errorcode.get(exc.errno or 0, exc)}"
    return ""


def _one_op(mnt: Path, model: FileModel, rng: random.Random, tally: Tally) -> None:
    path = at(mnt, model.url)
    size = rng.randint(2 * MIB, 3 * MIB) if model.big else rng.randint(1, 64 * KIB)
    if not model.exists or model.current is None:
        kind = "create"
    else:
        kind = rng.choices(["read", "range-read", "overwrite", "patch", "append"], [35, 10, 20, 15, 20])[0]
    tally.add(ops=1)
    if kind in ("read", "range-read"):
        assert model.current is not None
        start = rng.randrange(len(model.current) + 1) if kind == "range-read" else 0
        length = rng.randint(1, 256 * KIB) if kind == "range-read" else -1
        try:
            with open(path, "rb") as f:
                f.seek(start)
                got = f.read(length)
        except OSError as exc:
            tally.add(errors=1, read_errors=1)
            tally.note(f"{kind} {model.url}: {exc}")
            return
        want = model.current[start:] if length < 0 else model.current[start : start + length]
        tally.add(reads_checked=1)
        if got != want:
            tally.add(wrong_reads=1, wrong_bytes=differing_bytes(got, want))
            tally.note(f"{kind} {model.url} [{start}:+{length}]: {len(got)} bytes, want {len(want)}")
        return
    data = random_bytes(size if kind in ("create", "overwrite") else rng.randint(1, 32 * KIB), rng.getrandbits(32))
    old = model.current or b""
    if kind in ("create", "overwrite"):
        failed, new = _write(path, "wb", data), data
    elif kind == "append":
        failed, new = _write(path, "ab", data), old + data
    else:
        offset = rng.randrange(len(old) + 1)
        failed = _write(path, "r+b", data, offset)
        new = old[:offset] + data + old[offset + len(data) :]
    if failed:
        tally.add(errors=1)
        tally.note(f"{kind} {model.url}: failed at {failed}")
    if failed == "":
        model.current, model.exists, model.acked = new, True, True
    elif failed.startswith("close"):
        model.current, model.exists, model.acked = new, True, False  # kept in the cache, dirty
    elif failed.startswith("write"):
        model.current = None  # partly written: unknown until the next whole-file write


def _worker(mnt: Path, models: list[FileModel], seed: int, ops: int, tally: Tally) -> None:
    rng = random.Random(seed)
    for _ in range(ops):
        _one_op(mnt, rng.choice(models), rng, tally)


def test_faults_never_give_wrong_bytes_nor_lose_acknowledged_writes(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    base = store.fresh_prefix()
    client = seaweedfs.client()
    models = [
        [FileModel(f"{base}/d{(w + i) % 3}/w{w}-f{i}.bin", big=i == 0) for i in range(FILES_PER_WORKER)]
        for w in range(WORKERS)
    ]
    # A third of the files exist before the mount: their first read is a (streamed) download.
    for w, own in enumerate(models):
        for i, model in enumerate(own):
            if i % 3 == 1:
                model.current = random_bytes(random.Random(w * 100 + i).randint(1, 512 * KIB), w * 100 + i)
                model.exists = True
                client.put_object(Bucket=seaweedfs.bucket, Key=key_of(store, model.url), Body=model.current)
    conf, _ = conf_for(tmp_path, "run", store)
    tally = Tally()
    started = time.monotonic()
    # A small file limit makes opens for writing evict, so reads download again under faults. Short request
    # timeouts: a stalled request is given up after 1 s and retried, not waited for until the proxy resets it.
    options = ["-o", "cache_files=8", "-o", "read_timeout=1,connect_timeout=1"]
    seaweedfs_proxy.stall_seconds = STALL_SECONDS
    with mounted(conf, tmp_path / "mnt", extra_args=options) as mnt:
        for d in range(3):
            (at(mnt, base) / f"d{d}").mkdir(parents=True, exist_ok=True)
        seaweedfs_proxy.fail_rate(FAULT_RATE, kinds=INJECTED_KINDS, seed=FAULT_SEED)
        with ThreadPoolExecutor(WORKERS) as pool:
            runs = [
                pool.submit(_worker, mnt, own, FAULT_SEED + w, N_OPS // WORKERS, tally) for w, own in enumerate(models)
            ]
            for run in runs:
                run.result()
        faults = sum(1 for r in seaweedfs_proxy.requests if r.fault)
        requests = len(seaweedfs_proxy.requests)
        seaweedfs_proxy.reset()  # faults off: the unmount uploads whatever is still dirty
    run_seconds = time.monotonic() - started
    assert poll(lambda: not daemon_running(tmp_path / "mnt"), 120, 0.2), "the daemon did not exit after unmount"

    lost, pending_mismatch, checked = [], [], 0
    fresh_conf, _ = conf_for(tmp_path, "verify", store)  # an empty cache; the proxy injects nothing now
    with mounted(fresh_conf, tmp_path / "verify-mnt") as mnt:
        for model in (m for own in models for m in own):
            if not model.exists or model.current is None:
                continue
            checked += 1
            try:
                got: bytes | None = at(mnt, model.url).read_bytes()
            except OSError as exc:
                got = None
                tally.note(f"verify {model.url}: {exc}")
            if got != model.current:
                (lost if model.acked else pending_mismatch).append(model.url)
            if not model.acked:
                tally.add(unacked=1)
    print(
        f"\n[faults] ops={tally.ops} requests={requests} injected_faults={faults} errors_seen={tally.errors} "
        f"read_errors={tally.read_errors} reads_checked={tally.reads_checked} wrong_reads={tally.wrong_reads} "
        f"wrong_bytes={tally.wrong_bytes} "
        f"files_checked={checked} lost_writes={len(lost)} unacked_files={tally.unacked} "
        f"unacked_mismatch={len(pending_mismatch)} run_seconds={run_seconds:.1f}"
    )
    for note in tally.notes:
        print(f"[faults]   {note}")
    assert tally.ops == N_OPS
    assert tally.wrong_bytes == 0, f"{tally.wrong_reads} reads returned wrong bytes: {tally.notes}"
    assert lost == [], f"acknowledged writes lost (server differs after a clean unmount): {lost}"
    assert pending_mismatch == [], f"writes whose close failed were never uploaded, even at unmount: {pending_mismatch}"
    assert tally.read_errors == 0, (
        f"no EIO on reads that a retry could serve: {tally.read_errors} reads failed: {tally.notes}"
    )


# ---------------------------------------------------------------------------------------------------------
# 2. kill -9 in the middle of an upload
# ---------------------------------------------------------------------------------------------------------


def test_upload_interrupted_by_kill_9_is_completed_by_the_next_mount(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    size = 200 * MIB
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    url = f"{store.fresh_prefix()}/checkpoint.bin"
    key = key_of(store, url)
    src = write_random_file(tmp_path / "checkpoint.bin", size, 8 * MIB, 1000)
    expected = sha256_file(src)
    conf, cache = conf_for(tmp_path, "c", store)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "killed.log"
    daemon = subprocess.Popen(
        clearmlfs("mount", "-f", "--config", conf, "--log-file", log, mountpoint),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    writer_error: list[BaseException] = []
    try:
        assert poll(lambda: os.path.ismount(mountpoint) or daemon.poll() is not None, 30.0)
        assert daemon.poll() is None, servers.log_tail(log)
        target = at(mountpoint, url)
        target.parent.mkdir(parents=True)

        def write() -> None:
            try:
                shutil.copyfile(src, target)  # close() blocks in the upload, then sees the daemon die
            except OSError as exc:
                writer_error.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        # A large file's upload starts while it is still written: wait until all of it is in the cache (the
        # writer is in close(), which waits for the last parts) for the kill to interrupt only the upload.
        upload_started = poll(lambda: seaweedfs_proxy.count("POST", key) + seaweedfs_proxy.count("PUT", key) > 0
                              and _size_or_0(cache_entry(cache, url)) == size, 120, 0.005)
        assert upload_started, f"no upload of {key} seen by the proxy in 120 s\n{servers.log_tail(log)}"
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
        assert server_bytes(seaweedfs.client(), seaweedfs.bucket, key) is None, (
            "the object was complete before the kill: the test did not interrupt the upload"
        )
    finally:
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=30)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)
    writer.join(timeout=60)
    assert writer_error, "close() returned success although the daemon was killed before the upload ended"
    assert state_of(cache, url) is not None and state_of(cache, url)["dirty"], "no durable dirty record"

    client = seaweedfs.client()
    assert unfinished_uploads(client, seaweedfs.bucket, key), "the kill left no multipart upload to clean up"
    assert upload_record(cache, url).exists(), "the multipart upload was not noted when it began"

    def uploaded() -> bool:
        try:
            return int(client.head_object(Bucket=seaweedfs.bucket, Key=key)["ContentLength"]) == size
        except Exception:  # noqa: BLE001 - absent (or in flux) means not yet
            return False

    with mounted(conf, tmp_path / "mnt2"):
        assert poll(uploaded, SERVER_DEADLINE, 0.5), f"{key} not uploaded {SERVER_DEADLINE:.0f}s after remount"
        body = client.get_object(Bucket=seaweedfs.bucket, Key=key)["Body"]
        digest = hashlib.sha256()
        for chunk in body.iter_chunks(4 * MIB):
            digest.update(chunk)
        assert digest.hexdigest() == expected, "the object uploaded after the crash differs from what was written"
        # The multipart upload the kill cut short was noted when it began, and the new mount aborted it: its
        # parts would otherwise stay on the server, billed, for ever.
        assert poll(lambda: not unfinished_uploads(client, seaweedfs.bucket, key), 30, 0.2), (
            f"unfinished multipart uploads of {key} left: {unfinished_uploads(client, seaweedfs.bucket, key)}")
        assert "aborted the multipart upload" in (tmp_path / "mnt2.mount.log").read_text()
        assert not upload_record(cache, url).exists()


def _size_or_0(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def test_a_write_during_the_start_up_retry_of_a_dirty_file_is_not_undone(tmp_path: Path) -> None:
    """A new mount retries a dirty file's upload at start; a user who rewrites that file meanwhile, and whose
    close() succeeds, must find the new bytes on the server (not the old upload finishing last).

    Its minutes-long stalls in loaded runs were first blamed on the shared server, hence a SeaweedFS of its own;
    they came from the writer's truncate cutting short the parts of the retry's upload in flight (see
    test_an_upload_whose_file_shrinks_meanwhile_is_redone_at_once).
    """
    running = servers.start_seaweedfs(tmp_path / "own-seaweedfs")
    try:
        with Proxy(upstream=running.info.endpoint) as seaweedfs_proxy:
            _start_up_retry_race(running.info, seaweedfs_proxy, tmp_path)
    finally:
        running.stop()


def _start_up_retry_race(seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path) -> None:
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    url = f"{store.fresh_prefix()}/retried.bin"
    key = key_of(store, url)
    conf, cache = conf_for(tmp_path, "c", store)
    old = write_random_file(tmp_path / "old.bin", 128 * MIB, 8 * MIB, 4000)
    with mounted(conf, tmp_path / "mnt", check_unmount=False) as mnt:  # (umount exits 1: the file is refused)
        target = at(mnt, url)
        target.parent.mkdir(parents=True)
        with target.open("wb") as f:
            shutil.copyfileobj(old.open("rb"), f, 8 * MIB)
            f.flush()
            seaweedfs_proxy.fail_next(10**9, status=403)  # refused now, and again by the unmount's retry
            assert errno_of(f.close) == errno.EIO
    assert poll(lambda: not daemon_running(tmp_path / "mnt"), 120, 0.2)
    assert (state_of(cache, url) or {}).get("dirty"), "the refused file is not recorded as dirty"
    seaweedfs_proxy.reset()
    assert run_cli("cache", "retry", url, "--config", conf).returncode == 0  # refused for good: retried when told
    new = b"the user's newer content"
    with mounted(conf, tmp_path / "mnt") as mnt:
        assert poll(lambda: seaweedfs_proxy.count("POST", key) > 0, 30, 0.01), "the start-up retry never began"
        with at(mnt, url).open("wb") as f:  # while the retry of the 128 MiB version is still in flight
            f.write(new)
        retry_done = poll(lambda: any(
            r.method == "POST" and "uploadId" in r.query and key in r.path for r in seaweedfs_proxy.requests), 60)
        server = server_bytes(seaweedfs.client(), seaweedfs.bucket, key)
        try:
            seen = f"{len(at(mnt, url).read_bytes())} bytes"
        except OSError as exc:
            seen = f"errno {errno.errorcode.get(exc.errno or 0)}"
    assert retry_done, "the retry's multipart upload never completed"
    assert server == new, (
        f"acknowledged write lost: the server holds {len(server or b'')} bytes (the old dirty version, uploaded by "
        f"the start-up retry after the user's close succeeded); reading it through the mount gives {seen}"
    )


@pytest.mark.parametrize(
    "event", ["after-call.s3.CreateMultipartUpload", "before-send.s3.UploadPart"], ids=["before-parts", "mid-part"]
)
def test_an_upload_whose_file_shrinks_meanwhile_is_redone_at_once(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path, event: str
) -> None:
    """What a start-up retry meets when a writer truncates the file it is uploading. The parts' sizes were fixed
    when the upload began: parts that end early must not leave the server (and a writer's close, waiting for this
    upload) waiting for bytes that never come — that cost a 60 s read timeout per attempt, six per part."""
    creds = S3Credentials(host=seaweedfs_proxy.host, key=seaweedfs.admin[0], secret=seaweedfs.admin[1], secure=False)
    settings = S3Settings(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)
    client = make_client(creds, settings)
    key = f"shrinks/{uuid.uuid4().hex}.bin"
    src = write_random_file(tmp_path / "src.bin", 32 * MIB, 8 * MIB, 5000)

    def rewrite(**_: Any) -> None:
        if src.stat().st_size > 100:
            src.write_bytes(b"the newer, shorter content")

    client.meta.events.register(event, rewrite)
    backend = S3Backend(creds, settings, seaweedfs.bucket, client=client)
    started = time.monotonic()
    info = backend.upload(src, key)
    took = time.monotonic() - started
    assert took < 30, f"the upload of a file that shrank under it took {took:.0f}s"
    assert server_bytes(seaweedfs.client(), seaweedfs.bucket, key) == b"the newer, shorter content"
    assert info.size == len(b"the newer, shorter content")
    cut = [r for r in seaweedfs_proxy.requests if "partNumber" in r.query and r.status and r.request_bytes != 8 * MIB]
    assert not cut, f"parts shorter than announced reached the server: {cut}"


# ---------------------------------------------------------------------------------------------------------
# 3. Sixteen concurrent readers
# ---------------------------------------------------------------------------------------------------------


def test_sixteen_concurrent_readers_share_one_download(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    size, readers = 256 * MIB, 16
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    url = f"{store.fresh_prefix()}/shared.bin"
    key = key_of(store, url)
    src = write_random_file(tmp_path / "shared.bin", size, 16 * MIB, 2000)
    expected = sha256_file(src)
    seaweedfs.client().upload_file(str(src), seaweedfs.bucket, key)
    src.unlink()
    conf, _ = conf_for(tmp_path, "c", store)
    with mounted(conf, tmp_path / "mnt") as mnt:
        path = at(mnt, url)
        seaweedfs_proxy.reset()
        barrier = threading.Barrier(readers)

        def read_all(_: int) -> str:
            barrier.wait(timeout=60)
            return sha256_file(path)

        with ThreadPoolExecutor(readers) as pool:
            results = list(pool.map(read_all, range(readers)))
        sent = seaweedfs_proxy.bytes_sent(path_contains=key)
    print(f"\n[readers] {readers} readers, server sent {sent} bytes = {sent / size:.3f} x the object size")
    assert results == [expected] * readers, "some readers got wrong content"
    assert sent <= 1.05 * size, f"{readers} readers caused {sent / size:.2f}x the object's size in downloads"


# ---------------------------------------------------------------------------------------------------------
# 4. Eviction never removes an open or a dirty file
# ---------------------------------------------------------------------------------------------------------


def cache_entries(cache: Path) -> list[str]:
    folder = cache / "storage_manager" / "global"
    return sorted(
        p.name for p in folder.iterdir() if not p.name.startswith(".lock.") and not p.name.endswith(".partially")
    )


def test_eviction_under_a_tiny_cache_spares_open_and_dirty_files(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    with Proxy(upstream=seaweedfs.endpoint) as refusing:
        # The dirty file lives behind a second proxy (its own host in clearml.conf) that refuses every upload.
        reads = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
        writes = stores.seaweed_store(seaweedfs, host=refusing.host)
        base = reads.fresh_prefix()
        client = seaweedfs.client()
        objects = {f"{base}/obj{i}.bin": random_bytes(MIB + i, 3000 + i) for i in range(6)}
        for url, body in objects.items():
            client.put_object(Bucket=seaweedfs.bucket, Key=key_of(reads, url), Body=body)
        kept_url, *other_urls = objects
        dirty_url = f"{writes.root}/{base.rsplit('/', 1)[1]}/dirty.bin"
        dirty_body = random_bytes(MIB // 2, 3100)
        conf, cache = conf_for(tmp_path, "c", reads, writes)
        with mounted(conf, tmp_path / "mnt", extra_args=["-o", "cache_files=2"]) as mnt:
            kept = open(at(mnt, kept_url), "rb")  # noqa: SIM115 - held open across the whole test
            try:
                assert kept.read() == objects[kept_url]
                dirty = at(mnt, dirty_url)  # its folder exists: the same bucket, seen through the other host
                f = open(dirty, "wb")  # noqa: SIM115 - the failing close is the point
                f.write(dirty_body)
                f.flush()
                refusing.fail_next(10**9, status=403)  # every request from now on: AccessDenied
                assert errno_of(f.close) == errno.EIO, "close() of a refused upload did not fail with EIO"
                for url in other_urls:
                    assert at(mnt, url).read_bytes() == objects[url], f"wrong content read from {url}"
                for url in other_urls[:2]:  # opening for writing downloads a whole copy, which cleans first
                    with open(at(mnt, url), "r+b") as g:
                        assert g.read(16) == objects[url][:16]
                entries = cache_entries(cache)
                assert cache_entry(cache, kept_url).is_file(), f"the open file's cache entry was evicted: {entries}"
                assert cache_entry(cache, dirty_url).read_bytes() == dirty_body, f"dirty entry lost: {entries}"
                assert (state_of(cache, dirty_url) or {}).get("dirty"), "the dirty file is no longer marked dirty"
                kept.seek(0)
                assert kept.read() == objects[kept_url], "the open file no longer reads correctly"
                assert at(mnt, kept_url).read_bytes() == objects[kept_url]
                # Reads are allowed again (the object was never uploaded: a HEAD now says 404), uploads have not
                # been retried yet (every 30 s): the dirty bytes are the file's content.
                refusing.reset()
                time.sleep(1.5)  # not a readiness wait: lets the 1 s metadata TTL expire, so the mount asks again
                problems = []
                dirty_errno = errno_of(dirty.read_bytes)
                if dirty_errno is not None:
                    problems.append(f"the dirty file (close failed, bytes kept in the cache) cannot be read once "
                                    f"its metadata TTL expired: {errno.errorcode[dirty_errno]}")
                elif dirty.read_bytes() != dirty_body:
                    problems.append("the dirty file no longer reads back its bytes")
                # Besides the two protected entries, at most the limit's worth (plus the one just fetched).
                if len(entries) > 2 + 2 + 1:
                    problems.append(f"cache_files=2 not enforced: {len(entries)} complete entries after reading "
                                    f"5 files: {entries}")
                assert problems == [], "\n".join(problems)
            finally:
                kept.close()
                refusing.reset()
                # Refused for good (403), the file waits to be told; then the unmount uploads it.
                assert run_cli("cache", "retry", dirty_url, "--config", conf).returncode == 0
        assert server_bytes(client, seaweedfs.bucket, key_of(writes, dirty_url)) == dirty_body


# ---------------------------------------------------------------------------------------------------------
# 5. Hostile and odd names
# ---------------------------------------------------------------------------------------------------------

LONG_NAME = "L" * 300
HOSTILE_KEYS = [
    "a/../b", "./x", "a//b", "/lead", "trail/", LONG_NAME, "ctl\x01name", "new\nline", "dup", "dup/child", "plain.txt",
]


def visible_top_level(keys: list[str]) -> set[str]:
    """What a user should see at the bucket root for these keys (an independent statement of the rule)."""
    names = set()
    for key in keys:
        first = key.split("/", 1)[0]
        if first not in ("", ".", "..") and len(first.encode()) <= 255:
            names.add(first)
    return names


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
def test_hostile_object_names_neither_crash_the_mount_nor_escape_the_cache(
    server: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Keys that cannot be file names are hidden; the rest are shown and readable.

    SeaweedFS refuses ``a/../b``, ``./x`` (InvalidRequest) and the 300-byte name (KeyTooLongError), and stores
    ``a//b`` as ``a/b`` and ``/lead`` as ``lead``; moto stores every key verbatim, as AWS does. How each key
    appears in the bucket's folder (clearmlfs/fs/namespace.py `valid_name`: a name is shown when it is not
    empty, not ``.``/``..``, has no ``/`` or NUL, and is at most 255 bytes):

    - ``a/../b``: folder ``a`` is shown; its entry ``..`` is hidden (the kernel's ``a/..`` is the bucket).
    - ``./x``: the ``.`` component is hidden, so ``x`` is unreachable.
    - ``a//b``: folder ``a`` is shown; the empty component below it is hidden (SeaweedFS: ``a/b``, shown).
    - ``/lead``: the empty first component is hidden (SeaweedFS: ``lead``, shown).
    - ``trail/``: a folder marker, shown as an empty folder ``trail``.
    - a 300-byte name: hidden (over NAME_MAX).
    - ``ctl\\x01name`` and ``new\\nline``: shown and readable (a name may hold any byte but ``/`` and NUL).
    - ``dup`` and ``dup/child``: ``dup`` is a folder holding ``child``; the object ``dup`` is shadowed.
    - ``plain.txt``: shown.
    """
    info = request.getfixturevalue(server)
    client = info.client()
    bucket = f"hostile-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    refused = []
    for key in HOSTILE_KEYS:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=f"content of {key!r}".encode())
        except client.exceptions.ClientError as exc:
            refused.append((key[:20], exc.response["Error"]["Code"]))
    stored = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", ()))
    print(f"\n[hostile:{server}] refused by the server: {refused!r}\n[hostile:{server}] stored: {stored!r}")
    key, secret = (info.key, info.secret) if server == "moto_s3" else info.admin
    store = stores.s3_host_store("hostile", info.host, bucket, key, secret)
    conf, cache = conf_for(tmp_path, "c", store)
    mountpoint = tmp_path / "mnt"
    with mounted(conf, mountpoint) as mnt:
        root = at(mnt, store.root)
        before, tmp_before = tree(tmp_path, skip=(mountpoint,)), set(os.listdir("/tmp"))
        listing = sh_out("ls", "-laR", root)
        listed = [Path(os.fsdecode(line)) for line in sh_out("find", root, "-print0").split("\0") if line]
        read = {str(p.relative_to(root)): p.read_bytes() for p in listed if p.is_file()}
        shown = set(os.listdir(root))
        print(f"[hostile:{server}] shown at the bucket root: {sorted(shown)!r}; files read: {sorted(read)!r}")
        assert os.path.ismount(mountpoint) and os.listdir(root), "the mount stopped answering"
        after, tmp_after = tree(tmp_path, skip=(mountpoint,)), set(os.listdir("/tmp"))
    assert "ls: " not in listing, listing
    assert shown == visible_top_level(stored), f"shown {sorted(shown)}, stored keys {stored}"
    bodies = {f"content of {k!r}".encode() for k in HOSTILE_KEYS}
    for path, body in read.items():
        assert ".." not in Path(path).parts and "." not in path.split("/"), f"{path!r} was shown"
        assert path in stored and body in bodies, f"{path!r} read {body!r}"
        if path in HOSTILE_KEYS:
            assert body == f"content of {path!r}".encode(), f"{path!r} read {body!r}"
    readable = {"plain.txt", "ctl\x01name", "new\nline", "dup/child"} & set(stored)
    assert readable <= set(read), f"not read: {sorted(readable - set(read))}"
    assert "dup" not in read and "trail" in shown and not (root / "trail").is_file()
    created = {p for p in after - before if not p.startswith(cache.name)}
    assert created == set(), f"files appeared outside the cache folder: {sorted(created)}"
    suspicious = {n for n in tmp_after - tmp_before if n in ("b", "x", "lead", "child", "evil", "abs")}
    assert suspicious == set(), f"new entries in /tmp: {suspicious}"


def sh_out(*cmd: str | os.PathLike[str]) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=120)
    assert done.returncode == 0, f"{cmd[0]} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
    return done.stdout.decode(errors="surrogateescape")


def evil_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name in ("../evil", "/abs/evil", "ok.txt"):
            zf.writestr(zipfile.ZipInfo(name), f"zip {name}")
    return buffer.getvalue()


def evil_tar_gz() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("../evil", "/abs/evil", "ok.txt"):
            body = f"tar {name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


@pytest.mark.parametrize("name, body", [("evil.zip", evil_zip()), ("evil.tar.gz", evil_tar_gz())])
def test_archive_entries_never_land_outside_the_extraction_folder(
    seaweedfs: servers.SeaweedFS, tmp_path: Path, name: str, body: bytes
) -> None:
    store = stores.seaweed_store(seaweedfs)
    url = f"{store.fresh_prefix()}/{name}"
    seaweedfs.client().put_object(Bucket=seaweedfs.bucket, Key=key_of(store, url), Body=body)
    conf, cache = conf_for(tmp_path, "c", store)
    before, tmp_before = tree(tmp_path), set(os.listdir("/tmp"))
    assert not os.path.lexists("/abs")
    done = run_cli("get", "--config", conf, url)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.is_dir(), f"not extracted: {folder}"
    assert sorted(tree(folder)) == ["ok.txt"], f"extracted: {sorted(tree(folder))}"
    outside = {p for p in tree(tmp_path) - before if not p.startswith(cache.name)}
    assert outside == set(), f"created outside the cache: {outside}"
    assert not [p for p in tree(cache) if Path(p).name == "evil" and not p.startswith(str(folder.relative_to(cache)))]
    assert not os.path.lexists("/abs"), "an absolute entry was written to /abs"
    assert {n for n in set(os.listdir("/tmp")) - tmp_before if "evil" in n or n == "abs"} == set()


# ---------------------------------------------------------------------------------------------------------
# 6. Security: private cache, no secrets in logs, warning for a readable config
# ---------------------------------------------------------------------------------------------------------


def test_cache_is_private_and_no_secret_reaches_any_log(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    admin = stores.seaweed_store(seaweedfs)
    denied_entry = {"host": seaweedfs.host, "bucket": "bucket-b", "key": seaweedfs.key_a[0],
                    "secret": seaweedfs.key_a[1], "secure": False}
    denied = Store("bucket-b-with-key-a", f"s3://{seaweedfs.host}/bucket-b", {"aws": {"s3": {"credentials": [
        {**admin.conf["aws"]["s3"]["credentials"][0], "bucket": seaweedfs.bucket}, denied_entry]}}})
    conf, cache = conf_for(tmp_path, "c", denied)
    base = admin.fresh_prefix()
    with mounted(conf, tmp_path / "mnt", log_level="debug") as mnt:
        path = at(mnt, f"{base}/secret-test.bin")
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 100 * KIB)
        assert path.read_bytes() == b"x" * 100 * KIB
        assert errno_of(lambda: at(mnt, f"{base}/missing").read_bytes()) == errno.ENOENT
        refused = at(mnt, f"{denied.root}/refused-{uuid.uuid4().hex[:6]}.bin")
        assert errno_of(lambda: refused.write_bytes(b"no")) in (errno.EACCES, errno.EIO)
        os.listdir(at(mnt, denied.root).parent)
    # A second mount: conf readable by others, no --log-file, so the daemon logs under <cache>/clearmlfs/logs.
    loose_cache = tmp_path / "loose-cache"
    loose = stores.write_conf(tmp_path / "loose.conf", loose_cache, denied)
    loose.chmod(0o644)
    mountpoint = tmp_path / "mnt2"
    mountpoint.mkdir()
    try:
        done = run_cli("mount", "--config", loose, "--log-level", "debug", mountpoint, timeout=90)
        assert done.returncode == 0, done.stderr
        assert "chmod" in done.stderr, f"no warning about the readable config on stderr: {done.stderr!r}"
        path = at(mountpoint, f"{base}/second.bin")
        path.write_bytes(b"y" * KIB)
        assert errno_of(lambda: at(mountpoint, f"{denied.root}/nope.bin").write_bytes(b"no")) in (
            errno.EACCES, errno.EIO)
    finally:
        problems = unmount(mountpoint)
    assert problems == "", problems
    config_out = run_cli("config", "--config", loose)
    assert "chmod" in config_out.stderr, f"`clearmlfs config` does not warn: {config_out.stderr!r}"

    logs = [p for p in tmp_path.rglob("*") if p.is_file() and (p.suffix in (".log", ".out") or "logs" in p.parts)]
    assert any(p.parent.name == "logs" for p in logs), f"no log under <cache>/clearmlfs/logs: {logs}"
    secrets = [seaweedfs.admin[1], seaweedfs.key_a[1], seaweedfs.admin[0], seaweedfs.key_a[0]]
    leaks = [(str(p), s) for p in logs for s in secrets if s in p.read_text(errors="replace")]
    assert leaks == [], f"credentials found in logs: {leaks}"
    assert any("DEBUG" in p.read_text(errors="replace") for p in logs), "no debug output was logged at all"

    wrong_modes = []
    for top in (cache, loose_cache):
        for path in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            want = 0o700 if path.is_dir() else 0o600
            if mode != want:
                wrong_modes.append(f"{path.relative_to(tmp_path)}: {mode:o} (want {want:o})")
    assert wrong_modes == [], "cache paths with loose modes:\n" + "\n".join(wrong_modes)


# ---------------------------------------------------------------------------------------------------------
# 7. Bad configuration and bad requests
# ---------------------------------------------------------------------------------------------------------


def assert_one_line_failure(done: subprocess.CompletedProcess[str], what: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"{what}: exited 0"
    assert "Traceback" not in done.stderr, f"{what}: traceback on stderr:\n{done.stderr}"
    assert len(lines) == 1, f"{what}: {len(lines)} lines on stderr, want one:\n{done.stderr}"


def test_bad_configuration_and_requests_fail_in_one_line(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    malformed = tmp_path / "malformed.conf"
    malformed.write_text('sdk {\n  aws { s3 { key: "k" \n  storage {{{ ]\n')
    malformed.chmod(0o600)
    (tmp_path / "mnt").mkdir()
    for args in (("config", "--config", malformed), ("mount", "--config", malformed, tmp_path / "mnt")):
        done = run_cli(*args)
        assert_one_line_failure(done, f"malformed HOCON ({args[0]})")
        assert "malformed.conf" in done.stderr, done.stderr

    conf, _ = conf_for(tmp_path, "c", stores.seaweed_store(seaweedfs))
    assert_one_line_failure(run_cli("get", "--config", conf, "ftp://x/y"), "unknown scheme")
    assert_one_line_failure(run_cli("mount", "--config", conf, tmp_path / "no-such-dir"), "missing mount point")
    with mounted(conf, tmp_path / "mnt") as mnt:
        second = run_cli("mount", "--config", conf, mnt)
        assert_one_line_failure(second, "mount point already mounted")
        assert os.listdir(mnt), "the first mount stopped answering after the second attempt"


# ---------------------------------------------------------------------------------------------------------
# A full cache disk
# ---------------------------------------------------------------------------------------------------------


def test_full_cache_disk_fails_writes_with_enospc_and_loses_nothing_acknowledged(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    """The cache lives on a 24 MiB tmpfs: a write that does not fit fails with ENOSPC (at write or close),
    while a file acknowledged before stays on the server, byte-identical."""
    small_disk = tmp_path / "small-disk"
    small_disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small_disk)], check=True)
    try:
        store = stores.seaweed_store(seaweedfs)
        conf = stores.write_conf(tmp_path / "c.conf", small_disk / "cache", store)
        conf.chmod(0o600)
        base = store.fresh_prefix()
        kept, kept_data = f"{base}/kept.bin", random_bytes(4 * MIB, 11)
        with mounted(conf, tmp_path / "mnt") as mnt:
            at(mnt, kept).parent.mkdir(parents=True)
            at(mnt, kept).write_bytes(kept_data)  # acknowledged: close() returned
            failures: list[int | None] = []

            def write_too_much() -> None:
                with at(mnt, f"{base}/too-big.bin").open("wb") as f:
                    for i in range(8):
                        f.write(random_bytes(4 * MIB, 100 + i))

            failures.append(errno_of(write_too_much))
            assert failures == [errno.ENOSPC], f"writing 32 MiB into a 24 MiB cache gave {failures}"
            assert at(mnt, kept).read_bytes() == kept_data
        assert server_bytes(seaweedfs.client(), seaweedfs.bucket, key_of(store, kept)) == kept_data
    finally:
        subprocess.run(["umount", "-l", str(small_disk)], check=False)
