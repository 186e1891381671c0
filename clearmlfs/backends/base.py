"""The seam between clearmlfs and a storage provider.

A backend serves one bucket (S3, GCS), one container (Azure) or the local
filesystem (file://). Keys are the object names inside it, without a leading
slash. Backends are synchronous and thread-safe: the FUSE layer calls them from
worker threads, StorageManager calls them directly.

Every method raises only `clearmlfs.errors` exceptions. Each backend translates
its SDK's errors in one function (`_translate`) and says which are transient;
`retry` is the one place that retries them.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import http.client
import logging
import mimetypes
import os
import random
import re
import ssl
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

import requests
import urllib3

from ..errors import ClearmlfsError, ConfigError, NoSpace, StorageError, Transient, Unsupported

log = logging.getLogger(__name__)
request_log = logging.getLogger("clearmlfs.requests")  # one line per remote request, at debug level

# What a connection that failed or was cut off looks like, whichever SDK made the request: refused or reset
# connections, timeouts, and bodies that ended before their Content-Length (urllib3's ProtocolError and
# IncompleteRead, requests' ChunkedEncodingError, http.client's IncompleteRead). Each backend adds its own
# SDK's wrappers of these; all of them are transient.
TRANSPORT_FAILURES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    http.client.HTTPException,
    urllib3.exceptions.HTTPError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)

STREAM_PARTS_IN_MEMORY = 8  # parts (blocks) an `upload_stream` holds in memory at most: 64 MiB of 8 MiB ones


@dataclass(frozen=True)
class Attrs:
    """What object metadata keeps of a file's inode, for `stat` to show after a remount (either may be
    missing: an object written by another tool stores what that tool stores)."""

    mtime_ns: int | None = None
    mode: int | None = None  # st_mode, type bits included (as s3fs stores it)


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD (or a listing entry) tells about one object."""

    key: str
    size: int
    mtime: float  # the server's Last-Modified, seconds since the epoch
    etag: str  # ETag (S3, Azure) or generation (GCS); changes whenever the content does
    attrs: Attrs = Attrs()  # what its metadata stores
    attrs_known: bool = True  # False where the answer cannot carry metadata (an S3 listing entry)
    sha256: str | None = None  # the SHA-256 the ClearML SDK stores in the metadata (`sha256`), if any


@dataclass(frozen=True)
class Prefix:
    """A common prefix in a delimited listing: a 'directory'. `key` ends with the delimiter."""

    key: str


Progress = Callable[[], None]


class Reader(Protocol):
    """What `Backend.upload_stream` reads from; its `read` raises `ReaderAbandoned` to abandon the upload."""

    def read(self, size: int = -1, /) -> bytes: ...


class ReaderAbandoned(Exception):
    """Raised by a `Reader` into the SDK's reading thread: the upload is abandoned (and aborted)."""


# Metadata keys, as rclone and s3fs name them on S3 (``x-amz-meta-mtime``, ``x-amz-meta-mode``) and rclone on
# Azure and GCS; gcsfuse's and gsutil's mtimes are read too.
META_MTIME, META_MODE = "mtime", "mode"
META_SHA256 = "sha256"  # the ClearML SDK's (StorageHelper upload with `upload_hash`), read by `read_hash`
_OTHER_MTIMES = ("gcsfuse_mtime", "goog-reserved-file-mtime")
_SECONDS = re.compile(r"(-?\d{1,12})(?:\.(\d+))?")
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", re.IGNORECASE)
_MODE_TEXT_MAX = 0o177777  # a decimal st_mode is at most this; a larger number is rclone's octal text


def attrs_metadata(attrs: Attrs) -> dict[str, str]:
    """Object metadata storing `attrs`: mtime in seconds with nine decimals (what rclone writes and s3fs and
    rclone read), mode as a decimal st_mode (s3fs's form)."""
    meta = {}
    if attrs.mtime_ns is not None:
        seconds, nanos = divmod(attrs.mtime_ns, 1_000_000_000)
        meta[META_MTIME] = f"{seconds}.{nanos:09d}"
    if attrs.mode is not None:
        meta[META_MODE] = str(attrs.mode)
    return meta


