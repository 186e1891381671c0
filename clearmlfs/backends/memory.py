"""An in-memory bucket: the backend the fast tests drive the filesystem with, without any server.

It behaves as an S3 bucket does where the filesystem can tell (ETags change with every write, a listing with a
delimiter gives common prefixes, a read pinned to an ETag fails once the object changed), and it can be told
to fail: `fail_next(n, error)` makes the next n requests raise `error`, `hold()` makes every request wait until
`release()` (a server that stops answering).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClearmlfsError, NotFound, Transient
from .base import STREAM_PARTS_IN_MEMORY, Attrs, Backend, ObjectInfo, Prefix, Progress, Reader, pwrite_all, retry

HOLD_LIMIT = 60.0  # a held request gives up after this long at most: tests never hang
_retry = retry(base_delay=0.005, max_delay=0.05)  # as every backend retries, only quicker


@dataclass(frozen=True)
class _Object:
    data: bytes
    etag: str
    mtime: float
    attrs: Attrs = Attrs()


class MemoryBackend(Backend):
    reports_progress = True

    def __init__(self, url_prefix: str = "s3://memory/bucket", stream_threshold: int | None = 8 * 1024 * 1024):
        self.url_prefix = url_prefix
        self.stream_threshold = stream_threshold
        self.objects: dict[str, _Object] = {}
        self.requests: list[str] = []  # "METHOD key", in order
        self.bytes_sent = 0  # by GETs: what a reader made the server send
        self._lock = threading.Lock()
        self._failures: list[ClearmlfsError] = []
        self._held = threading.Event()
        self._held.set()
        self._versions = itertools.count(1)

    # -- what tests set and look at -------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> ObjectInfo:
        with self._lock:
            return self._store(key, data)

    def data(self, key: str) -> bytes | None:
        obj = self.objects.get(key)
        return None if obj is None else obj.data

    def fail_next(self, count: int, error: ClearmlfsError | None = None) -> None:
        with self._lock:
            self._failures += [error or Transient(f"{self.url_prefix}: injected failure")] * count

    def hold(self) -> None:
        self._held.clear()

    def release(self) -> None:
        self._held.set()

    def count(self, method: str) -> int:
        return sum(1 for r in self.requests if r.startswith(method + " "))

    # -- Backend --------------------------------------------------------------------------------------
    @_retry
    def stat(self, key: str) -> ObjectInfo:
        return self._info(key, self._get("HEAD", key))

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        self._request("LIST", prefix)
        with self._lock:
            keys = sorted(k for k in self.objects if k.startswith(prefix))
            entries: list[ObjectInfo | Prefix] = []
            seen: set[str] = set()
            for key in keys:
                rest = key[len(prefix):]
                if delimiter and delimiter in rest:
                    common = prefix + rest.split(delimiter, 1)[0] + delimiter
                    if common not in seen:
                        seen.add(common)
                        entries.append(Prefix(common))
                else:  # as S3's, a listing shows no metadata
                    info = self._info(key, self.objects[key])
                    entries.append(dataclasses.replace(info, attrs=Attrs(), attrs_known=False))
        return iter(entries)

    @_retry
    def read(self, key: str, start: int = 0, length: int | None = None, etag: str | None = None) -> bytes:
        obj = self._get("GET", key)
        if etag and obj.etag != etag:
            raise Transient(f"{self.url_prefix}/{key}: changed while read")
        data = obj.data[start:] if length is None else obj.data[start:start + length]
        with self._lock:
            self.bytes_sent += len(data)
        return data

    def read_to(
        self, fd: int, key: str, start: int, length: int, etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        data = self.read(key, start, length, etag)
        pwrite_all(fd, data, start)
        if progress is not None:
            progress(len(data))

    @_retry
    def download(self, key: str, dest: Path) -> ObjectInfo:
        obj = self._get("GET", key)
        dest.write_bytes(obj.data)
        return self._info(key, obj)

    @_retry
    def upload(self, src: Path, key: str, progress: Progress | None = None, attrs: Attrs | None = None) -> ObjectInfo:
        data = src.read_bytes()  # a missing source is the caller's OSError
        self._request("PUT", key)
        if progress is not None:
            progress()
        with self._lock:
            return self._store(key, data, attrs)

    def upload_stream(
        self, reader: Reader, key: str, progress: Progress | None = None, attrs: Attrs | None = None
    ) -> ObjectInfo:
        parts = []
        while chunk := reader.read(1024 * 1024):  # raises to abandon: nothing is stored then
            parts.append(chunk)
            if progress is not None and len(parts) % STREAM_PARTS_IN_MEMORY == 0:
                progress()
        self._request("PUT", key)
        with self._lock:
            return self._store(key, b"".join(parts), attrs)

    @_retry
    def delete(self, key: str) -> None:
        self._request("DELETE", key)
        with self._lock:
            self.objects.pop(key, None)

    @_retry
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        obj = self._get("COPY", src_key)
        with self._lock:
            return self._store(dst_key, obj.data, obj.attrs)

    @_retry
    def set_attrs(self, key: str, attrs: Attrs) -> ObjectInfo:
        obj = self._get("COPY", key)
        with self._lock:
            return self._store(key, obj.data, _merged(obj.attrs, attrs))

    # -- helpers ----------------------------------------------------------------------------------------
    def _request(self, method: str, key: str) -> None:
        self.requests.append(f"{method} {key}")
        if not self._held.wait(HOLD_LIMIT):
            raise Transient(f"{self.url_prefix}/{key}: held past {HOLD_LIMIT:g} s")
        with self._lock:
            error = self._failures.pop(0) if self._failures else None
        if error is not None:
            raise error

    def _get(self, method: str, key: str) -> _Object:
        self._request(method, key)
        with self._lock:
            obj = self.objects.get(key)
        if obj is None:
            raise NotFound(f"{self.url_prefix}/{key}: not found")
        return obj

    def _store(self, key: str, data: bytes, attrs: Attrs | None = None) -> ObjectInfo:
        etag = hashlib.md5(data + str(next(self._versions)).encode(), usedforsecurity=False).hexdigest()
        obj = self.objects[key] = _Object(data, etag, time.time(), attrs or Attrs())
        return self._info(key, obj)

    @staticmethod
    def _info(key: str, obj: _Object) -> ObjectInfo:
        return ObjectInfo(key, len(obj.data), obj.mtime, obj.etag, obj.attrs)


def _merged(old: Attrs, new: Attrs) -> Attrs:
    return Attrs(old.mtime_ns if new.mtime_ns is None else new.mtime_ns, old.mode if new.mode is None else new.mode)

