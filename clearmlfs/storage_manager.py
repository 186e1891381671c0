"""`StorageManager`: ClearML's Python API over clearmlfs's backends and managed cache.

Signatures and answers follow ``clearml.StorageManager`` (2.1.12), checked call by call against the SDK in
tests/test_differential.py, so code written for the SDK works with ``from clearmlfs import StorageManager``.
Like the SDK, read helpers return None (exists_file: False) on a storage error, after logging why, and do so at
once when nothing listens at the server's address; configuration errors raise.
Where clearmlfs differs on purpose (the table in the README): a cached copy is checked against the server's
ETag before it is reused, concurrent processes download a URL once, a zero-byte object is a file, an archive
changed on the server is extracted anew, and a URL no credentials entry covers raises ConfigError.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlparse, urlunparse

from . import archive
from .backends import Backend, BackendPool, ObjectInfo
from .backends.base import deadline
from .cache import DEFAULT_CONTEXT, CacheContext, EntryState, entry_name
from .config import Settings, load_settings
from .errors import ClearmlfsError, ConfigError, InvalidURL, NotFound, StorageError, TimedOut, Transient
from .urls import StorageURL, parse_url

log = logging.getLogger(__name__)
T = TypeVar("T")

# The archives get_local_copy extracts, as the SDK: .tar is not among them.
EXTRACTED_SUFFIXES = (".zip", ".tgz", ".tar.gz")
ARCHIVE_FOLDER = "{0}_artifacts_archive_{1}"  # the SDK's CacheManager._default_context_folder_template
STREAM_CHUNK = 1024 * 1024  # get_stream's chunk when none is asked for
_UNLIMITED_NAME = 1 << 30  # (an archive folder is named after the cache file's unshortened name, as the SDK)


class UploadFailed(StorageError, ValueError):
    """An upload failed for good. A ValueError too, as the SDK's failed uploads are."""


class _Runtime:
    """Settings, backends and cache contexts, created on first use and shared by every call."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backends = BackendPool(settings)
        self.contexts: dict[str, CacheContext] = {}
        self.lock = threading.Lock()
        self.uploads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="clearmlfs-upload")
        # Metadata requests, so that a caller gets its answer within the budget even from a server that accepts
        # connections and never answers (the request itself ends later, at the client's timeouts).
        self.requests = ThreadPoolExecutor(max_workers=8, thread_name_prefix="clearmlfs-request")

    def context(self, name: str | None, file_limit: int | None = None) -> CacheContext:
        """The cache context `name` (``global`` by default), created on first use with `file_limit` entries (the
        configured count by default); a `file_limit` given later only raises its limit (the SDK's
        `CacheManager.get_cache_manager`)."""
        name = name or DEFAULT_CONTEXT
        with self.lock:
            if name not in self.contexts:
                self.contexts[name] = CacheContext(
                    self.settings.cache_dir, name, file_limit or self.settings.cache_file_limit,
                    min_free=self.settings.cache_min_free, fetch_concurrency=self.settings.s3.max_multipart_concurrency,
                    size_mode=self.settings.size_cache,
                )
            context = self.contexts[name]
        if file_limit:
            context.set_file_limit(file_limit)
        return context

    def close(self) -> None:
        self.uploads.shutdown(wait=True)
        self.requests.shutdown(wait=False)
        self.backends.close()


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _rt() -> _Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime(load_settings())
        return _runtime


def _locate(remote_url: str) -> tuple[StorageURL, Backend]:
    parsed = parse_url(remote_url)
    return parsed, _rt().backends.get(parsed)


def _answering() -> contextlib.AbstractContextManager[None]:
    """A metadata request as the API makes it: within the operation budget, a refused connection not retried."""
    return deadline(_rt().settings.timeouts.operation, retry_refused=False)


def _ask(request: Callable[[], T]) -> T:
    """One metadata request's answer, within the operation budget (TimedOut if none came)."""
    rt = _rt()
    budget = rt.settings.timeouts.operation

    def run() -> T:
        with deadline(budget, retry_refused=False):
            return request()

    future = rt.requests.submit(run)
    try:
        return future.result(timeout=budget)
    except concurrent.futures.TimeoutError:
        raise TimedOut(f"no answer from the server within {budget:g} s") from None


def _transferring() -> contextlib.AbstractContextManager[None]:
    """A transfer: retried as long as it makes progress, but a refused connection is an answer at once."""
    return deadline(None, retry_refused=False)


