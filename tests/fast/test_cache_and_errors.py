"""The cache's policy (what is evicted, what never is, names) and the one errno table, without servers."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

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
