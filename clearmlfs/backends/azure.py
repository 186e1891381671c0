"""Azure Blob Storage: one container, through azure-storage-blob.

Transfers use the SDK's own parallel block upload / ranged download; the SDK's
retry policy covers single requests and `retry` covers what it lets through.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import requests
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobPrefix,
    BlobProperties,
    BlobServiceClient,
    ContentSettings,
)

from ..config import DEFAULT_TIMEOUTS, AzureContainer, Timeouts
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
    STREAM_PARTS_IN_MEMORY,
    TRANSPORT_FAILURES,
    Attrs,
    Backend,
    ObjectInfo,
    Prefix,
    Progress,
    Reader,
    ReaderAbandoned,
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

BLOCK_SIZE = 8 * 1024 * 1024  # block and ranged-GET size: fast, yet cheap to retry
MAX_BLOCKS = 50_000  # committed blocks per block blob
COPY_TIMEOUT = 30 * 60.0  # a server-side copy inside one account is fast; give large blobs room anyway

# What an SDK call can raise besides our own errors. Local file errors (OSError) are included so that a
# full disk mid-download or a reset socket surfaces in our vocabulary too.
_CAUGHT: tuple[type[BaseException], ...] = (
    AzureError,
    requests.RequestException,
    *TRANSPORT_FAILURES,
    OSError,
)

# Connection refused/reset, timeouts, short bodies (IncompleteRead), as azure-core wraps them.
_TRANSPORT_FAILURES: tuple[type[BaseException], ...] = (
    ServiceRequestError,
    ServiceResponseError,
    IncompleteReadError,
    *TRANSPORT_FAILURES,
)

# One page of a listing (a module-level alias: inside the classes `list` names the method).
_Page = list[ObjectInfo | Prefix]


class AzureBackend(Backend):
    """One Azure Blob container."""

    reports_progress = True
    stream_threshold = BLOCK_SIZE  # up to it, one Put Blob at close; beyond, blocks either way
    stream_limit = MAX_BLOCKS * BLOCK_SIZE

    def __init__(
        self, cfg: AzureContainer, container: str, *, max_concurrency: int = 8, page_size: int | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.url_prefix = f"azure://{cfg.account_name}.blob.core.windows.net/{container}"
        self._concurrency = max(1, max_concurrency)
        self._page_size = page_size  # None: the service default (5000)
        self._service = _service_client(cfg, timeouts)
        self._container = self._service.get_container_client(container)

    # -- Backend ----------------------------------------------------------------------------------
    @retry()
    def stat(self, key: str) -> ObjectInfo:
        try:
            return _info(self._blob(key).get_blob_properties())
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        return paged(lambda token: self._page(prefix, delimiter, token))

    @retry()
    def read(self, key: str, start: int = 0, length: int | None = None, etag: str | None = None) -> bytes:
        if length == 0:
            return b""  # the SDK would turn length 0 into an open-ended range
        pinned: dict[str, Any] = {"etag": f'"{etag}"', "match_condition": MatchConditions.IfNotModified} if etag else {}
        try:
            data: bytes = self._blob(key).download_blob(offset=start, length=length, **pinned).readall()
            return data
        except HttpResponseError as exc:
            if exc.status_code == 416:  # start at or past the end: nothing to read
                return b""
            if exc.status_code == 412 and etag:
                raise Changed(f"{self._url(key)}: changed on the server while being read") from None
            raise _translate(exc, self._url(key)) from None
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None

    @retry()
    def download(self, key: str, dest: Path) -> ObjectInfo:
        try:
            with open(dest, "wb") as out:
                # The downloader pins the ETag of its first response (If-Match on later ranges), so a blob
                # overwritten mid-download fails with 412 instead of producing a mixed file.
                stream = self._blob(key).download_blob(max_concurrency=self._concurrency)
                stream.readinto(out)
            return _info(stream.properties)
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None

    @retry()
    def upload(self, src: Path, key: str, progress: Progress | None = None, attrs: Attrs | None = None) -> ObjectInfo:
        hook = _hook(progress)
        meta = _metadata(attrs)
        with open(src, "rb") as data:  # a missing source is the caller's OSError, not a storage error
            size = os.fstat(data.fileno()).st_size
            blob = self._blob(key)
            try:
                try:
                    result = blob.upload_blob(
                        data, length=size, overwrite=True, max_concurrency=self._concurrency, metadata=meta,
                        content_settings=_content_settings(key), **hook,
                    )
                except HttpResponseError as exc:
                    if _code(exc) != "InvalidBlobOrBlock":
                        raise
                    # Blocks an earlier upload left uncommitted (a stopped stream's, another tool's) whose IDs
                    # are not as long as ours: Azure will not mix lengths in one blob. The SDK names a file's
                    # blocks in 12 characters and a stream's in 64; uploaded as a stream, ours match theirs.
                    data.seek(0)
                    result = blob.upload_blob(
                        cast(IO[bytes], _Unseekable(data)), length=size, overwrite=True,
                        max_concurrency=self._concurrency, metadata=meta, content_settings=_content_settings(key),
                        **hook,
                    )
            except _CAUGHT as exc:
                raise _translate(exc, self._url(key)) from None
        # An upload replaces the blob's metadata with `meta`: that is what it now stores.
        return ObjectInfo(key, size, result["last_modified"].timestamp(), _etag(result["etag"]), metadata_attrs(meta))

    def upload_stream(
        self, reader: Reader, key: str, progress: Progress | None = None, attrs: Attrs | None = None
    ) -> ObjectInfo:
        # Given no length, the SDK reads the stream a block at a time and stages up to `max_concurrency` blocks
        # at once, each held in memory until sent. If the reader raises, nothing is committed: the blob is as
        # it was, and the blocks staged meanwhile are discarded (`_discard_staged`).
        threads = max(1, min(self._concurrency, STREAM_PARTS_IN_MEMORY - 1))  # (and one block being read)
        blob = self._blob(key)
        try:
            before = self._stream_base(blob)
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None
        try:
            blob.upload_blob(
                cast(IO[bytes], reader), length=None, overwrite=True, max_concurrency=threads,
                metadata=_metadata(attrs), content_settings=_content_settings(key), **_hook(progress),
            )
        except _CAUGHT as exc:
            self._discard_staged(blob, before)
            raise _translate(exc, self._url(key)) from None
        except ReaderAbandoned as exc:
            self._discard_staged(blob, before)
            raise StorageError(f"{self._url(key)}: upload stopped: {_reason(exc, None, None)}") from None
        return self.stat(key)

    def _stream_base(self, blob: BlobClient) -> BlobProperties | None:
        """What a stream into `blob` starts from: None if the blob does not exist, else its properties.

        Refused (Unsupported: the file is uploaded whole at close) when the blob exists without a committed
        block list (written by one Put Blob): blocks staged into it could not be discarded again without
        rewriting its content.
        """
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError:
            return None
        if not blob.get_block_list("committed")[0]:
            raise Unsupported(f"{blob.blob_name}: written whole; uploaded whole again")
        return props

    def _discard_staged(self, blob: BlobClient, before: BlobProperties | None) -> None:
        """Drop the blocks an abandoned stream staged. Azure keeps uncommitted blocks until the blob's next
        commit or for a week; a commit of the blob's own block list (content, properties and metadata as they
        were; only if nobody changed the blob meanwhile) drops them, and so does deleting a blob that has
        nothing committed."""
        try:
            committed, uncommitted = blob.get_block_list("all")
            if not uncommitted:
                return
            if before is None:
                try:
                    blob.get_blob_properties()
                    return  # committed meanwhile (by another writer, or by us after all): not ours to drop
                except ResourceNotFoundError:
                    blob.delete_blob()
                return
            blob.commit_block_list(
                [BlobBlock(block_id=b.id) for b in committed], content_settings=before.content_settings,
                metadata=before.metadata, etag=before.etag, match_condition=MatchConditions.IfNotModified,
            )
        except _CAUGHT as exc:  # left for Azure to collect; the blob itself is as it was
            log.info("%s: staged blocks left for Azure to discard: %s", blob.blob_name, _reason(exc, None, None))

    @retry()
    def delete(self, key: str) -> None:
        try:
            self._blob(key).delete_blob()
        except ResourceNotFoundError as exc:
            if _code(exc) == "ContainerNotFound":
                raise _translate(exc, self._url(key)) from None  # a missing container is still an error
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None

    @retry()
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        dst = self._blob(dst_key)
        try:
            # Same account: the request's Shared Key also authorizes reading the source URL.
            started = dst.start_copy_from_url(self._blob(src_key).url)
        except _CAUGHT as exc:
            raise _translate(exc, self._url(src_key)) from None
        try:
            props = _wait_for_copy(
                dst, str(started["copy_status"]), str(started["copy_id"]), self._url(dst_key)
            )
            return _info(props)
        except _CAUGHT as exc:
            raise _translate(exc, self._url(dst_key)) from None

    @retry()
    def set_attrs(self, key: str, attrs: Attrs) -> ObjectInfo:
        blob = self._blob(key)
        try:
            props = blob.get_blob_properties()
            meta = _with_attrs(props.metadata, attrs)
            # Set Blob Metadata replaces all of it: only onto the version read, else a writer's metadata set
            # meanwhile would be lost (412, Transient: retried from a fresh read).
            result: dict[str, Any] = blob.set_blob_metadata(
                meta, etag=props.etag, match_condition=MatchConditions.IfNotModified
            )
        except _CAUGHT as exc:
            raise _translate(exc, self._url(key)) from None
        # The content is untouched, but Last-Modified and the ETag move with the metadata.
        return ObjectInfo(
            key, props.size, result["last_modified"].timestamp(), _etag(result["etag"]), metadata_attrs(meta),
            sha256=metadata_sha256(meta),
        )

    def close(self) -> None:
        self._service.close()

    # -- helpers ----------------------------------------------------------------------------------
    @retry()
    def _page(self, prefix: str, delimiter: str | None, token: str | None) -> tuple[_Page, str | None]:
        """One page of a listing and the token of the next (None after the last)."""
        # Listed with their metadata, so that every entry carries its attrs without a HEAD each.
        try:
            if delimiter:
                items: Any = self._container.walk_blobs(
                    name_starts_with=prefix or None, delimiter=delimiter, results_per_page=self._page_size,
                    include=["metadata"],
                )
            else:
                items = self._container.list_blobs(
                    name_starts_with=prefix or None, results_per_page=self._page_size, include=["metadata"]
                )
            pages = items.by_page(continuation_token=token)
            page: Any = next(pages, [])
            entries = [Prefix(e.name) if isinstance(e, BlobPrefix) else _info(e) for e in page]
            return entries, pages.continuation_token
        except _CAUGHT as exc:
            raise _translate(exc, self._url(prefix)) from None

    def _blob(self, key: str) -> BlobClient:
        return self._container.get_blob_client(key)

    def _url(self, key: str) -> str:
        return f"{self.url_prefix}/{key}" if key else self.url_prefix


def _service_client(cfg: AzureContainer, timeouts: Timeouts) -> BlobServiceClient:
    options: dict[str, Any] = {
        # The SDK waits 20 s to connect and 60 s for each read.
        "connection_timeout": timeouts.connect,
        "read_timeout": timeouts.read,
        # The SDK default (15 s first backoff, 3 retries) stalls a FUSE read for a minute; retry sooner.
        "retry_total": 3,
        "initial_backoff": 1,
        "increment_base": 2,
        "max_single_put_size": BLOCK_SIZE,
        "max_block_size": BLOCK_SIZE,
        "max_single_get_size": BLOCK_SIZE,
        "max_chunk_get_size": BLOCK_SIZE,
    }
    if request_log.isEnabledFor(logging.DEBUG):  # called once per attempt, after the SDK's retry policy
        options["raw_request_hook"] = _request_sent
        options["raw_response_hook"] = _response_received
    try:
        if cfg.connection_string:
            return BlobServiceClient.from_connection_string(cfg.connection_string, **options)
        credential = {"account_name": cfg.account_name, "account_key": cfg.account_key}
        return BlobServiceClient(account_url=cfg.account_url, credential=credential, **options)
    except ValueError:
        # The SDK's message may quote the connection string; name only the account.
        raise ConfigError(f"invalid Azure connection settings for account {cfg.account_name!r}") from None


def _hook(progress: Progress | None) -> dict[str, Any]:
    """upload_blob's keyword for a progress callback (called with the bytes sent so far, and the total)."""
    return {} if progress is None else {"progress_hook": lambda _current, _total: progress()}


