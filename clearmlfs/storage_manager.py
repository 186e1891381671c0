"""`StorageManager`: ClearML's Python API over clearmlfs's backends and managed cache.

Signatures follow ``clearml.StorageManager`` so code written for the SDK works
with ``from clearmlfs import StorageManager``. Like the SDK, read helpers return
None on a storage error (after logging why); configuration errors raise.
Unlike the SDK, a cached copy is checked against the server's ETag before it is
reused, and concurrent processes download a URL once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import archive
from .backends import Backend, BackendPool, ObjectInfo
from .cache import DEFAULT_CONTEXT, CacheContext, EntryState
from .config import Settings, load_settings
from .errors import InvalidURL, NotFound, StorageError, Transient
from .urls import StorageURL, parse_url

log = logging.getLogger(__name__)


class _Runtime:
    """Settings, backends and cache contexts, created on first use and shared by every call."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backends = BackendPool(settings)
        self.contexts: dict[str, CacheContext] = {}
        self.lock = threading.Lock()
        self.uploads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="clearmlfs-upload")

    def context(self, name: str | None) -> CacheContext:
        name = name or DEFAULT_CONTEXT
        with self.lock:
            if name not in self.contexts:
                self.contexts[name] = CacheContext(
                    self.settings.cache_dir, name, self.settings.cache_file_limit,
                    min_free=self.settings.cache_min_free, fetch_concurrency=self.settings.s3.max_multipart_concurrency,
                )
            return self.contexts[name]

    def close(self) -> None:
        self.uploads.shutdown(wait=True)
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
        """Upload `local_file` to `remote_url`; returns the URL. Raises StorageError when it finally fails."""
        src = Path(local_file).expanduser()
        if not src.is_file():
            raise FileNotFoundError(f"upload_file: {src} is not a file")
        parsed, backend = _locate(remote_url)
        if not wait_for_upload:
            future = _rt().uploads.submit(_upload_with_retries, backend, src, parsed.key, retries)
            future.add_done_callback(lambda f: _log_failed_upload(f, remote_url))
            return remote_url
        _upload_with_retries(backend, src, parsed.key, retries)
        return remote_url

    @classmethod
    def upload_folder(
        cls, local_folder: str, remote_url: str, match_wildcard: str | None = None, retries: int | None = None
    ) -> str:
        """Upload every file under `local_folder` (optionally matching `match_wildcard`) below `remote_url`."""
        root = Path(local_folder).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"upload_folder: {root} is not a folder")
        parsed, backend = _locate(remote_url)
        base = parsed.key.rstrip("/")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if match_wildcard and not fnmatch.fnmatch(str(path), match_wildcard):
                continue
            rel = path.relative_to(root).as_posix()
            _upload_with_retries(backend, path, f"{base}/{rel}" if base else rel, retries)
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

        Archives (.zip, .tar, .tar.gz, .tgz) are extracted once into the cache and the folder is
        returned, unless `extract_archive` is False.
        """
        rt = _rt()
        context = rt.context(cache_context)
        direct = rt.settings.direct_path(remote_url)
        if direct is not None:
            if not os.path.exists(direct):
                log.warning("get_local_copy: %s does not exist", remote_url)
                return None
            cached = Path(direct)
        else:
            fetched = _fetch(context, remote_url, force_download)
            if fetched is None:
                return None
            cached = fetched
        if extract_archive and archive.archive_suffix(cached.name) and cached.is_file():
            return str(_extract(context, remote_url, cached, name))
        return str(cached)

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
        """Download every object under `remote_url` into `local_folder` keeping their keys as paths."""
        parsed, backend = _locate(remote_url)
        folder = str(Path(local_folder or _rt().context(None).folder).expanduser().absolute())
        urls = [
            parsed.child(info.key).url
            for info in _objects(backend, parsed.key)
            if not match_wildcard or fnmatch.fnmatch(parsed.child(info.key).url, match_wildcard)
        ]
        def one(url: str) -> str | None:
            return cls.download_file(url, folder, overwrite, skip_zero_size_check, silence_errors)

        with ThreadPoolExecutor(max_workers=max_workers or 8) as pool:
            list(pool.map(one, urls))
        if not urls and not silence_errors:
            log.warning("download_folder: nothing found under %s", remote_url)
        return folder

    # -- cache --------------------------------------------------------------------------------------
    @classmethod
    def set_cache_file_limit(cls, cache_file_limit: int, cache_context: str | None = None) -> int:
        """Raise the number of entries the cache context keeps (never lowers it, as in ClearML)."""
        return _rt().context(cache_context).set_file_limit(cache_file_limit)

    # -- metadata -----------------------------------------------------------------------------------
    @classmethod
    def list(
        cls, remote_url: str, return_full_path: bool = False, with_metadata: bool = False
    ) -> list[str] | list[dict[str, Any]] | None:
        """Keys of every object whose key starts with `remote_url`'s path (or their metadata dicts)."""
        parsed, backend = _locate(remote_url)
        try:
            infos = list(_objects(backend, parsed.key))
        except StorageError as exc:
            log.warning("Can not list files for %r - %s", remote_url, exc)
            return None
        if with_metadata:
            return [_metadata(parsed, i, return_full_path) for i in infos]
        return [parsed.child(i.key).url if return_full_path else i.key for i in infos]

    @classmethod
    def exists_file(cls, remote_url: str) -> bool:
        parsed, backend = _locate(remote_url)
        try:
            backend.stat(parsed.key)
            return True
        except NotFound:
            return False

    @classmethod
    def get_file_size_bytes(cls, remote_url: str, silence_errors: bool = False) -> int | None:
        meta = cls.get_metadata(remote_url, silence_errors=silence_errors)
        return None if meta is None else int(meta["size"])

    @classmethod
    def get_metadata(
        cls, remote_url: str, return_full_path: bool = False, silence_errors: bool = False
    ) -> dict[str, Any] | None:
        """``{"name", "size", "etag", "last_modified"}`` of one object, or None if it cannot be read."""
        parsed, backend = _locate(remote_url)
        try:
            return _metadata(parsed, backend.stat(parsed.key), return_full_path)
        except StorageError as exc:
            if not silence_errors:
                log.warning("get_metadata %s failed: %s", remote_url, exc)
            return None


