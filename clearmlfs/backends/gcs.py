"""Google Cloud Storage: one bucket, through google-cloud-storage.

Large files go through the SDK's transfer manager (sliced parallel download, XML multipart upload);
every request carries an explicit `google.api_core` retry, and `retry` covers what it lets through.
With STORAGE_EMULATOR_HOST set the client talks to an emulator with anonymous credentials.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import google.auth.exceptions
import requests
from google.api_core import exceptions as api
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage import transfer_manager
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from ..config import DEFAULT_TIMEOUTS, GCSBucket, Timeouts
from ..errors import (
    AccessDenied,
    AlreadyExists,
    Changed,
    ClearmlfsError,
    ConfigError,
    NotFound,
    Rejected,
    StorageError,
    Transient,
    Unsupported,
)
from ..urls import parse_url
from .base import (
    TRANSPORT_FAILURES,
    Attrs,
    Backend,
    ObjectInfo,
    Prefix,
    Progress,
    attrs_metadata,
    content_type,
    local_error,
    log_request,
    metadata_attrs,
    metadata_sha256,
    paged,
    request_log,
    retry,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 8 * 1024 * 1024  # resumable-upload chunk and transfer-manager slice; a multiple of 256 KiB
PARALLEL_THRESHOLD = 32 * 1024 * 1024  # below this one stream is as fast and costs fewer requests
GCS_CONTENT_TYPE = "application/octet-stream"  # the client library's (and so the SDK's) when a name tells nothing
# The SDK's default retry gives up after 120 s; `retry` repeats a failed call up to 5 times, so keep each
# budget short enough that a stuck read surfaces as EIO within minutes, not a quarter of an hour.
_RETRY = DEFAULT_RETRY.with_timeout(30.0)

_CAUGHT: tuple[type[BaseException], ...] = (
    api.GoogleAPIError,
    google.auth.exceptions.GoogleAuthError,
    InvalidResponse,
    DataCorruption,
    requests.RequestException,
    *TRANSPORT_FAILURES,
    OSError,
)
# Connection refused/reset, timeouts, short bodies, a checksum mismatch on download, as the SDK wraps them.
_TRANSPORT_FAILURES: tuple[type[BaseException], ...] = (
    api.RetryError,
    google.auth.exceptions.TransportError,
    DataCorruption,
    *TRANSPORT_FAILURES,
)

# One page of a listing (a module-level alias: inside the classes `list` names the method).
_Page = list[ObjectInfo | Prefix]


class GCSBackend(Backend):
    """One GCS bucket."""

    def __init__(
        self, cfg: GCSBucket, bucket: str, *, max_concurrency: int = 8, page_size: int | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.url_prefix = f"gs://{bucket}"
        # Not here: a bucket that keeps old versions serves a pinned generation after it is overwritten.
        self.pinned_read_is_current = False
        self._concurrency = max(1, max_concurrency)
        self._page_size = page_size  # None: the service default (1000)
        # (connect, read) for every request: the SDK's default waits 60 s for each.
        self._timeout = (timeouts.connect, timeouts.read)
        self._client = _client(cfg, self._concurrency)
        self._bucket = self._client.bucket(bucket)
        self._xml_multipart = True  # cleared once the server refuses XML multipart uploads (emulators)

    # -- Backend ----------------------------------------------------------------------------------
    @retry()
    def stat(self, key: str) -> ObjectInfo:
        return _info(self._existing(key))

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        return paged(lambda token: self._page(prefix, delimiter, token))

    @retry()
    def read(self, key: str, start: int = 0, length: int | None = None, etag: str | None = None) -> bytes:
        if length == 0:
            return b""  # end = start - 1 would mean "to the end" to the SDK
        end = None if length is None else start + length - 1  # the SDK's end is inclusive
        # Our ETag is the generation: reading that generation can never mix two versions.
        generation = int(etag) if etag and etag.isdigit() else None
        try:
            blob = self._bucket.blob(key, generation=generation)
            data: bytes = blob.download_as_bytes(
                start=start, end=end, if_generation_match=generation, retry=_RETRY, timeout=self._timeout
            )
            return data
        except api.RequestRangeNotSatisfiable:
            return b""  # start at or past the end
        except api.PreconditionFailed:
            raise Changed(f"{self._url(key)}: changed on the server while being read") from None
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None

    @retry()
    def download(self, key: str, dest: Path) -> ObjectInfo:
        blob = self._existing(key)  # pins the generation: every slice reads the same version
        # Taken before the transfer, which overwrites the metadata from response headers (and an emulator
        # that omits x-goog-generation would leave generation None).
        info = _info(blob)
        try:
            if (blob.size or 0) >= PARALLEL_THRESHOLD:
                transfer_manager.download_chunks_concurrently(
                    blob,
                    str(dest),
                    chunk_size=CHUNK_SIZE,
                    download_kwargs={"retry": _RETRY, "timeout": self._timeout},
                    worker_type=transfer_manager.THREAD,
                    max_workers=self._concurrency,
                    crc32c_checksum=True,
                )
            else:
                blob.download_to_filename(str(dest), retry=_RETRY, timeout=self._timeout)
        except api.NotFound:
            # The generation we pinned vanished: the object was overwritten or deleted mid-download.
            raise Transient(f"{self._url(key)}: changed during download") from None
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None
        return info

    @retry()
    def upload(self, src: Path, key: str, progress: Progress | None = None, attrs: Attrs | None = None) -> ObjectInfo:
        size = src.stat().st_size  # a missing source is the caller's OSError, not a storage error
        blob = self._bucket.blob(key, chunk_size=CHUNK_SIZE if size > CHUNK_SIZE else None)
        # Guessed from the object's name, as the SDK's S3 and Azure uploads do (its GCS uploads guess from the
        # local file's name, which for a file written through the mount tells nothing).
        blob.content_type = content_type(key, GCS_CONTENT_TYPE)
        meta = None if attrs is None else attrs_metadata(attrs)
        if meta is not None:  # sent with the object resource (x-goog-meta- headers on the XML multipart path)
            blob.metadata = meta
        try:
            if size >= PARALLEL_THRESHOLD and self._upload_parallel(src, blob):
                # The transfer manager does not fill in the new metadata.
                blob.reload(retry=_RETRY, timeout=self._timeout)
            else:
                # An explicit retry: by default the SDK retries uploads only with if_generation_match, but
                # rewriting the whole object under a fixed name is idempotent.
                blob.upload_from_filename(str(src), retry=_RETRY, timeout=self._timeout)
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None
        return _info(blob)

    @retry()
    def delete(self, key: str) -> None:
        try:
            self._bucket.blob(key).delete(retry=_RETRY, timeout=self._timeout)
        except api.NotFound:
            pass  # already gone (or a retried delete that had succeeded)
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None

    @retry()
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        try:
            copied = self._bucket.copy_blob(
                self._bucket.blob(src_key), self._bucket, dst_key, retry=_RETRY, timeout=self._timeout
            )
        except _CAUGHT as exc:
            raise _translate(exc, self._url(src_key)) from None
        return _info(copied)

    @retry()
    def set_attrs(self, key: str, attrs: Attrs) -> ObjectInfo:
        blob = self._existing(key)
        blob.metadata = _with_attrs(blob.metadata, attrs)
        try:
            # Only onto the generation and metadata read: a writer's change meanwhile fails it (404: that
            # generation is gone; 412), and it is done again from a fresh read.
            blob.patch(if_metageneration_match=blob.metageneration, retry=_RETRY, timeout=self._timeout)
        except (api.NotFound, api.PreconditionFailed):
            raise Transient(f"{self._url(key)}: changed while its metadata was being set") from None
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None
        return _info(blob)

    def close(self) -> None:
        self._client.close()

    # -- helpers ----------------------------------------------------------------------------------
    def _existing(self, key: str) -> storage.Blob:
        try:
            blob = self._bucket.get_blob(key, retry=_RETRY, timeout=self._timeout)
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None
        if blob is None:
            raise NotFound(f"{self._url(key)}: not found")
        return blob

    def _upload_parallel(self, src: Path, blob: storage.Blob) -> bool:
        """XML multipart upload of `src`; False when the server does not offer it (nothing was stored)."""
        if not self._xml_multipart:
            return False
        try:
            transfer_manager.upload_chunks_concurrently(
                str(src),
                blob,
                chunk_size=CHUNK_SIZE,
                worker_type=transfer_manager.THREAD,
                max_workers=self._concurrency,
                retry=_RETRY,
                timeout=self._timeout,
            )
        except InvalidResponse as exc:
            if _status(exc) != 501:
                raise
            # gcp-storage-emulator (and fake-gcs-server) answer the multipart initiate with 501.
            log.info("%s: server refuses XML multipart uploads; using resumable uploads", self.url_prefix)
            self._xml_multipart = False
            return False
        return True

    @retry()
    def _page(self, prefix: str, delimiter: str | None, token: str | None) -> tuple[_Page, str | None]:
        """One page of a listing and the token of the next (None after the last)."""
        try:
            iterator = self._client.list_blobs(
                self._bucket,
                prefix=prefix or None,
                delimiter=delimiter,
                page_size=self._page_size,
                page_token=token,
                retry=_RETRY,
                timeout=self._timeout,
            )
            page = next(iterator.pages, None)
            if page is None:
                return [], None
            # Common prefixes arrive with each page (page.prefixes), not only once the iterator is drained.
            entries: _Page = [_info(blob) for blob in page]
            entries += [Prefix(p) for p in sorted(page.prefixes)]
            return entries, iterator.next_page_token
        except _CAUGHT as exc:
            raise _translate(exc, self._url(prefix)) from None

    def _url(self, key: str) -> str:
        return f"{self.url_prefix}/{key}" if key else self.url_prefix


def _client(cfg: GCSBucket, concurrency: int) -> storage.Client:
    client = _bare_client(cfg)
    # The client's requests session is a private attribute (google.cloud.client.Client._http): if it moves,
    # the SDK's own session stays as it is (10 pooled connections; no request log).
    try:
        session = client._http
    except AttributeError as exc:
        log.debug("GCS client without a requests session: %s", exc)
        return client
    # requests keeps 10 connections per host by default; parallel slices beyond that would reconnect.
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max(10, concurrency + 2))
    for scheme in ("https://", "http://"):
        session.mount(scheme, adapter)
    if request_log.isEnabledFor(logging.DEBUG):
        session.hooks["response"].append(_response_received)
    return client


def _response_received(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    request = response.request
    log_request(
        str(request.method), response.url, response.status_code, response.headers.get("Content-Length"),
        response.elapsed.total_seconds(), str(request.headers.get("Range", "")),
    )


def _bare_client(cfg: GCSBucket) -> storage.Client:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # Emulators accept any request; anonymous credentials avoid looking for real ones.
        return storage.Client(project=cfg.project or "clearmlfs", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    if cfg.credentials_json:
        creds = _service_account(cfg)
        return storage.Client(project=cfg.project or creds.project_id, credentials=creds)
    try:
        return storage.Client(project=cfg.project or None)
    except google.auth.exceptions.DefaultCredentialsError:
        raise ConfigError(
            "no Google credentials: set credentials_json in clearml.conf, GOOGLE_APPLICATION_CREDENTIALS, "
            "or run `gcloud auth application-default login`"
        ) from None


def _service_account(cfg: GCSBucket) -> Any:
    """`credentials_json`'s service-account key: a file, or (as the SDK also takes it) the key's JSON itself.
    Errors never quote it: it holds a private key."""
    from google.oauth2 import service_account

    where = cfg.origin or "sdk.google.storage"
    if cfg.inline_json:
        try:
            info = json.loads(cfg.credentials_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}.credentials_json: the inline key is not valid JSON (line {exc.lineno}, "
                              f"column {exc.colno})") from None
        try:
            return service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{where}.credentials_json: the inline JSON is not a service-account key "
                              "(type, client_email, token_uri, private_key)") from None
    path = os.path.expanduser(cfg.credentials_json)
    try:
        return service_account.Credentials.from_service_account_file(path)  # type: ignore[no-untyped-call]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"cannot load Google service-account credentials from {path} ({where})") from None


def _info(blob: storage.Blob) -> ObjectInfo:
    mtime = blob.updated.timestamp() if blob.updated else 0.0
    meta = blob.metadata
    return ObjectInfo(
        blob.name, int(blob.size or 0), mtime, str(blob.generation), metadata_attrs(meta), sha256=metadata_sha256(meta)
    )


def _with_attrs(meta: Mapping[str, str] | None, attrs: Attrs) -> dict[str, str | None]:
    """`meta` with `attrs` stored in it, as a PATCH's metadata. A key that differs from ours only in case, which
    `metadata_attrs` might read instead of ours, is removed (None: GCS merges a patch's keys into the others)."""
    ours = attrs_metadata(attrs)
    gone = {k for k in meta or {} if k.lower() in ours and k not in ours}
    return {**{k: (None if k in gone else v) for k, v in (meta or {}).items()}, **ours}


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an SDK exception, when there is one."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _translate(exc: BaseException, url: str) -> ClearmlfsError:
    """Map a google-cloud-storage (or transport) exception to the project's errors."""
    status = _status(exc)
    reason = _reason(exc, status)
    if status == 404:
        return NotFound(f"{url}: not found ({reason})")
    if status in (401, 403) or isinstance(exc, google.auth.exceptions.RefreshError):
        return AccessDenied(f"{parse_url(url).root}: access denied ({reason}); check the credentials")
    if status == 409:
        return AlreadyExists(f"{url}: {reason}")
    if status == 501:
        return Unsupported(f"{url}: not supported by the server ({reason})")
    if status in (408, 429) or (status is not None and status >= 500):
        return Transient(f"{url}: {reason}")
    if isinstance(exc, _TRANSPORT_FAILURES):
        return Transient(f"{url}: {reason}")
    if isinstance(exc, OSError) and exc.errno is not None:
        return local_error(exc, url)
    if status is not None and 400 <= status < 500:
        return Rejected(f"{url}: {reason}")
    return StorageError(f"{url}: {reason}")


# Query strings (signed URLs) never belong in a message.
_SECRETS = re.compile(r"\?[^\s'\"]*")


def _reason(exc: BaseException, status: Any) -> str:
    lines = str(exc).strip().splitlines()
    first = _SECRETS.sub("", lines[0])[:200] if lines else ""
    return ", ".join([type(exc).__name__] + [str(p) for p in (status, first) if p])