def _request_sent(request: Any) -> None:
    request.context["clearmlfs_started"] = time.monotonic()


def _response_received(response: Any) -> None:
    request, http = response.http_request, response.http_response
    log_request(
        request.method, request.url, http.status_code, http.headers.get("Content-Length"),
        time.monotonic() - response.context.get("clearmlfs_started", time.monotonic()),
        request.headers.get("x-ms-range") or request.headers.get("Range") or "",
    )


def _wait_for_copy(dst: BlobClient, status: str, copy_id: str, url: str) -> BlobProperties:
    """Poll a server-side copy until it settles; a copy still pending at the deadline is aborted."""
    deadline = time.monotonic() + COPY_TIMEOUT
    delay = 0.05
    props = dst.get_blob_properties()
    while status == "pending":
        if time.monotonic() > deadline:
            dst.abort_copy(copy_id)
            raise StorageError(f"{url}: server-side copy did not finish within {COPY_TIMEOUT:.0f}s")
        time.sleep(delay)
        delay = min(2.0, delay * 2)
        props = dst.get_blob_properties()
        status = props.copy.status or ""
    if status != "success":
        raise StorageError(f"{url}: server-side copy {status}: {props.copy.status_description}")
    return props


def _info(props: BlobProperties) -> ObjectInfo:
    return ObjectInfo(
        props.name, props.size, props.last_modified.timestamp(), _etag(props.etag), metadata_attrs(props.metadata),
        sha256=metadata_sha256(props.metadata),
    )


