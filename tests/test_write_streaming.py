"""A large new file written through the mount is uploaded while it is being written, so close() waits only for
its last parts; anything but a plain append from the first byte falls back to uploading the file at close.

Every test writes through a real mount of SeaweedFS behind the counting `Proxy` (multipart threshold and part
size: clearml.conf's defaults, 8 MiB) and checks the server through boto3: the bytes, and that no unfinished
multipart upload is left behind. The last ones do the same on Azurite, where the SDK stages 8 MiB blocks.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs

import pytest
from azure.core.exceptions import ResourceNotFoundError

from clearmlfs.backends.s3 import S3Backend, make_client
from clearmlfs.config import S3Credentials, S3Settings
from clearmlfs.fs.upload import GrowingFile
from tests import servers, stores
from tests.mounting import (  # noqa: F401 - no_mounts_left is a session fixture, used by being imported
    clearmlfs,
    digest,
    mounted,
    no_mounts_left,
    poll,
    resident_bytes,
    stop_foreground,
)
from tests.proxy import Proxy
from tests.stores import Store
from tests.test_reliability import (
    at,
    cache_entry,
    conf_for,
    errno_of,
    key_of,
    random_bytes,
    server_bytes,
    state_of,
    unfinished_uploads,
    upload_record,
)

MIB = 1024 * 1024
STARTED_DEADLINE = 30.0  # parts of a few MiB to a local server: seconds at most, even on a loaded machine


def part_uploads(proxy: Proxy, key: str) -> int:
    """UploadPart requests for `key` the server answered."""
    return sum(1 for r in proxy.requests if r.method == "PUT" and "partNumber=" in r.query and r.path.endswith(key))


def multipart_starts(proxy: Proxy, key: str) -> int:
    """CreateMultipartUpload requests for `key` (POST ?uploads)."""
    return sum(1 for r in proxy.requests if r.method == "POST" and "uploads" in r.query and r.path.endswith(key))


def append(fd: int, data: bytes, chunk: int = MIB) -> None:
    """Write `data` in `chunk`-sized write(2)s, as cp and dd do."""
    for start in range(0, len(data), chunk):
        os.write(fd, data[start : start + chunk])


class Setup:
    """One mount's clearml.conf over SeaweedFS through the proxy, and the URL under test."""

    def __init__(self, seaweedfs: servers.SeaweedFS, proxy: Proxy, tmp_path: Path, multipart: bool = True) -> None:
        self.store: Store = stores.seaweed_store(seaweedfs, multipart=multipart, host=proxy.host)
        self.proxy, self.client, self.bucket = proxy, seaweedfs.client(), seaweedfs.bucket
        self.url = f"{self.store.fresh_prefix()}/model.bin"
        self.key = key_of(self.store, self.url)
        self.conf, self.cache = conf_for(tmp_path, "c", self.store)

    def wait_for_parts(self) -> None:
        assert poll(lambda: part_uploads(self.proxy, self.key) > 0, STARTED_DEADLINE), (
            f"no part of {self.key} uploaded while the file is open ({len(self.proxy.requests)} requests seen)"
        )

    def on_server(self) -> bytes | None:
        return server_bytes(self.client, self.bucket, self.key)

    def unfinished(self) -> list[str]:
        return unfinished_uploads(self.client, self.bucket, self.key)

    def create(self, mnt: Path) -> tuple[Path, int]:
        return create(mnt, self.url)


def create(mnt: Path, url: str) -> tuple[Path, int]:
    """`url`'s file, created in the mount and open for writing, as `open(path, "wb")` does."""
    path = at(mnt, url)
    path.parent.mkdir(parents=True)
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


class Uploading(Protocol):
    def create(self, mnt: Path) -> tuple[Path, int]: ...
    def wait_for_parts(self) -> None: ...
    def on_server(self) -> bytes | None: ...


def write_while_uploading(s: Uploading, mnt: Path, data: bytes, first: int) -> Path:
    """Create the file under test and write `data`: its `first` bytes, then (once some of them are on the
    server and the object is not) the rest. Returns the file's path, closed."""
    path, fd = s.create(mnt)
    try:
        append(fd, data[:first])
        s.wait_for_parts()
        assert s.on_server() is None, "the object is complete although the file is still open"
        append(fd, data[first:])
    finally:
        os.close(fd)
    return path