def metadata_sha256(meta: Mapping[str, str] | None) -> str | None:
    """The hash the ClearML SDK stores with an upload (its metadata key ``sha256``, read as the SDK reads it)."""
    value = (meta or {}).get(META_SHA256)
    return value if isinstance(value, str) and value else None


SDK_CONTENT_TYPE = "binary/octet-stream"  # the SDK's content type when a name tells nothing (S3, Azure)


def content_type(key: str, default: str = SDK_CONTENT_TYPE) -> str:
    """The content type the ClearML SDK gives an upload named `key` (its get_file_mimetype: guessed from the
    name, read as a path, so a key like ``data:x.csv`` is not taken for a data URL)."""
    return mimetypes.guess_type("/" + key)[0] or default


def metadata_attrs(meta: Mapping[str, str] | None) -> Attrs:
    """The `Attrs` an object's metadata stores; a value no peer writes is ignored, not an error."""
    meta = {k.lower(): v for k, v in (meta or {}).items() if isinstance(v, str)}  # (an emulator's null)
    mtime_ns = None
    for key in (META_MTIME, *_OTHER_MTIMES):
        if key in meta and (mtime_ns := _parse_time(meta[key])) is not None:
            break
    return Attrs(mtime_ns, _parse_mode(meta.get(META_MODE)))


def _parse_time(text: str) -> int | None:
    """Nanoseconds since the epoch from seconds (``1700000000.123456789``) or RFC 3339 text."""
    if match := _SECONDS.fullmatch(text.strip()):
        return int(match[1]) * 1_000_000_000 + _nanos(match[2])
    if match := _RFC3339.fullmatch(text.strip()):
        stamp = datetime.datetime.fromisoformat(match[1] + (match[3] or "+00:00").replace("Z", "+00:00"))
        return int(stamp.timestamp()) * 1_000_000_000 + _nanos(match[2])
    return None


def _nanos(fraction: str | None) -> int:
    return int(((fraction or "") + "0" * 9)[:9])


def _parse_mode(text: str | None) -> int | None:
    if text is None or not text.strip().isdigit():
        return None
    value = int(text)
    if value > _MODE_TEXT_MAX:  # rclone writes the mode as octal text ("100644")
        value = int(text, 8) if set(text.strip()) <= set("01234567") else -1
    return value if 0 <= value <= _MODE_TEXT_MAX else None