def _content_settings(key: str) -> ContentSettings:
    """An upload's content type, as the SDK's Azure uploads set it: guessed from the blob's name."""
    return ContentSettings(content_type=content_type(key))


def _metadata(attrs: Attrs | None) -> dict[str, str] | None:
    """upload_blob's `metadata` for `attrs` (None: none; an upload stores no metadata then)."""
    return None if attrs is None else attrs_metadata(attrs)


def _with_attrs(meta: Mapping[str, str] | None, attrs: Attrs) -> dict[str, str]:
    """`meta` with `attrs` stored in it. Azure's keys are case-insensitive: one that differs from ours only in
    case is replaced, not sent twice."""
    ours = attrs_metadata(attrs)
    return {**{k: v for k, v in (meta or {}).items() if k.lower() not in ours}, **ours}


def _etag(etag: str) -> str:
    return etag.strip('"')


def _translate(exc: BaseException, url: str) -> ClearmlfsError:
    """Map an Azure SDK (or transport) exception to the project's errors.

    Messages carry the status, the service's error code and the first line of its message, never the
    whole exception text: transport errors can quote request URLs, which may carry a SAS token.
    """
    status = getattr(exc, "status_code", None)
    code = _code(exc)
    reason = _reason(exc, status, code)
    if isinstance(exc, ResourceNotFoundError) or status == 404:
        return NotFound(f"{url}: not found ({reason})")
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
        return AccessDenied(f"{parse_url(url).root}: access denied ({reason}); check the account key or SAS")
    if isinstance(exc, ResourceExistsError) or status == 409:
        return AlreadyExists(f"{url}: {reason}")
    # 412 only arises from the SDK's own If-Match on later download ranges: the blob changed mid-read.
    if status in (408, 412, 429) or (isinstance(status, int) and status >= 500 and status not in (501, 505)):
        return Transient(f"{url}: {reason}")
    if isinstance(exc, _TRANSPORT_FAILURES):
        return Transient(f"{url}: {reason}")
    if isinstance(exc, OSError) and exc.errno is not None:
        return local_error(exc, url)
    if isinstance(status, int) and 400 <= status < 500:
        return Rejected(f"{url}: {reason}")
    return StorageError(f"{url}: {reason}")


# Query strings (a SAS token) and AccountKey=/SharedAccessSignature= pairs of a connection string.
_SECRETS = re.compile(r"\?[^\s'\"]*|(AccountKey|SharedAccessSignature|sig)=[^\s;&'\"]*", re.IGNORECASE)


def _code(exc: BaseException) -> str | None:
    """The service's error code ("BlobNotFound"), if the exception carries one."""
    code = getattr(exc, "error_code", None)
    return getattr(code, "value", code)  # the SDK gives a StorageErrorCode enum for known codes


class _Unseekable:
    """A file the SDK must read in order, as it reads a stream (and names the blocks it stages likewise)."""

    def __init__(self, file: BinaryIO) -> None:
        self.read = file.read

    def seekable(self) -> bool:
        return False


def _reason(exc: BaseException, status: Any, code: Any) -> str:
    lines = str(exc).strip().splitlines()
    first = _SECRETS.sub("<redacted>", lines[0])[:200] if lines else ""
    return ", ".join([type(exc).__name__] + [str(p) for p in (status, code, first) if p])