class StorageManager:
    """ClearML-compatible storage helpers (all classmethods, as in the SDK)."""

    @classmethod
    def configure(cls, config_file: str | os.PathLike[str] | None = None, settings: Settings | None = None) -> None:
        """Use this clearml.conf (or these settings) from now on; by default the file is found as ClearML does."""
        global _runtime
        new = _Runtime(settings or load_settings(config_file))
        with _runtime_lock:
            old, _runtime = _runtime, new
        if old is not None:
            old.close()

    @classmethod
    def settings(cls) -> Settings:
        """The settings in use (clearml.conf as found, or as given to `configure`)."""
        return _rt().settings

    # -- uploads ------------------------------------------------------------------------------------
    @classmethod
    def upload_file(
        cls, local_file: str, remote_url: str, wait_for_upload: bool = True, retries: int | None = None
    ) -> str:
        """Upload `local_file` to `remote_url`; returns the URL (an http(s) URL's path %-quoted, as the SDK's).

        A missing `local_file` raises FileNotFoundError; an upload that finally fails raises `UploadFailed`
        (a StorageError and, as in the SDK, a ValueError). Without `wait_for_upload` a failure is logged.
        """
        src = Path(local_file).expanduser()
        if not src.exists():
            raise FileNotFoundError(f"upload_file: no such file: {src}")
        parsed, backend = _locate(remote_url)
        if not wait_for_upload:
            future = _rt().uploads.submit(_upload_with_retries, backend, src, parsed, retries)
            future.add_done_callback(lambda f: _log_failed_upload(f, remote_url))
        else:
            _upload_with_retries(backend, src, parsed, retries)
        return _uploaded_url(remote_url)

    @classmethod
    def upload_folder(
        cls, local_folder: str, remote_url: str, match_wildcard: str | None = None, retries: int | None = None
    ) -> str | None:
        """Upload every file under `local_folder` (optionally matching `match_wildcard`) below `remote_url`.

        Returns `remote_url`, or None (logged) if `local_folder` is not a folder or some file failed to upload.
        """
        root = Path(local_folder).expanduser()
        if not root.is_dir():
            log.error("upload_folder: local folder %r does not exist", local_folder)
            return None
        parsed, backend = _locate(remote_url)
        base = parsed.key.rstrip("/")
        failed = 0
        files = sorted(p for p in root.rglob(match_wildcard or "*") if p.is_file())
        for path in files:
            rel = path.relative_to(root).as_posix()
            try:
                _upload_with_retries(backend, path, parsed.child(f"{base}/{rel}" if base else rel), retries)
            except (StorageError, OSError) as exc:
                log.error("upload_folder: %s failed: %s", path, exc)
                failed += 1
        if failed:
            log.error("upload_folder: failed uploading %d/%d files from %s", failed, len(files), local_folder)
            return None
        return remote_url

    # -- downloads ----------------------------------------------------------------------------------
    @classmethod
    def get_local_copy(
        cls,
        remote_url: str,
        cache_context: str | None = None,
        extract_archive: bool = True,
        name: str | None = None,
        force_download: bool = False,
    ) -> str | None:
        """A local path holding `remote_url`: the original file for direct access, else the cached copy.

        Archives (.zip, .tar.gz, .tgz) are extracted once into the cache and the folder is returned, unless
        `extract_archive` is False. None (logged) when the object cannot be read.
        """
        rt = _rt()
        context = rt.context(cache_context)
        direct = rt.settings.direct_path(remote_url)
        if direct is not None:
            if not os.path.isfile(direct):
                log.warning("get_local_copy: %s does not exist", remote_url)
                return None
            cached, fresh = Path(direct), False
        else:
            before = _identity(context.path_for(remote_url))
            fetched = _fetch(context, remote_url, force_download)
            if fetched is None:
                return None
            cached, fresh = fetched, _identity(fetched) != before
        if extract_archive and _extracted_suffix(cached.name):
            return str(_extract(context, remote_url, cached, name, fresh, in_cache=direct is None))
        return str(cached)

    @classmethod
    def get_stream(cls, remote_url: str, chunk_size: int | None = None) -> Iterator[bytes] | None:
        """The object's bytes, `chunk_size` at a time, read from the server (never from or into the cache).

        None (logged) if the object cannot be read; an error met later is raised by the iterator.
        """
        parsed, backend = _locate(remote_url)
        try:
            info = _ask(lambda: backend.stat(parsed.key))
        except StorageError as exc:
            log.warning("get_stream %s failed: %s", remote_url, exc)
            return None
        return _chunks(backend, info, chunk_size or STREAM_CHUNK)

    @classmethod
    def download_file(
        cls,
        remote_url: str,
        local_folder: str | None = None,
        overwrite: bool = False,
        skip_zero_size_check: bool = False,
        silence_errors: bool = False,
    ) -> str | None:
        """Download to ``<local_folder>/<key>`` (the cache folder by default); returns the path or None."""
        parsed, backend = _locate(remote_url)
        folder = Path(local_folder or _rt().context(None).folder).expanduser().absolute()
        try:
            dest = _inside(folder, parsed.key)
            if dest.is_file() and dest.stat().st_size and not overwrite:
                return str(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(f"{dest.name}.partially")
            with _transferring():
                info = backend.download(parsed.key, partial)
            if info.size == 0 and not skip_zero_size_check:
                partial.unlink(missing_ok=True)
                raise StorageError(f"{remote_url}: downloaded a 0-sized file")
            os.replace(partial, dest)
            return str(dest)
        except (StorageError, InvalidURL, OSError) as exc:
            if not silence_errors:
                log.warning("download_file %s failed: %s", remote_url, exc)
            return None

    @classmethod
    def download_folder(
        cls,
        remote_url: str,
        local_folder: str | None = None,
        match_wildcard: str | None = None,
        overwrite: bool = False,
        skip_zero_size_check: bool = False,
        silence_errors: bool = False,
        max_workers: int | None = None,
    ) -> str | None:
        """Download every object under `remote_url` into `local_folder` keeping their keys as paths.

        Returns the folder (created if need be, even when nothing is found), None if it cannot be created;
        a listing that fails raises, as in the SDK.
        """
        if local_folder:
            try:
                Path(local_folder).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.error("download_folder: failed creating local folder %r: %s", local_folder, exc)
                return None
            folder = local_folder
        else:
            folder = str(_rt().context(None).folder)
        parsed, backend = _locate(remote_url)
        with _answering():
            found = _objects(backend, parsed.key)
        urls = [
            parsed.child(info.key).url
            for info in found
            if not match_wildcard or fnmatch.fnmatch(parsed.child(info.key).url, match_wildcard)
        ]

        def one(url: str) -> str | None:
            return cls.download_file(url, folder, overwrite, skip_zero_size_check, silence_errors)

        with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
            list(pool.map(one, urls))
        if not urls and not silence_errors:
            log.warning("Did not download any files matching %s", remote_url)
        return folder

    # -- cache --------------------------------------------------------------------------------------
    @classmethod
    def set_cache_file_limit(cls, cache_file_limit: int, cache_context: str | None = None) -> int:
        """The number of entries `cache_context` keeps: a context not used yet starts at `cache_file_limit`,
        one in use is only ever raised (as in ClearML). Returns the limit in force."""
        limit = _rt().context(cache_context, int(cache_file_limit)).file_limit
        assert limit is not None  # (the API's contexts count entries, as the SDK's do)
        return limit

    # -- metadata -----------------------------------------------------------------------------------
    @classmethod
    def list(
        cls, remote_url: str, return_full_path: bool = False, with_metadata: bool = False, read_hash: bool = False
    ) -> list[str] | list[dict[str, Any]] | None:
        """Names of every object whose key starts with `remote_url`'s path (or ``{"size", "name"}`` dicts).

        Names are relative to the bucket, or for file:// URLs to `remote_url`'s folder (None if it is not a folder),
        as in the SDK. With `read_hash` too, each dict has the ``hash`` the SDK stored with the object, if any
        (an S3 listing shows no metadata: each object is asked, as the SDK asks).
        """
        parsed, backend = _locate(remote_url)
        try:
            if parsed.scheme == "file" and not os.path.isdir(parsed.key):
                raise NotFound(f"{remote_url}: not a folder")  # (the SDK lists a folder's tree, nothing else)
            with _answering():
                infos = _objects(backend, parsed.key)
        except StorageError as exc:
            log.warning("Can not list files for %r - %s", remote_url, exc)
            return None
        names = [_listed_name(remote_url, parsed, info, return_full_path) for info in infos]
        if not with_metadata:
            return names
        if read_hash:
            infos = [_with_hash(backend, info) for info in infos]
        return [_as_metadata(info, name, read_hash) for info, name in zip(infos, names, strict=True)]

    @classmethod
    def exists_file(cls, remote_url: str) -> bool:
        """Whether `remote_url` is an object (False for a folder, and when the server cannot be asked or the URL
        is not one; a URL clearml.conf gives no access to raises ConfigError)."""
        if remote_url.endswith("/"):
            return False
        try:
            parsed, backend = _locate(remote_url)
            _ask(lambda: backend.stat(parsed.key))
            return True
        except NotFound:
            return False
        except ConfigError:
            raise
        except ClearmlfsError as exc:
            log.warning("exists_file %s: %s", remote_url, exc)
            return False

    @classmethod
    def get_file_size_bytes(cls, remote_url: str, silence_errors: bool = False) -> int | None:
        """The object's size, None (logged unless `silence_errors`) if it cannot be read."""
        parsed, backend = _locate(remote_url)
        try:
            return _ask(lambda: backend.stat(parsed.key)).size
        except StorageError as exc:
            if not silence_errors:
                log.warning("get_file_size_bytes %s failed: %s", remote_url, exc)
            return None

    @classmethod
    def get_metadata(
        cls, remote_url: str, return_full_path: bool = False, read_hash: bool = False
    ) -> dict[str, Any] | None:
        """``{"size", "name"}`` of one object, or None (logged) if it cannot be read; with `read_hash`, also the
        ``hash`` the SDK stored with the object (its ``sha256`` metadata), if it has one.
        """
        parsed, backend = _locate(remote_url)
        try:
            info = _ask(lambda: backend.stat(parsed.key))
        except StorageError as exc:
            log.warning("get_metadata %s failed: %s", remote_url, exc)
            return None
        return _as_metadata(info, parsed.child(info.key).url if return_full_path else info.key, read_hash)

    # -- ClearML server and progress reports --------------------------------------------------------------
    @classmethod
    def get_files_server(cls) -> str:
        """The ClearML fileserver's address, as the SDK finds it (api.files_server, else derived from the web or
        api server's); ValueError, as in the SDK, if it cannot be told."""
        from .backends.http import files_server_host

        try:
            return files_server_host(_rt().settings.api)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def set_report_upload_chunk_size(cls, chunk_size_mb: int) -> None:
        """Accepted for the SDK's API, and without effect: clearmlfs logs no upload progress reports."""

    @classmethod
    def set_report_download_chunk_size(cls, chunk_size_mb: int) -> None:
        """Accepted for the SDK's API, and without effect: clearmlfs logs no download progress reports."""


# -- helpers ----------------------------------------------------------------------------------------


def _fetch(context: CacheContext, remote_url: str, force: bool) -> Path | None:
    """The current cached copy of `remote_url` (downloaded once if missing or changed), None on failure."""
    parsed, backend = _locate(remote_url)
    try:
        info = _ask(lambda: backend.stat(parsed.key))
    except (Transient, TimedOut) as exc:
        stale = context.lookup(remote_url)
        if stale is not None and not force:
            log.warning("%s: server unreachable (%s); using the cached copy", remote_url, exc)
            return stale
        log.warning("get_local_copy %s failed: %s", remote_url, exc)
        return None
    except StorageError as exc:
        log.warning("get_local_copy %s failed: %s", remote_url, exc)
        return None
    try:
        with _transferring():
            return context.fetch(remote_url, backend, parsed.key, info, force=force)
    except StorageError as exc:
        log.warning("get_local_copy %s failed: %s", remote_url, exc)
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file `path` is now (a download replaces the file, so a new one is a new download)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _extracted_suffix(name: str) -> str | None:
    """The suffix by which the SDK extracts a file called `name`, if it does."""
    lower = name.lower()
    return next((suffix for suffix in EXTRACTED_SUFFIXES if lower.endswith(suffix)), None)


def archive_folder(context: CacheContext, remote_url: str, cached: Path, name: str | None) -> Path:
    """Where the SDK extracts `remote_url`'s archive: ``<md5(url)>.<basename without suffix>_artifacts_archive_
    <name, %-quoted>`` in the context's folder, the basename never shortened (the SDK's `_extract_to_cache`)."""
    suffix = _extracted_suffix(cached.name) or ""
    if context.size_mode is not None:  # the SDK's size-aware cache: next to the copy, always named "cache"
        folder, name = cached.parent, "cache"
    else:
        folder = context.folder
    entry = entry_name(remote_url, _UNLIMITED_NAME)
    return folder / ARCHIVE_FOLDER.format(entry[: len(entry) - len(suffix)], quote(name, safe=" ") if name else name)


def _extract(
    context: CacheContext, remote_url: str, archive_path: Path, name: str | None, fresh: bool, in_cache: bool
) -> Path:
    """The archive's extraction folder, extracted once; the archive itself if it cannot be extracted (logged).

    A folder already there is reused, as the SDK does, unless this call downloaded a new copy of the archive
    that the folder was not extracted from (the archive changed on the server): that one is extracted anew.
    """
    target = archive_folder(context, remote_url, archive_path, name)
    state = context.state(remote_url) or EntryState(remote_url)
    if target.is_dir() and fresh and state.extracted != state.etag:
        shutil.rmtree(target, ignore_errors=True)
    try:
        # (the cached copy is pinned while read; a file read in place is not the cache's to pin)
        with context.pin(archive_path) if in_cache else contextlib.nullcontext():
            archive.extract_once(archive_path, target)
    except StorageError as exc:
        log.warning("get_local_copy %s: cannot extract %s: %s", remote_url, archive_path.name, exc)
        return archive_path
    if state.extracted != state.etag:
        state.extracted = state.etag
        context.save_state(state)
    return target


def _chunks(backend: Backend, info: ObjectInfo, chunk: int) -> Iterator[bytes]:
    # Each read is pinned to the version first seen: an object replaced meanwhile fails the stream, never mixes.
    # (The deadline is the thread's: it must not be held across a yield, into the consumer's code.)
    for start in range(0, info.size, chunk):
        with _transferring():
            data = backend.read(info.key, start, min(chunk, info.size - start), info.etag)
        yield data


def _upload_with_retries(backend: Backend, src: Path, target: StorageURL, retries: int | None) -> ObjectInfo:
    """Upload, with `retries` (ClearML's argument) whole attempts on top of the backend's own retries."""
    if not src.is_file():
        raise UploadFailed(f"upload to {target.url} failed: {src} is not a file")
    attempts = max(1, retries or 1)
    for attempt in range(1, attempts + 1):
        try:
            with _transferring():
                return backend.upload(src, target.key)
        except Transient as exc:
            if attempt == attempts:
                raise UploadFailed(f"upload to {target.url} failed: {exc}") from exc
        except StorageError as exc:
            raise UploadFailed(f"upload to {target.url} failed: {exc}") from exc
    raise AssertionError("unreachable")


def _uploaded_url(remote_url: str) -> str:
    """The URL upload_file returns, as the SDK's: for http(s), with its path %-quoted (a link to the file)."""
    parsed = urlparse(remote_url)
    if parsed.scheme not in ("http", "https"):
        return remote_url
    return urlunparse(parsed._replace(path=quote(parsed.path)))


def _log_failed_upload(future: Future[ObjectInfo], remote_url: str) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("upload to %s failed: %s", remote_url, exc)


def _objects(backend: Backend, prefix: str) -> list[ObjectInfo]:
    return [e for e in backend.list(prefix, delimiter=None) if isinstance(e, ObjectInfo)]


def _as_metadata(info: ObjectInfo, name: str, read_hash: bool) -> dict[str, Any]:
    """An object's metadata dict, as the SDK's get_object_metadata makes it."""
    found: dict[str, Any] = {"size": info.size, "name": name}
    if read_hash and info.sha256:
        found["hash"] = info.sha256
    return found


def _with_hash(backend: Backend, info: ObjectInfo) -> ObjectInfo:
    """`info` with the hash its object's metadata holds, asked of the server when the listing could not say it
    (as the SDK asks; no hash, as in the SDK, if the object cannot be asked)."""
    if info.attrs_known:
        return info
    try:
        return dataclasses.replace(info, sha256=_ask(lambda: backend.stat(info.key)).sha256)
    except StorageError as exc:
        log.warning("list: cannot read the metadata of %s: %s", info.key, exc)
        return info


def _listed_name(remote_url: str, parsed: StorageURL, info: ObjectInfo, full: bool) -> str:
    """An object's name in a listing, as the SDK gives it: its key (file:// URLs: its path below `remote_url`),
    or its whole URL."""
    if parsed.scheme != "file":
        return parsed.child(info.key).url if full else info.key
    relative = os.path.relpath(info.key, parsed.key.rstrip("/") or "/")
    return f"{remote_url.rstrip('/')}/{relative}" if full else relative


def _inside(folder: Path, relative: str) -> Path:
    """`folder/relative`, refusing any key that would resolve outside `folder` (``..``, absolute)."""
    target = (folder / relative.lstrip("/")).resolve()
    if target != folder.resolve() and folder.resolve() not in target.parents:
        raise InvalidURL(f"object key {relative!r} would be written outside {folder}")
    return target