# -- helpers ----------------------------------------------------------------------------------------


def _fetch(context: CacheContext, remote_url: str, force: bool) -> Path | None:
    """The current cached copy of `remote_url` (downloaded once if missing or changed), None on failure."""
    parsed, backend = _locate(remote_url)
    try:
        info = backend.stat(parsed.key)
    except Transient as exc:
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
        return context.fetch(remote_url, backend, parsed.key, info, force=force)
    except StorageError as exc:
        log.warning("get_local_copy %s failed: %s", remote_url, exc)
        return None


def _extract(context: CacheContext, remote_url: str, archive_path: Path, name: str | None) -> Path:
    """Extract an archive into the SDK's ``<entry-without-suffix>_artifacts_archive_<name>`` folder, once."""
    entry = context.path_for(remote_url).name
    suffix = archive.archive_suffix(entry) or ""
    target = context.folder / f"{entry[: len(entry) - len(suffix)]}_artifacts_archive_{name}"
    state = context.state(remote_url) or EntryState(remote_url)
    if target.is_dir() and state.extracted != state.etag:
        shutil.rmtree(target, ignore_errors=True)  # the archive changed on the server since
    with context.pin(archive_path) if archive_path.parent == context.folder else contextlib.nullcontext():
        archive.extract_once(archive_path, target)
    if state.extracted != state.etag:
        state.extracted = state.etag
        context.save_state(state)
    return target


def _upload_with_retries(backend: Backend, src: Path, key: str, retries: int | None) -> ObjectInfo:
    # The backend already retries transient failures; `retries` (ClearML's argument) adds whole attempts.
    attempts = max(1, retries or 1)
    for attempt in range(1, attempts + 1):
        try:
            return backend.upload(src, key)
        except Transient:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _log_failed_upload(future: Future[ObjectInfo], remote_url: str) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("upload to %s failed: %s", remote_url, exc)


def _objects(backend: Backend, prefix: str) -> list[ObjectInfo]:
    return [e for e in backend.list(prefix, delimiter=None) if isinstance(e, ObjectInfo)]


def _metadata(parsed: StorageURL, info: ObjectInfo, full: bool) -> dict[str, Any]:
    return {
        "name": parsed.child(info.key).url if full else info.key,
        "size": info.size,
        "etag": info.etag,
        "last_modified": info.mtime,
    }


def _inside(folder: Path, relative: str) -> Path:
    """`folder/relative`, refusing any key that would resolve outside `folder` (``..``, absolute)."""
    target = (folder / relative.lstrip("/")).resolve()
    if target != folder.resolve() and folder.resolve() not in target.parents:
        raise InvalidURL(f"object key {relative!r} would be written outside {folder}")
    return target
