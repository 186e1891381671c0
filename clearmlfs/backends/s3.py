"""Amazon S3 and S3-compatible servers (MinIO, SeaweedFS, Ceph...) through boto3.

Transfers use boto3's transfer manager (parallel multipart up and down); the
client's own retry mode handles throttling and 5xx; `_translate` is the one place
botocore's errors become clearmlfs errors.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import email.utils
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import botocore.utils
import s3transfer.exceptions
from boto3.s3.transfer import S3Transfer, TransferConfig, create_transfer_manager
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import OSUtils, ReadFileChunk

from .. import __version__
from ..config import DEFAULT_TIMEOUTS, S3Credentials, S3Settings, Timeouts
from ..errors import AccessDenied, Changed, ClearmlfsError, NameTooLong, NotFound, Rejected, StorageError, Transient
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
    certificate_error,
    content_type,
    local_error,
    log_request,
    metadata_attrs,
    metadata_sha256,
    pwrite_all,
    request_log,
    retry,
    unverified,
)

log = logging.getLogger(__name__)


MAX_PARTS = 10_000  # S3's limit on the parts of one object
READ_PIECE = 1024 * 1024  # body bytes read and written at a time
USER_AGENT = f"clearmlfs/{__version__}"
SINGLE_PUT_LIMIT = 5 * 1024**3  # S3's largest single PUT; `multipart: false` uploads up to it in one request
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchUpload"}
_DENIED = {
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "InvalidToken", "ExpiredToken", "AccountProblem", "Forbidden",
}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
              "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "429"}


class SourceShrank(Exception):
    """The file being uploaded got shorter than it was when its upload began: rewritten meanwhile."""


# What botocore, boto3 and s3transfer document they raise, the transport's failures beneath them, local file
# errors (a full cache disk mid-download), and our own readers giving up (a stream's; a file that shrank).
# Anything else is a bug, left to reach the operation (EIO, with its traceback in the log).
_CAUGHT: tuple[type[BaseException], ...] = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
    s3transfer.exceptions.RetriesExceededError,
    s3transfer.exceptions.S3UploadFailedError,
    concurrent.futures.CancelledError,
    ReaderAbandoned,
    SourceShrank,
    *TRANSPORT_FAILURES,
    OSError,
)
# Setting up plain GETs reads private attributes of the client: if they moved, the client serves instead.
_SETUP_FAILURES: tuple[type[BaseException], ...] = (*_CAUGHT, AttributeError, KeyError, TypeError, ValueError)


_TRANSIENT_EXC = (
    SourceShrank,  # a new attempt uploads the file as it is now
    botocore.exceptions.ConnectionError,  # includes EndpointConnectionError, ConnectionClosedError
    botocore.exceptions.HTTPClientError,  # includes ReadTimeoutError
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    *TRANSPORT_FAILURES,  # a body cut off while read (urllib3's ProtocolError), also on the plain-GET path
)
COPY_CUTOFF = 4_768 * 1024 * 1024  # CopyObject takes up to 5 GiB; beyond (rclone's cutoff too) a multipart copy
DELETE_BATCH = 1000  # keys per DeleteObjects request, S3's maximum
SDK_ATTEMPTS = 3  # botocore's, per request; `retry` adds its own around them, within the caller's deadline


def _translate(exc: BaseException, url: str, bucket: str | None = None, host: str = "") -> ClearmlfsError:
    """botocore/boto3 exception → clearmlfs error. Never includes credentials. `bucket` and `host` (of a
    credentials entry with a host) name what access was denied to; by default, the URL's first part."""
    cause = _client_error_in(exc)
    if cause is not None:
        code = str(cause.response.get("Error", {}).get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "PreconditionFailed" or status == 412:
            return Changed(f"{url}: changed on the server while being read")
        if code in _NOT_FOUND or status == 404:
            return NotFound(f"{url}: not found")
        if code in _DENIED or status == 403:
            return AccessDenied(f"{url}: access denied ({code or status}) for {_scope(url, bucket, host)}")
        if code in _TRANSIENT or status == 429 or status >= 500:
            return Transient(f"{url}: {code or status}")
        message = f"{url}: {code or status}: {cause.response.get('Error', {}).get('Message', '')}"
        if code == "KeyTooLongError":
            return NameTooLong(message)
        return Rejected(message) if 400 <= status < 500 and status != 408 else StorageError(message)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return AccessDenied(f"{url}: no S3 credentials configured (sdk.aws.s3 key/secret or the AWS chain)")
    refused = certificate_error(exc, url, "`verify` in its sdk.aws.s3 credentials entry")
    if refused is not None:
        return refused
    if isinstance(exc, _TRANSIENT_EXC):
        return Transient(f"{url}: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return local_error(exc, url)
    return StorageError(f"{url}: {type(exc).__name__}: {exc}")


def _scope(url: str, bucket: str | None, host: str) -> str:
    """"bucket 'b' on host 'h'": what the keys in use were refused, to find their clearml.conf entry."""
    if bucket is None and not host:
        bucket = url.split("/")[2]  # s3://bucket/key: an AWS URL names the bucket first
    named = [f"bucket {bucket!r}"] if bucket else []
    return " on ".join(named + ([f"host {host!r}"] if host else []))


def _code(exc: BaseException) -> str:
    cause = _client_error_in(exc)
    return "" if cause is None else str(cause.response.get("Error", {}).get("Code", ""))


def _client_error_in(exc: BaseException) -> botocore.exceptions.ClientError | None:
    # boto3's transfer manager wraps ClientError (S3UploadFailedError); look down the chain.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, botocore.exceptions.ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


META_HEADER = "x-amz-meta-"  # user metadata in a response's headers
# What a CopyObject that replaces metadata must send again not to lose it.
_CONTENT_HEADERS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")


def _info(key: str, response: dict[str, Any]) -> ObjectInfo:
    """What a HEAD's or a GET's response tells of the object."""
    meta = response.get("Metadata")
    return ObjectInfo(
        key, response["ContentLength"], response["LastModified"].timestamp(), response["ETag"].strip('"'),
        metadata_attrs(meta), sha256=metadata_sha256(meta),
    )


def upload_args(creds: S3Credentials, key: str, attrs: Attrs | None) -> dict[str, Any]:
    """An upload's ExtraArgs, as the SDK's: the content type guessed from the key, then clearml.conf's
    `extra_args` (ServerSideEncryption, SSEKMSKeyId, ACL, Metadata, ...); our own metadata joins theirs."""
    configured = creds.upload_args
    args = {"ContentType": content_type(key), **configured}
    if attrs is not None:
        args["Metadata"] = {**configured.get("Metadata", {}), **attrs_metadata(attrs)}
    return args


def _copy_args(creds: S3Credentials) -> dict[str, Any]:
    """The configured upload arguments a server-side copy (a rename) needs to store its object as an upload
    would (encryption, ACL, storage class); with a customer key, the source is read with it too."""
    allowed = set(TransferManager.ALLOWED_COPY_ARGS) - {"ContentType", "Metadata"}
    args = {k: v for k, v in creds.upload_args.items() if k in allowed}
    for name in ("SSECustomerAlgorithm", "SSECustomerKey", "SSECustomerKeyMD5"):
        if name in args:
            args[f"CopySource{name}"] = args[name]
    return args


def _timestamp(value: str) -> datetime.datetime:
    """botocore's timestamp parser (dateutil) dominates parsing a 1,000-object listing page; the
    standard library reads the two formats S3 sends (ISO 8601 in listings, RFC 1123 in headers) 2x faster."""
    try:
        return datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        pass
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        parsed: datetime.datetime = botocore.utils.parse_timestamp(value)
        return parsed


def _parse_timestamps_faster(session: Any) -> None:
    """botocore's response parser, with `_timestamp` for dates. Through botocore's private session: if it moves,
    botocore's own parser is kept (listings parse slower, nothing else changes)."""
    try:
        factory = session._session.get_component("response_parser_factory")
        factory.set_parser_defaults(timestamp_parser=_timestamp)
    except (AttributeError, KeyError, ValueError) as exc:
        log.debug("botocore's timestamp parser kept: %s", exc)


def make_client(creds: S3Credentials, settings: S3Settings, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Any:
    """A boto3 S3 client for one credentials entry (endpoint, TLS, pool size from clearml.conf)."""
    # As the SDK: the credentials chain ignores the keys; an empty region is left to boto3 (AWS_DEFAULT_REGION,
    # the profile's).
    keys = not creds.use_credentials_chain
    session = boto3.session.Session(
        aws_access_key_id=(creds.key or None) if keys else None,
        aws_secret_access_key=(creds.secret or None) if keys else None,
        aws_session_token=(creds.token or None) if keys else None,
        region_name=creds.region or None,
        profile_name=(creds.profile or None) if not (keys and creds.key) else None,
    )
    _parse_timestamps_faster(session)
    options: dict[str, Any] = {
        "max_pool_connections": settings.pool_connections,
        "retries": {"max_attempts": SDK_ATTEMPTS, "mode": "standard"},
        "signature_version": "s3v4",
        # botocore waits 60 s for each; a stalled server would hold a caller for minutes.
        "connect_timeout": timeouts.connect,
        "read_timeout": timeouts.read,
    }
    if creds.host:
        # Compatible servers: path-style buckets, and no flexible-checksum trailers, which many do not speak.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    endpoint = f"{'https' if creds.secure else 'http'}://{creds.host}" if creds.host else None
    if creds.verify is False:
        unverified(f"verify of the sdk.aws.s3 entry for {creds.host or creds.bucket or 'AWS'}")
    client = session.client("s3", endpoint_url=endpoint, verify=creds.verify, config=botocore.config.Config(**options))
    # botocore loads each operation's model on first use (from disk): do it now, not on a user's first `ls`.
    client.get_paginator("list_objects_v2")
    for operation in ("HeadObject", "GetObject", "ListObjectsV2", "PutObject"):
        client.meta.service_model.operation_model(operation)
    if request_log.isEnabledFor(logging.DEBUG):
        client.meta.events.register("before-call.s3", _call_started)
        client.meta.events.register("after-call.s3", _call_ended)
        client.meta.events.register("after-call-error.s3", _call_failed)
    return client


def _call_started(model: Any, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    context["clearmlfs_started"] = time.monotonic()
    context["clearmlfs_operation"] = model.name
    context["clearmlfs_range"] = params.get("headers", {}).get("Range", "")
    context["clearmlfs_url"] = params.get("url", "")


def _call_ended(http_response: Any, model: Any, context: dict[str, Any], **_: Any) -> None:
    log_request(
        model.http.get("method", model.name), http_response.url, http_response.status_code,
        http_response.headers.get("Content-Length"),
        time.monotonic() - context.get("clearmlfs_started", time.monotonic()), context.get("clearmlfs_range", ""),
    )


def _call_failed(exception: BaseException, context: dict[str, Any], **_: Any) -> None:
    log_request(
        context.get("clearmlfs_operation", "?"), context.get("clearmlfs_url", ""), type(exception).__name__, None,
        time.monotonic() - context.get("clearmlfs_started", time.monotonic()), context.get("clearmlfs_range", ""),
    )


def _stream_config(transfer: TransferConfig) -> TransferConfig:
    """`transfer` for a non-seekable source, whose parts the transfer manager must hold in memory until sent."""
    config = TransferConfig(
        # Only its first read: the stream starts past the real threshold, so it is multipart anyway, and a
        # large configured threshold must not be read into memory at once.
        multipart_threshold=min(transfer.multipart_threshold, transfer.multipart_chunksize),
        multipart_chunksize=transfer.multipart_chunksize,
        max_concurrency=transfer.max_concurrency,
        use_threads=True,
    )
    # At most this many parts per stream in memory (default 10); more than the threads could send is waste.
    config.max_in_memory_upload_chunks = max(2, min(STREAM_PARTS_IN_MEMORY, transfer.max_concurrency))
    return config


class _WholeChunk(ReadFileChunk):  # type: ignore[misc]
    """A request body (a part, or a single PUT) that raises instead of ending early when its file shrank.

    The transfer manager fixes each request's Content-Length from the file's size when the upload begins. A body
    that then ends early leaves the server waiting for bytes that never come, and the client waiting for its
    answer: a read timeout (60 s) per attempt, six attempts per part, while a writer's close() waits for the
    upload. Raising instead drops the connection mid-request (the server discards the part) and fails the upload
    at once.
    """

    def read(self, amount: int | None = None) -> bytes:
        left = len(self) - self.tell()
        data: bytes = super().read(amount)
        if len(data) < (left if amount is None or amount < 0 else min(amount, left)):
            raise SourceShrank(f"the file ended {left - len(data)} bytes short of the size its upload began with")
        return data


class _PartInMemory:
    """A part the transfer manager read from a stream into memory, read back as views of that memory.

    The transfer manager wraps such a part in a BytesIO, whose every read copies: once for the SigV4 payload
    hash, once more to send. Views cost nothing, and the part is never written to, so no copy is needed.
    """

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, amount: int | None = -1) -> memoryview:
        end = len(self._data) if amount is None or amount < 0 else min(len(self._data), self._pos + amount)
        view = self._data[self._pos:end]
        self._pos = max(self._pos, end)
        return view

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        pass  # the memory goes with the last view of it


class _Bodies(OSUtils):  # type: ignore[misc]
    """Request bodies for the transfer manager: parts of a file raise if the file shrank (`_WholeChunk`);
    parts of a stream, already in memory, are sent without copies (`_PartInMemory`)."""

    def open_file_chunk_reader_from_fileobj(
        self, fileobj: Any, chunk_size: int, full_file_size: int, callbacks: Any, close_callbacks: Any = None
    ) -> ReadFileChunk:
        if isinstance(fileobj, io.BytesIO):
            # getvalue() of a BytesIO made from bytes and not written to is those bytes, not a copy.
            return ReadFileChunk(
                _PartInMemory(fileobj.getvalue()), chunk_size, full_file_size, callbacks=callbacks,
                enable_callbacks=False, close_callbacks=close_callbacks,
            )
        return _WholeChunk(
            fileobj, chunk_size, full_file_size, callbacks=callbacks, enable_callbacks=False,
            close_callbacks=close_callbacks,
        )


class PlainGet:
    """GETs (and HEADs) of whole objects signed by botocore's SigV4 signer and sent over the client's own HTTP
    session (its connection pool, TLS and proxy settings), without the client's request pipeline.

    That pipeline (event hooks, endpoint rules, parameter checks, response parsing) costs about 0.7 ms of CPU
    per request: more than half of a small object's GET or of a HEAD, and what a folder of many small files is
    read (or `ls -l`'d: a HEAD per file) at the speed of (scripts/bench.py, "small", "ls"). Only 200 and 304
    are answered here; anything else (an error, a redirect to another region) is left to the client, which
    knows its retries and error codes.
    """

    _PROBE = "clearmlfs-probe"

    def __init__(self, client: Any, bucket: str) -> None:
        # botocore keeps no public handle on these; `for_client` falls back to the client if they move.
        self._credentials = client._request_signer._credentials
        self._http = client._endpoint.http_session
        self._region = client.meta.region_name or "us-east-1"
        # The object URL the client itself would use (addressing style, endpoint rules), learnt once.
        url = urlsplit(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": self._PROBE}))
        if self._credentials is None or not url.path.endswith(f"/{self._PROBE}"):
            raise ValueError(f"unexpected object URL {url.scheme}://{url.netloc}{url.path}")
        self._base = urlunsplit((url.scheme, url.netloc, url.path[: -len(self._PROBE)], "", ""))

    @classmethod
    def for_client(cls, client: Any, bucket: str) -> PlainGet | None:
        try:
            return cls(client, bucket)
        except _SETUP_FAILURES as exc:
            log.debug("plain GETs unavailable for bucket %r: %s", bucket, exc)
            return None

    def send(self, key: str, unless_etag: str | None, method: str = "GET", extra: dict[str, str] | None = None) -> Any:
        """The response to a GET (or HEAD) of `key`, its body not read yet."""
        headers = {"User-Agent": USER_AGENT, **(extra or {})}
        if unless_etag:
            headers["If-None-Match"] = f'"{unless_etag}"'
        url = self._base + quote(key, safe="/~")
        request = AWSRequest(method, url, headers=headers, stream_output=True)
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        started = time.monotonic()
        response = self._http.send(request.prepare())
        if request_log.isEnabledFor(logging.DEBUG):
            log_request(method, url, response.status_code, response.headers.get("Content-Length"),
                        time.monotonic() - started)
        return response


def list_buckets(client: Any, host: str) -> list[str]:
    """Bucket names `client`'s credentials can see on their host (for a host-wide clearml.conf entry)."""
    try:
        return sorted(b["Name"] for b in client.list_buckets().get("Buckets", ()))
    except _CAUGHT as exc:
        raise _translate(exc, f"s3://{host}", host=host) from None


def _ticks(progress: Progress | None) -> Callable[[int], None] | None:
    return None if progress is None else (lambda _sent: progress())


class _Sent(BaseSubscriber):  # type: ignore[misc]
    """Tells `progress` whenever the transfer manager sent bytes of a stream's parts."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._progress()


class S3Backend(Backend):
    reports_progress = True
    def __init__(
        self, creds: S3Credentials, settings: S3Settings, bucket: str, client: Any = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.bucket = bucket
        self._creds = creds
        netloc = f"{creds.host}/{bucket}" if creds.host else bucket
        self.url_prefix = f"s3://{netloc}"
        self._owns_client = client is None
        self._client = client or make_client(creds, settings, timeouts)
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold if creds.multipart else SINGLE_PUT_LIMIT,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=settings.max_multipart_concurrency,
            use_threads=True,
        )
        if creds.multipart:  # `multipart: false` means one PUT per object, so nothing to stream
            self.stream_threshold = settings.multipart_threshold
            # Without the total size, the transfer manager cannot grow its part size to stay within S3's limit.
            self.stream_limit = MAX_PARTS * settings.multipart_chunksize
        self._stream_transfer = _stream_config(self._transfer)
        self._plain = PlainGet.for_client(self._client, bucket)
        # The transfer manager starts multipart uploads itself: their ids are learnt from the responses.
        self._client.meta.events.register("after-call.s3.CreateMultipartUpload", self._multipart_started)

    def _multipart_started(self, parsed: dict[str, Any], **_: Any) -> None:
        watch = self.multipart_watch
        # The client is shared by the buckets of a credentials entry: each backend hears its own.
        if watch is not None and parsed.get("Bucket") == self.bucket and parsed.get("UploadId"):
            watch(self._url(parsed["Key"]), parsed["UploadId"])

    @contextlib.contextmanager
    def _multipart_ends(self, key: str) -> Iterator[None]:
        """Around a call that may start a multipart upload of `key`: at its end, the upload is complete or
        (the transfer manager's failure cleanup) aborted."""
        try:
            yield
        finally:
            if self.multipart_watch is not None:
                self.multipart_watch(self._url(key), None)

    def _url(self, key: str) -> str:
        return f"{self.url_prefix}/{key}"

    def _error(self, exc: BaseException, key: str) -> ClearmlfsError:
        return _translate(exc, self._url(key), self.bucket, self._creds.host)

    @retry()
    def stat(self, key: str) -> ObjectInfo:
        plain = self._plain_get(key, None, "HEAD")
        if plain is not None and plain[1] is not None:
            plain[0].raw.drain_conn()  # (no body)
            return plain[1]
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except _CAUGHT as exc:
            raise self._error(exc, key) from None
        return _info(key, head)

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        paginator = self._client.get_paginator("list_objects_v2")
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        try:
            for page in paginator.paginate(**args):
                for common in page.get("CommonPrefixes", ()):
                    yield Prefix(common["Prefix"])
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(  # a listing shows no metadata: what it stores takes a HEAD or a GET
                        obj["Key"], obj["Size"], obj["LastModified"].timestamp(), obj["ETag"].strip('"'),
                        attrs_known=False,
                    )
        except _CAUGHT as exc:
            raise self._error(exc, prefix) from None

    def _get(self, key: str, start: int, length: int | None, etag: str | None) -> Any:
        end = "" if length is None else str(start + length - 1)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={start}-{end}"}
        if etag:
            args["IfMatch"] = f'"{etag}"'
        return self._client.get_object(**args)

    @retry()
    def read(self, key: str, start: int = 0, length: int | None = None, etag: str | None = None) -> bytes:
        if length == 0:
            return b""
        try:
            resp = self._get(key, start, length, etag)
            data: bytes = resp["Body"].read()
        except _CAUGHT as exc:
            if _code(exc) == "InvalidRange":
                return b""  # start is at or past the end of the object
            raise self._error(exc, key) from None
        if len(data) != resp["ContentLength"]:
            raise Transient(f"{self._url(key)}: short read ({len(data)} of {resp['ContentLength']} bytes)")
        return data

    @retry()
    def read_to(
        self, fd: int, key: str, start: int, length: int, etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        # Streams the body to the file in 1 MiB pieces: many parallel ranges, little memory,
        # and a reader of the range's first bytes is answered as soon as they are in.
        offset = start
        try:
            plain = self._plain_range(key, start, length, etag)
            if plain is not None:
                pieces = plain.raw.stream(READ_PIECE, decode_content=False)
            else:
                pieces = self._get(key, start, length, etag)["Body"].iter_chunks(READ_PIECE)
            for piece in pieces:
                offset += pwrite_all(fd, piece, offset)
                if progress is not None and offset < start + length:  # the caller learns of the end anyway
                    progress(offset - start)
        except _CAUGHT as exc:
            raise self._error(exc, key) from None
        if offset != start + length:
            raise Transient(f"{self._url(key)}: short read ({offset - start} of {length} bytes at {start})")

    def _plain_range(self, key: str, start: int, length: int, etag: str | None) -> Any:
        """A ranged GET of `key` pinned to `etag` through `PlainGet` (a random reader waits for one per read:
        the client's pipeline was a fifth of its time); None when the client is to ask instead (it knows
        the error codes: a changed object, a missing one)."""
        if self._plain is None:
            return None
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        if etag:
            headers["If-Match"] = f'"{etag}"'
        try:
            response = self._plain.send(key, None, "GET", headers)
        except _CAUGHT as exc:
            log.debug("plain ranged GET of %s failed (%s): asking through the client", self._url(key),
                      type(exc).__name__)
            return None
        if response.status_code == 206:
            served = response.headers.get("ETag", "").strip('"')
            if etag and served and served != etag:  # (a server that does not honour If-Match)
                response.close()
                raise Changed(f"{self._url(key)}: changed while read")
            return response
        if response.status_code == 200:
            response.close()  # the whole object, the range ignored: not read
        else:
            response.raw.drain_conn()  # a short error document: the connection can serve the next request
        return None

    @retry()
    def read_small(self, fd: int, key: str, limit: int, unless_etag: str | None = None) -> ObjectInfo | None:
        # One conditional GET: its headers say what a HEAD would have. Not ranged (an empty object has no
        # byte 0): an object that grew past `limit` is cut off by closing the connection after the headers.
        plain = self._plain_get(key, unless_etag)
        if plain is not None:
            response, info = plain
            if info is None:  # 304
                response.raw.drain_conn()  # no body: the connection goes back to the pool
                return None
            return self._receive(fd, info, limit, response.raw.stream(READ_PIECE, decode_content=False),
                                 response.raw.close)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if unless_etag:
            args["IfNoneMatch"] = f'"{unless_etag}"'
        try:
            resp = self._client.get_object(**args)
        except _CAUGHT as exc:
            if _code(exc) in ("304", "NotModified"):
                return None
            raise self._error(exc, key) from None
        return self._receive(fd, _info(key, resp), limit, resp["Body"].iter_chunks(READ_PIECE), resp["Body"].close)
    def _plain_get(
        self, key: str, unless_etag: str | None, method: str = "GET"
    ) -> tuple[Any, ObjectInfo | None] | None:
        """`key`'s GET (or HEAD) response through `PlainGet`: with the object's info (200), or without (304);
        None when the client is to ask instead."""
        if self._plain is None:
            return None
        try:
            response = self._plain.send(key, unless_etag, method)
        except _CAUGHT as exc:  # the client's own retries and error codes are better at it
            log.debug("plain %s of %s failed (%s): asking through the client", method, self._url(key),
                      type(exc).__name__)
            return None
        if response.status_code == 304:
            return response, None
        if response.status_code == 200:
            try:
                headers = response.headers
                modified = _timestamp(headers["Last-Modified"]).timestamp()
                # (botocore's Metadata keys, as S3 sends them: lower case)
                meta = {k[len(META_HEADER):].lower(): v for k, v in headers.items()
                        if k.lower().startswith(META_HEADER)}
                return response, ObjectInfo(
                    key, int(headers["Content-Length"]), modified, headers["ETag"].strip('"'), metadata_attrs(meta),
                    sha256=metadata_sha256(meta),
                )
            except (KeyError, ValueError, TypeError):
                log.debug("plain GET of %s: headers the client must read", self._url(key))
        response.raw.drain_conn()  # a short error document: the connection can serve the next request
        if response.status_code in (301, 307, 400):  # a region or addressing only the client knows how to follow
            log.debug("plain GETs of %s answered %d: using the client's", self.url_prefix, response.status_code)
            self._plain = None
        return None

    def _receive(
        self, fd: int, info: ObjectInfo, limit: int, pieces: Iterator[bytes], close: Callable[[], None]
    ) -> ObjectInfo:
        if info.size > limit:
            close()
            return info
        offset = 0
        try:
            for piece in pieces:
                offset += pwrite_all(fd, piece, offset)
        except _CAUGHT as exc:
            close()
            raise self._error(exc, info.key) from None
        if offset != info.size:
            raise Transient(f"{self._url(info.key)}: short read ({offset} of {info.size} bytes)")
        os.ftruncate(fd, offset)  # a longer body from an earlier attempt must not linger past the end
        return info

    @retry()
    def download(self, key: str, dest: Path) -> ObjectInfo:
        info = self.stat(key)
        try:
            self._client.download_file(self.bucket, key, str(dest), Config=self._transfer)
        except _CAUGHT as exc:
            raise self._error(exc, key) from None
        if dest.stat().st_size != info.size:
            raise Transient(f"{self._url(key)}: downloaded {dest.stat().st_size} of {info.size} bytes")
        return info

    @retry()
    def upload(self, src: Path, key: str, progress: Progress | None = None, attrs: Attrs | None = None) -> ObjectInfo:
        try:
            # client.upload_file, but with request bodies that never end short of their Content-Length.
            with (
                self._multipart_ends(key),
                S3Transfer(self._client, self._transfer, osutil=_Bodies()) as transfer,
            ):
                transfer.upload_file(str(src), self.bucket, key, callback=_ticks(progress),
                                     extra_args=upload_args(self._creds, key, attrs))
        except _CAUGHT as exc:
            raise self._error(exc, key) from None
        return self.stat(key)

    def upload_stream(
        self, reader: Reader, key: str, progress: Progress | None = None, attrs: Attrs | None = None
    ) -> ObjectInfo:
        # The transfer manager reads a non-seekable source part by part and uploads the parts in parallel;
        # if the reader raises, it aborts the multipart upload (failure cleanup), so nothing is left behind.
        try:
            with (
                self._multipart_ends(key),
                create_transfer_manager(self._client, self._stream_transfer, osutil=_Bodies()) as manager,
            ):
                subscribers = [] if progress is None else [_Sent(progress)]
                manager.upload(reader, self.bucket, key, upload_args(self._creds, key, attrs), subscribers).result()
        except _CAUGHT as exc:
            raise self._error(exc, key) from None
        return self.stat(key)

    @retry()
    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except _CAUGHT as exc:
            error = self._error(exc, key)
            if not isinstance(error, NotFound):
                raise error from None

    @retry()
    def delete_many(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start:start + DELETE_BATCH]]
            try:
                result = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except _CAUGHT as exc:
                raise self._error(exc, batch[0]["Key"]) from None
            failed = [e for e in result.get("Errors", []) if e.get("Code") not in _NOT_FOUND]
            if failed:
                raise StorageError(f"{self._url(failed[0].get('Key', ''))}: {failed[0].get('Code')}: "
                                   f"{failed[0].get('Message', '')} ({len(failed)} of {len(batch)} not deleted)")

    @retry()
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        try:
            self._copy(self._client.head_object(Bucket=self.bucket, Key=src_key), src_key, dst_key)
        except _CAUGHT as exc:
            raise self._error(exc, src_key) from None
        return self.stat(dst_key)

    @retry()
    def set_attrs(self, key: str, attrs: Attrs) -> ObjectInfo:
        # S3 changes metadata only by writing the object again: a copy onto itself, on the server.
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
            self._copy(head, key, key, {**head.get("Metadata", {}), **attrs_metadata(attrs)})
        except _CAUGHT as exc:
            raise self._error(exc, key) from None
        return self.stat(key)

    def _copy(self, head: dict[str, Any], src_key: str, dst_key: str, metadata: dict[str, str] | None = None) -> None:
        """Copy the object `head` describes; with `metadata`, that replaces its metadata (its content headers
        are kept, which a replacing CopyObject would otherwise drop)."""
        headers = {name: head[name] for name in _CONTENT_HEADERS if head.get(name)}
        source = {"Bucket": self.bucket, "Key": src_key}
        configured = _copy_args(self._creds)
        if head["ContentLength"] <= COPY_CUTOFF:  # one CopyObject, as rclone does: no parts, no transfer manager
            replaced = {} if metadata is None else {**headers, "Metadata": metadata, "MetadataDirective": "REPLACE"}
            self._client.copy_object(Bucket=self.bucket, Key=dst_key, CopySource=source, **configured, **replaced)
            return
        # A multipart copy copies no metadata by itself (each part is content only).
        args = {**headers, **configured, "Metadata": head.get("Metadata", {}) if metadata is None else metadata}
        with self._multipart_ends(dst_key):
            self._client.copy(source, self.bucket, dst_key, ExtraArgs=args, Config=self._transfer)

    @retry()
    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except _CAUGHT as exc:
            error = self._error(exc, key)
            if not isinstance(error, NotFound):  # NoSuchUpload: completed or aborted already
                raise error from None

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