class Backend(ABC):
    """One bucket or container. `url_prefix` is the ClearML URL of its root, e.g. ``s3://bucket``."""

    url_prefix: str
    stream_threshold: int | None = None  # size from which `upload_stream` is worth it; None: not offered
    stream_limit: int | None = None  # the largest object `upload_stream` can store; None: no limit
    # A read pinned to an ETag that succeeds proves it is still the current version (as a stat would).
    pinned_read_is_current: bool = True
    # Told (url, upload id) when an upload, a stream or a copy starts a multipart upload on the server, and
    # (url, None) when that call ends, either way: one a crash cuts short stays on the server (and is
    # billed) until someone aborts it. Only S3 has such uploads (Azure drops uncommitted blocks after a
    # week, GCS its unfinished resumable uploads likewise).
    multipart_watch: Callable[[str, str | None], None] | None = None
    reports_progress: bool = False  # whether `upload` and `upload_stream` call their `progress` as bytes go out

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, mtime and ETag of one object; NotFound if absent."""

    @abstractmethod
    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        """Every object (and, with a delimiter, every common prefix) under `prefix`, paginating as needed."""

    @abstractmethod
    def read(self, key: str, start: int = 0, length: int | None = None, etag: str | None = None) -> bytes:
        """Bytes [start, start+length) of an object (to its end when length is None).

        With `etag`, only from that version of the object: a changed object raises Transient (S3, Azure)
        or NotFound (GCS, whose old generation is gone), never a mix of two versions.
        """

    def read_to(
        self, fd: int, key: str, start: int, length: int, etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write bytes [start, start+length) of the object at the same offset of the file `fd`.

        `progress(n)` is told each time the first n bytes of the range are in the file. Backends that
        can stream the body override this so a large range never sits in memory and readers of its
        first bytes need not wait for the rest.
        """
        data = self.read(key, start, length, etag)
        if len(data) != length:
            raise Transient(f"{self.url_prefix}/{key}: short read ({len(data)} of {length} bytes at {start})")
        pwrite_all(fd, data, start)
        if progress is not None:
            progress(length)

    def read_small(self, fd: int, key: str, limit: int, unless_etag: str | None = None) -> ObjectInfo | None:
        """A small object, whole, into the file `fd` (at offset 0) and its info, in as few requests as the
        provider allows: S3 needs one GET and no HEAD, which is what makes many small files quick.

        None (and nothing written) if the object's ETag is still `unless_etag`. If the object is over
        `limit` bytes, only its info is returned and the file's content is undefined.
        """
        info = self.stat(key)
        if unless_etag and info.etag == unless_etag:
            return None
        if 0 < info.size <= limit:
            self.read_to(fd, key, 0, info.size, info.etag)
        return info

    @abstractmethod
    def download(self, key: str, dest: Path) -> ObjectInfo:
        """Write the whole object to `dest` (created or truncated), with the SDK's parallel transfer."""

    @abstractmethod
    def upload(self, src: Path, key: str, progress: Progress | None = None, attrs: Attrs | None = None) -> ObjectInfo:
        """Store the file `src` as `key`, with `attrs` in its metadata; multipart/parallel where the provider
        and settings allow.

        `progress()` is called whenever bytes were sent, where `reports_progress` says the SDK tells.
        """

    @abstractmethod
    def set_attrs(self, key: str, attrs: Attrs) -> ObjectInfo:
        """Store `attrs` in the metadata of the object `key` (its other metadata kept), without sending its
        content again: on the server (S3: a copy onto itself)."""

    def upload_stream(
        self, reader: Reader, key: str, progress: Progress | None = None, attrs: Attrs | None = None
    ) -> ObjectInfo:
        """Store as `key` what `reader` yields until it returns b'', uploading parts while it is being produced.

        `reader.read(n)` may block until n bytes exist, and raises to abandon the upload, which must then leave
        no object and nothing a later upload of `key` would trip on (no unfinished S3 multipart upload; Azure's
        uncommitted blocks go with the next commit). Never retried: a stream cannot be replayed.
        Offered only where `stream_threshold` is set.
        """
        raise Unsupported(f"{self.url_prefix}: no streaming uploads")

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload that `multipart_watch` was told of; one already gone is no error."""
        raise Unsupported(f"{self.url_prefix}: no multipart uploads to abort")

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; deleting an absent object is not an error."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove objects (absent ones are no error), in as few requests as the provider allows."""
        for key in keys:
            self.delete(key)

    @abstractmethod
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        """Server-side copy inside this bucket/container, metadata included."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections."""


Page = tuple[list[ObjectInfo | Prefix], str | None]