def write_then_patch_header(path: Path, data: bytes, wait_for_upload: Callable[[], None]) -> bytes:
    """Write `data` to the new file `path`, going back once its upload has started to patch bytes near the start,
    like a zip or tar writer filling in a header once it knows the sizes. Returns what the file then holds."""
    patch = b"patched header"
    path.parent.mkdir(parents=True)
    with path.open("wb") as f:
        f.write(data[: 24 * MIB])
        f.flush()
        wait_for_upload()
        f.seek(100)
        f.write(patch)
        f.seek(24 * MIB)
        f.write(data[24 * MIB :])
    return data[:100] + patch + data[100 + len(patch) :]


def test_parts_are_uploaded_before_close_and_close_completes_the_object(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path)
    data = random_bytes(44 * MIB + 12345, 1)  # not a whole number of parts: the last one is short
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path = write_while_uploading(s, mnt, data, 24 * MIB)
        assert s.on_server() == data
        assert path.read_bytes() == data
    assert multipart_starts(seaweedfs_proxy, s.key) == 1, "uploaded more than once"
    assert part_uploads(seaweedfs_proxy, s.key) == 6
    assert s.unfinished() == []
    assert not (state_of(s.cache, s.url) or {}).get("dirty")
    assert not upload_record(s.cache, s.url).exists(), "the upload ended, but its note stayed"


def test_the_parts_the_upload_has_read_leave_the_page_cache_and_nothing_is_lost(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    """A big checkpoint written through the mount must not stay in memory, dirty, until the kernel's writeback:
    once the upload has read a part, the cache file's pages of it go to disk and leave the page cache."""
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path)
    first_part = 8 * MIB
    data = random_bytes(128 * MIB, 8)
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path, fd = s.create(mnt)
        try:
            written = 24 * MIB
            append(fd, data[:written])
            s.wait_for_parts()
            cached = os.open(cache_entry(s.cache, s.url), os.O_RDONLY)
            try:
                # Each part the upload reads drops what has reached the disk by then: write on until the first
                # part is gone (its writeback takes milliseconds), or the data runs out.
                while resident_bytes(cached, first_part) and written < len(data):
                    append(fd, data[written : written + MIB])
                    written += MIB
                left = resident_bytes(cached, first_part)
            finally:
                os.close(cached)
            append(fd, data[written:])
        finally:
            os.close(fd)
        assert left == 0, f"{left} bytes of the first part still in the page cache after {written // MIB} MiB"
        assert digest(s.on_server() or b"") == digest(data)
        assert digest(path.read_bytes()) == digest(data), "the cache file lost what left the page cache"
    assert s.unfinished() == []


@pytest.mark.parametrize("checksums", ["when required (ours)", "botocore's default, CRC32 on every part"])
def test_parts_sent_from_memory_reach_the_server_whole(
    seaweedfs: servers.SeaweedFS, tmp_path: Path, checksums: str
) -> None:
    """A stream's parts are sent as views of the memory the SDK read them into, not copies: the SigV4 payload
    hash, a CRC32 checksum (botocore adds one to every part unless told otherwise, as for AWS) and the body
    itself all read those views."""
    creds = S3Credentials(host=seaweedfs.host, key=seaweedfs.admin[0], secret=seaweedfs.admin[1], secure=False)
    settings = S3Settings(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)
    client = make_client(creds, settings) if checksums.startswith("when") else seaweedfs.client()
    backend = S3Backend(creds, settings, seaweedfs.bucket, client=client)
    # A short last part; a single byte after one whole part; less than a part, sent in one PUT.
    for size in (20 * MIB + 12345, 8 * MIB + 1, 5 * MIB):
        data = random_bytes(size, 9)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        stream = GrowingFile(os.open(src, os.O_RDONLY), size)
        stream.finish()
        key = f"from-memory/{uuid.uuid4().hex}.bin"
        try:
            info = backend.upload_stream(stream, key)
        finally:
            stream.close()
        assert info.size == size
        assert digest(server_bytes(seaweedfs.client(), seaweedfs.bucket, key) or b"") == digest(data)


def test_patching_the_header_after_parts_went_up_still_stores_the_right_bytes(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    """Like a zip or tar writer that goes back to fill in a header once it knows the sizes."""
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path)
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        data = write_then_patch_header(at(mnt, s.url), random_bytes(32 * MIB, 2), s.wait_for_parts)
        assert s.on_server() == data
        assert s.unfinished() == [], "the abandoned streaming upload was not aborted"
        assert not upload_record(s.cache, s.url).exists(), "the uploads ended, but a note stayed"


