"""The cache's policy (what is evicted, what never is, names) and the one errno table, without servers."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from clearmlfs.backends import ObjectInfo
from clearmlfs.backends.memory import MemoryBackend
from clearmlfs.cache import CacheContext, EntryState, entry_name
from clearmlfs.errors import (
    AccessDenied,
    AlreadyExists,
    Changed,
    ConfigError,
    CrossDevice,
    InvalidURL,
    NoSpace,
    NotEmpty,
    NotFound,
    ReadOnly,
    StorageError,
    TimedOut,
    Transient,
    Unsupported,
    to_errno,
)


@pytest.mark.parametrize("error,code", [
    (NotFound("x"), errno.ENOENT), (AccessDenied("x"), errno.EACCES), (AlreadyExists("x"), errno.EEXIST),
    (NoSpace("x"), errno.ENOSPC), (Changed("x"), errno.ESTALE), (TimedOut("x"), errno.ETIMEDOUT),
    (Unsupported("x"), errno.ENOTSUP), (NotEmpty("x"), errno.ENOTEMPTY), (CrossDevice("x"), errno.EXDEV),
    (ReadOnly("x"), errno.EROFS), (InvalidURL("x"), errno.EINVAL), (ConfigError("x"), errno.EACCES),
    (Transient("x"), errno.EIO), (StorageError("x"), errno.EIO), (FileNotFoundError(), errno.ENOENT),
    (PermissionError(), errno.EACCES), (OSError(errno.EROFS, "x"), errno.EROFS), (ValueError("x"), errno.EIO),
])
def test_every_error_has_one_errno(error: BaseException, code: int) -> None:
    assert to_errno(error) == code


def _entry(cache: CacheContext, url: str, size: int, age: float, dirty: bool = False) -> Path:
    path = cache.path_for(url)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    cache.save_state(EntryState(url, "etag", size, dirty=dirty))
    return path


def test_the_least_recently_used_entries_go_first_beyond_the_count(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, file_limit=2, min_free="0")
    paths = [_entry(cache, f"s3://b/{i}", 10, age=100 - i) for i in range(4)]  # 0 is the oldest
    cache.clean()
    assert [p.exists() for p in paths] == [False, False, True, True]


def test_the_least_recently_used_entries_go_first_beyond_the_byte_limit(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, file_limit=100, byte_limit=25, min_free="0")
    paths = [_entry(cache, f"s3://b/{i}", 10, age=100 - i) for i in range(4)]
    cache.clean()
    assert [p.exists() for p in paths] == [False, False, True, True]


def test_without_a_count_limit_bytes_and_free_space_decide(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, file_limit=None, min_free="0")
    paths = [_entry(cache, f"s3://b/{i}", 10, age=1000 - i) for i in range(150)]
    assert cache.clean() == [] and all(p.exists() for p in paths)
    assert cache.set_file_limit(10) is None  # no limit to raise: the context still counts none
    cache.byte_limit = 1000
    cache.clean()
    assert [p.exists() for p in paths] == [False] * 50 + [True] * 100


def test_dirty_and_pinned_entries_are_never_evicted(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, file_limit=0, min_free="0")
    dirty = _entry(cache, "s3://b/dirty", 10, age=50, dirty=True)
    pinned = _entry(cache, "s3://b/pinned", 10, age=40)
    clean = _entry(cache, "s3://b/clean", 10, age=30)
    with cache.pin(pinned):
        cache.clean()
    assert dirty.exists() and pinned.exists() and not clean.exists()


def test_an_entry_evicted_takes_its_state_with_it(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, file_limit=0, min_free="0")
    _entry(cache, "s3://b/x", 10, age=10)
    cache.clean()
    assert cache.state("s3://b/x") is None


def test_a_disk_short_of_free_space_is_relieved_by_eviction(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    cache = CacheContext(tmp_path, file_limit=100, min_free=str(free + 15))  # 15 bytes short, and then some
    paths = [_entry(cache, f"s3://b/{i}", 10, age=100 - i) for i in range(3)]
    assert cache.short_of_space()
    assert cache.make_room(0)
    assert not paths[0].exists()  # the oldest went first


def test_make_room_says_so_when_nothing_can_go(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path, min_free="0")
    _entry(cache, "s3://b/dirty", 10, age=10, dirty=True)
    assert cache.make_room(10**18) is False


@pytest.mark.parametrize("url,name", [
    ("s3://bucket/a/model.pt", "model.pt"), ("gs://b/x.tar.gz", "x.tar.gz"),
    ("azure://a.blob.core.windows.net/c/d", "d"),
])
def test_cache_names_are_the_sdks(url: str, name: str) -> None:
    import hashlib

    assert entry_name(url) == f"{hashlib.md5(url.encode(), usedforsecurity=False).hexdigest()}.{name}"


def test_long_names_keep_their_last_two_suffixes_and_fit() -> None:
    name = entry_name("s3://b/" + "n" * 400 + ".tar.gz")
    assert name.endswith(".tar.gz") and len(name) <= 255 - 32


def test_counters_survive_a_new_context_of_the_same_folder(tmp_path: Path) -> None:
    CacheContext(tmp_path).count("served_offline")
    CacheContext(tmp_path).count("served_offline")
    assert CacheContext(tmp_path).counters() == {"served_offline": 2}


def test_dirty_entries_are_found_again_after_a_restart(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path)
    _entry(cache, "s3://b/d", 1, age=1, dirty=True)
    _entry(cache, "s3://b/c", 1, age=1)
    assert [s.url for s in CacheContext(tmp_path).dirty_entries()] == ["s3://b/d"]


def test_an_unfinished_multipart_upload_is_remembered_until_forgotten(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path)
    cache.note_upload("s3://b/k", "upload-1")
    assert CacheContext(tmp_path).unfinished_uploads() == [("s3://b/k", "upload-1")]
    cache.forget_upload("s3://b/k", "another")
    assert cache.unfinished_uploads() == [("s3://b/k", "upload-1")]
    cache.forget_upload("s3://b/k", "upload-1")
    assert cache.unfinished_uploads() == []


# -- the one way into the cache ------------------------------------------------------------------------------
URL = "s3://mem:1/bucket/big.bin"


def test_a_whole_fetch_lands_range_by_range_and_records_the_version(tmp_path: Path) -> None:
    cache, backend = CacheContext(tmp_path, fetch_concurrency=3), MemoryBackend("s3://mem:1/bucket")
    data = os.urandom(20 * 1024 * 1024 + 5)
    info = backend.put("big.bin", data)
    path = cache.fetch(URL, backend, "big.bin", info)
    assert path.read_bytes() == data and path == cache.path_for(URL)
    state = cache.state(URL)
    assert state is not None and state.etag == info.etag and state.size == len(data)
    assert backend.count("GET") == 3  # 8 MiB ranges
    assert not list(cache.folder.glob("*.partially"))


def test_a_whole_fetch_of_an_object_changed_since_its_stat_gets_the_new_version(tmp_path: Path) -> None:
    cache, backend = CacheContext(tmp_path), MemoryBackend("s3://mem:1/bucket")
    old = backend.put("big.bin", b"old" * 1000)
    new = backend.put("big.bin", b"new" * 2000)
    path = cache.fetch(URL, backend, "big.bin", old)
    assert path.read_bytes() == b"new" * 2000
    state = cache.state(URL)
    assert state is not None and state.etag == new.etag


def test_a_failed_fetch_leaves_neither_a_partial_file_nor_its_lock(tmp_path: Path) -> None:
    cache, backend = CacheContext(tmp_path), MemoryBackend("s3://mem:1/bucket")
    info = backend.put("big.bin", b"x" * 100)
    backend.fail_next(100, Transient("injected"))
    with pytest.raises(Transient):
        cache.fetch(URL, backend, "big.bin", info)
    assert not list(cache.folder.glob("*.partially")) and cache.lookup(URL) is None
    landing = cache.land(URL)  # nobody holds the download lock any more
    assert landing is not None
    landing.discard()
    landing.close()


def test_only_one_download_of_an_object_at_a_time(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path)
    first = cache.land(URL, 10)
    assert first is not None and os.fstat(first.fd).st_size == 10  # sparse, ranges land at their offsets
    assert cache.land(URL) is None  # another thread or process is downloading it
    first.discard()
    first.close()
    second = cache.land(URL)
    assert second is not None
    second.discard()
    second.close()


def test_a_small_object_lands_in_one_request(tmp_path: Path) -> None:
    cache, backend = CacheContext(tmp_path), MemoryBackend("s3://mem:1/bucket")
    info = backend.put("big.bin", b"small")
    fetched = cache.fetch_small(URL, backend, "big.bin", 1024)
    assert fetched is not None and fetched[0] is not None and fetched[0].read_bytes() == b"small"
    assert fetched[1] is not None and fetched[1].etag == info.etag
    assert not list(cache.folder.glob("*.partially"))


class EvictedDuringRequest(MemoryBackend):
    """A server answering a conditional GET while the cache's cleaner evicts the copy it is about."""

    def __init__(self, root: str, evict: Path) -> None:
        super().__init__(root)
        self.evict = evict

    def read_small(self, fd: int, key: str, limit: int, unless_etag: str | None = None) -> ObjectInfo | None:
        if unless_etag is not None:
            self.evict.unlink()
        return super().read_small(fd, key, limit, unless_etag)


def test_a_copy_evicted_while_the_server_says_it_is_current_is_fetched_again(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path)
    backend = EvictedDuringRequest("s3://mem:1/bucket", cache.path_for(URL))
    backend.put("small.bin", b"small")
    assert cache.fetch_small(URL, backend, "small.bin", 1024) is not None
    fetched = cache.fetch_small(URL, backend, "small.bin", 1024)  # a 304, of a copy gone meanwhile
    assert fetched is not None and fetched[0] is not None and fetched[0].read_bytes() == b"small"
    assert fetched[1] is not None


def test_partial_copies_are_counted_apart_from_the_entries(tmp_path: Path) -> None:
    cache = CacheContext(tmp_path)
    _entry(cache, "s3://b/whole", 10, age=1)
    sparse = cache.state_folder / f"{entry_name('s3://b/big')}.sparse"
    with sparse.open("wb") as f:
        f.truncate(1 << 30)  # a hole: only what was written counts
        f.seek(1 << 20)
        f.write(b"x" * 65536)
    assert cache.stats() == (1, 10)
    copies, size = cache.partial_stats()
    assert copies == 1 and 65536 <= size < 1 << 20