def paged(fetch_page: Callable[[str | None], Page]) -> Iterator[ObjectInfo | Prefix]:
    """Entries of a listing fetched page by page (each page retried on its own by `fetch_page`).

    A generator cannot be retried as a whole without repeating entries, so the listing resumes
    from the last continuation token; a prefix spanning several pages is reported once.
    """
    token: str | None = None
    seen: set[str] = set()
    while True:
        entries, token = fetch_page(token)
        for entry in entries:
            if isinstance(entry, Prefix):
                if entry.key in seen:
                    continue
                seen.add(entry.key)
            yield entry
        if not token:
            return


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of `data` at `offset`: a nearly full disk takes part of a write, and says ENOSPC only when
    asked for the rest (which then raises)."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def certificate_error(exc: BaseException, url: str, setting: str) -> ConfigError | None:
    """The error to report when `exc` (however its SDK wrapped it) is a TLS certificate that failed its check:
    a setting to change, not a failure to retry. None for any other failure."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 16:
        current = todo.pop()
        if isinstance(current, ssl.SSLCertVerificationError):
            why = current.verify_message or "not trusted"
            return ConfigError(f"{url}: the server's TLS certificate was refused ({why}); to trust it, set {setting} "
                               "to a CA bundle's path (or false, to check no certificate), as for the ClearML SDK")
        seen.append(current)
        linked = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
        todo += [e for e in linked if isinstance(e, BaseException) and all(e is not s for s in seen)]
    return None


@functools.cache
def unverified(setting: str) -> None:
    """Say once per setting that TLS certificates are not checked; urllib3 would say it on every request."""
    log.warning("TLS certificates are not checked (%s is false)", setting)
    warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)


def local_error(exc: OSError, url: str) -> ClearmlfsError:
    """An error of the local disk met during a transfer (writing the cache file): a full disk is NoSpace,
    which the cache answers by evicting; anything else fails the request as it is."""
    if exc.errno == errno.ENOSPC:
        return NoSpace(f"{url}: no space left on the cache disk")
    return StorageError(f"{url}: {exc.strerror or type(exc).__name__}")


# Query parameters whose values a request log may show; every other value (SAS tokens, signatures, credentials,
# continuation tokens) is replaced by "…".
_SHOWN_PARAMS = frozenset({
    "name", "prefix", "delimiter", "uploadType", "uploadId", "partNumber", "comp", "restype", "list-type",
    "max-keys", "maxresults", "blockid", "blocklisttype", "alt", "generation", "ifGenerationMatch",
})


def loggable_url(url: str) -> str:
    """`url` with the values of its query parameters hidden, but for the few that are plainly not secret."""
    base, _, query = url.partition("?")
    if not query:
        return base
    shown = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        shown.append(item if name in _SHOWN_PARAMS else name + ("=…" if eq else ""))
    return f"{base}?{'&'.join(shown)}"


def log_request(method: str, url: str, status: int | str, length: str | None, seconds: float, span: str = "") -> None:
    """One debug line per remote request; `length` is the response's Content-Length header, if it had one."""
    request_log.debug(
        "%s %s%s -> %s, %s bytes, %.1f ms", method, loggable_url(url), f" [{span}]" if span else "", status,
        length if length and length.isdigit() else "?", seconds * 1000,
    )


# -- time budgets ---------------------------------------------------------------------------------------
# A call made for a FUSE operation has a deadline: `retry` never waits past it, so a stalled server costs the
# caller one budget, not attempts x timeouts. Set per thread, by whoever hands the call to the thread.
_deadline = threading.local()


@contextlib.contextmanager
def deadline(seconds: float | None, *, retry_refused: bool = True) -> Iterator[None]:
    """Calls made in this thread inside the block give up retrying `seconds` from now (None: no deadline).

    Without `retry_refused`, a refused connection is not retried either: nothing listens there, and a caller
    that must answer at once (the StorageManager API, as the ClearML SDK does) says so instead of waiting.
    """
    before = getattr(_deadline, "at", None), getattr(_deadline, "retry_refused", True)
    _deadline.at = None if seconds is None else time.monotonic() + seconds
    _deadline.retry_refused = retry_refused
    try:
        yield
    finally:
        _deadline.at, _deadline.retry_refused = before


def _time_left() -> float | None:
    at: float | None = getattr(_deadline, "at", None)
    return None if at is None else at - time.monotonic()


def refused(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is a refused connection."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionRefusedError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _give_up(exc: Transient) -> bool:
    return not getattr(_deadline, "retry_refused", True) and refused(exc)


P = ParamSpec("P")
R = TypeVar("R")


def retry(
    attempts: int = 5, base_delay: float = 0.2, max_delay: float = 5.0
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Retry a backend call on `Transient`, with jittered exponential backoff, within the thread's deadline.

    SDK-level retries already cover most transient HTTP failures; this catches what
    they let through (short bodies, errors mid-transfer) and gives every backend the
    same policy.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for attempt in range(1, attempts + 1):
                try:
                    return fn(*args, **kwargs)
                except Transient as exc:
                    if attempt == attempts or _give_up(exc):
                        raise
                    delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
                    left = _time_left()
                    if left is not None and left < delay:
                        raise
                    log.debug("%s failed (%s); retry %d/%d in %.2fs", fn.__name__, exc, attempt, attempts, delay)
                    time.sleep(delay)
            raise AssertionError("unreachable")

        return wrapper

    return decorate