def test_fsync_in_the_middle_stores_what_was_written_so_far_and_close_the_rest(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path)
    data = random_bytes(40 * MIB, 3)
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path, fd = s.create(mnt)
        try:
            append(fd, data[: 20 * MIB])
            s.wait_for_parts()
            os.fsync(fd)
            assert s.on_server() == data[: 20 * MIB]
            append(fd, data[20 * MIB :])
        finally:
            os.close(fd)
        assert s.on_server() == data
        assert s.unfinished() == []


def test_a_second_writer_on_the_same_file_is_not_lost(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path)
    data = bytearray(random_bytes(32 * MIB, 4))
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path, fd = s.create(mnt)
        try:
            append(fd, data[: 16 * MIB])
            s.wait_for_parts()
            other = os.open(path, os.O_WRONLY)
            os.pwrite(other, b"second writer", 5 * MIB)
            os.close(other)
            append(fd, data[16 * MIB :])
        finally:
            os.close(fd)
        data[5 * MIB : 5 * MIB + len(b"second writer")] = b"second writer"
        assert s.on_server() == bytes(data)
        assert path.read_bytes() == bytes(data)
        assert s.unfinished() == []


def test_upload_failure_in_the_middle_fails_close_and_the_bytes_are_uploaded_later(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path)
    data = random_bytes(32 * MIB, 5)
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path, fd = s.create(mnt)
        try:
            append(fd, data[: 16 * MIB])
            s.wait_for_parts()
            seaweedfs_proxy.fail_next(10**9, status=403)  # every request from now on is refused
            append(fd, data[16 * MIB :])
        except BaseException:
            os.close(fd)
            raise
        assert errno_of(lambda: os.close(fd)) == errno.EIO
        assert (state_of(s.cache, s.url) or {}).get("dirty"), "the refused file is not recorded as dirty"
        assert path.read_bytes() == data, "the mount does not serve what was written"
        seaweedfs_proxy.reset()
        # Refused for good (403), it waits to be told: then the unmount uploads it.
        told = subprocess.run(clearmlfs("cache", "retry", s.url, "--config", s.conf), capture_output=True, text=True)
        assert told.returncode == 0, told.stderr
    assert poll(lambda: s.on_server() == data, 60.0, 0.2), "the file was not uploaded at unmount"


def test_unmount_while_a_file_is_being_written_leaves_no_half_object_and_the_next_mount_uploads_it(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path)
    data = random_bytes(24 * MIB, 6)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "fg.log"
    process = subprocess.Popen(
        clearmlfs("mount", "-f", "--config", s.conf, "--log-file", log, mountpoint),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    fd = -1
    try:
        assert poll(lambda: os.path.ismount(mountpoint) or process.poll() is not None, 30.0)
        assert process.poll() is None, servers.log_tail(log)
        path = at(mountpoint, s.url)
        path.parent.mkdir(parents=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        append(fd, data)
        s.wait_for_parts()
        assert stop_foreground(process, signal.SIGTERM) == 0, servers.log_tail(log)
    finally:
        if fd >= 0:
            errno_of(lambda: os.close(fd))  # the mount is gone: ENOTCONN
        if process.poll() is None:
            servers.stop_process(process)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)
    assert s.on_server() is None, "an object was completed from a file still being written"
    assert s.unfinished() == [], "the streaming upload was left unfinished on the server"
    assert (state_of(s.cache, s.url) or {}).get("dirty"), "the file being written is not recorded as dirty"
    with mounted(s.conf, tmp_path / "mnt2"):
        assert poll(lambda: s.on_server() == data, 60.0, 0.2), "the next mount did not upload the file"


def test_without_multipart_a_large_file_is_one_put_at_close(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    s = Setup(seaweedfs, seaweedfs_proxy, tmp_path, multipart=False)
    data = random_bytes(24 * MIB, 7)
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path = at(mnt, s.url)
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        assert s.on_server() == data
    uploads = [r for r in seaweedfs_proxy.requests if r.method in ("PUT", "POST") and r.path.endswith(s.key)]
    assert [(r.method, r.query) for r in uploads] == [("PUT", "")]


# -- Azure: the SDK stages blocks as the file grows, and commits them at close ----------------------------------


class AzureSetup:
    """A mount's clearml.conf over Azurite through a counting proxy, and the blob under test."""

    def __init__(self, azurite: servers.Azurite, proxy: Proxy, tmp_path: Path) -> None:
        self.store = stores.azure_store(dataclasses.replace(azurite, endpoint=f"{proxy.url}/{azurite.account_name}"))
        self.proxy = proxy
        self.url = f"{self.store.fresh_prefix()}/model.bin"
        self.key = key_of(self.store, self.url)
        self.blob = azurite.service_client().get_container_client(azurite.container).get_blob_client(self.key)
        self.conf, self.cache = conf_for(tmp_path, "c", self.store)

    def block_puts(self) -> int:
        """Put Block requests for the blob the server answered (Put Block List is `comp=blocklist`)."""
        return sum(
            1 for r in self.proxy.requests
            if r.method == "PUT" and parse_qs(r.query).get("comp") == ["block"] and r.path.endswith(self.key)
        )

    def create(self, mnt: Path) -> tuple[Path, int]:
        return create(mnt, self.url)

    def wait_for_parts(self) -> None:
        assert poll(lambda: self.staged() > 0, STARTED_DEADLINE), "no block staged while the file is open"

    def staged(self) -> int:
        """Blocks uploaded and not committed yet."""
        try:
            return len(self.blob.get_block_list("uncommitted")[1])
        except ResourceNotFoundError:
            return 0

    def on_server(self) -> bytes | None:
        try:
            return bytes(self.blob.download_blob().readall())
        except ResourceNotFoundError:
            return None


@pytest.fixture()
def azurite_proxy(azurite: servers.Azurite) -> Iterator[Proxy]:
    with Proxy(upstream=azurite.endpoint.rsplit("/", 1)[0]) as proxy:
        yield proxy


def test_azure_blocks_go_up_while_the_file_is_written_and_close_commits_them(
    azurite: servers.Azurite, azurite_proxy: Proxy, tmp_path: Path
) -> None:
    s = AzureSetup(azurite, azurite_proxy, tmp_path)
    data = random_bytes(36 * MIB + 12345, 10)  # 8 MiB blocks: the last one is short
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path = write_while_uploading(s, mnt, data, 28 * MIB)
        assert digest(s.on_server() or b"") == digest(data)
        assert digest(path.read_bytes()) == digest(data)
    assert s.block_puts() == 5, "uploaded more than once"
    assert not (state_of(s.cache, s.url) or {}).get("dirty")


def test_azure_patching_the_header_after_blocks_went_up_still_stores_the_right_bytes(
    azurite: servers.Azurite, azurite_proxy: Proxy, tmp_path: Path
) -> None:
    """The stream stops uncommitted; the whole file goes up at close, and its commit drops the stale blocks."""
    s = AzureSetup(azurite, azurite_proxy, tmp_path)
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        data = write_then_patch_header(at(mnt, s.url), random_bytes(32 * MIB, 11), s.wait_for_parts)
        assert digest(s.on_server() or b"") == digest(data)
        assert s.staged() == 0, "blocks of the stopped stream are still staged"
        assert not upload_record(s.cache, s.url).exists(), "the uploads ended, but a note stayed"


@pytest.mark.parametrize("left_by", ["a file upload (12-character block IDs)", "a stream (64 characters)"])
def test_azure_blocks_another_upload_left_uncommitted_do_not_stop_a_new_one(
    azurite: servers.Azurite, azurite_proxy: Proxy, tmp_path: Path, left_by: str
) -> None:
    """Azure refuses a block whose ID length differs from the blob's uncommitted blocks (400
    InvalidBlobOrBlock) until they are committed over or a week has passed, and the SDK names blocks in 12
    characters or in 64, depending on what it uploads from. Whatever an earlier, failed upload left, the file
    still reaches the server, and its commit drops the stale blocks."""
    s = AzureSetup(azurite, azurite_proxy, tmp_path)
    # stage_block sends the ID base64-encoded: 9 or 48 characters make 12 or 64.
    s.blob.stage_block("x" * (9 if left_by.startswith("a file") else 48), b"stale")
    data = random_bytes(28 * MIB, 12)
    with mounted(s.conf, tmp_path / "mnt") as mnt:
        path = at(mnt, s.url)
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        assert digest(s.on_server() or b"") == digest(data)
    assert s.staged() == 0
