"""A ClearML fileserver (or any web server) over http:// and https://, as the SDK's `_HttpDriver` talks to it.

One backend serves one ``scheme://host[:port]``; a key is the rest of the URL, query included. What the
fileserver offers (clearml-server's fileserver.py) is all there is: a GET of a path (ranges, ETag), a HEAD, a
DELETE, and an upload as a multipart form POSTed to the fileserver's root, each field named by the path to
store. It keeps no metadata and lists nothing: `list` is Unsupported, stored times and modes are not kept.

Requests to a URL under one of the SDK's fileserver hosts (`file_server_hosts`) carry the ClearML session's
token (``Authorization: Bearer``), got from the api server's ``auth.login`` with api.credentials and renewed a
minute before it expires and once after a 401, as the SDK's session does; other URLs are fetched as they are.
Every request asks for the identity encoding: the fileserver compresses text-like files for a client that
accepts it, and its sizes and ETags then describe the compressed stream instead of the file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import json
import logging
import mimetypes
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
import urllib3.fields

from ..config import DEFAULT_TIMEOUTS, ApiSettings, Timeouts
from ..errors import (
    AccessDenied,
    Changed,
    ClearmlfsError,
    ConfigError,
    InvalidURL,
    NotFound,
    Rejected,
    StorageError,
    Transient,
    Unsupported,
)
from .base import (
    TRANSPORT_FAILURES,
    Attrs,
    Backend,
    ObjectInfo,
    Prefix,
    Progress,
    certificate_error,
    local_error,
    log_request,
    pwrite_all,
    retry,
    unverified,
)

log = logging.getLogger(__name__)

# The SDK's defaults (backend_api/session/session.py): its hosted server, and the fileserver it used to have.
DEFAULT_API_SERVER = "https://api.clear.ml"
DEFAULT_FILES_SERVER = "https://files.clear.ml"
LEGACY_FILE_SERVERS = ("https://files.community.clear.ml",)
TOKEN_MARGIN = 60.0  # a token is renewed this long before it expires (api.auth.token_expiration_threshold_sec)
CHUNK = 1024 * 1024  # bytes read from a response body at a time
UNSERVABLE = re.compile(r"[?#%\\]")  # stored under such a name, a file could not be read back by its URL

_ANSWER_FAILURES: tuple[type[BaseException], ...] = (requests.RequestException, *TRANSPORT_FAILURES)
_CAUGHT: tuple[type[BaseException], ...] = (*_ANSWER_FAILURES, OSError)


# -- which hosts are the fileserver --------------------------------------------------------------------------
def files_server_host(api: ApiSettings) -> str:
    """The fileserver the SDK uses (`Session.get_files_server_host`): api.files_server, else derived from the
    web or api server's address. ConfigError if it cannot be derived (the SDK raises there too)."""
    if api.files_server:
        return api.files_server.rstrip("/")
    api_host = (api.api_server or DEFAULT_API_SERVER).rstrip("/")
    if api_host == DEFAULT_API_SERVER:
        return DEFAULT_FILES_SERVER
    parsed = urlsplit(_web_server_host(api, api_host))
    if parsed.port:
        netloc = parsed.netloc.replace(f":{parsed.port}", ":8081", 1)
    elif parsed.netloc.startswith("demoapp."):
        netloc = parsed.netloc.replace("demoapp.", "demofiles.", 1)
    elif parsed.netloc.startswith("app."):
        netloc = parsed.netloc.replace("app.", "files.", 1)
    else:
        netloc = parsed.netloc + ":8081"
    return parsed._replace(netloc=netloc).geturl()


def _web_server_host(api: ApiSettings, api_host: str) -> str:
    if api.web_server:
        return api.web_server.rstrip("/")
    if "://demoapi." in api_host:
        return api_host.replace("://demoapi.", "://demoapp.", 1)
    if "://api." in api_host:
        return api_host.replace("://api.", "://app.", 1)
    if urlsplit(api_host).port == 8008:
        return api_host.replace(":8008", ":8080", 1)
    raise ConfigError(
        f"cannot tell the ClearML fileserver from api.api_server {api_host!r}: set api.files_server"
    )


def file_server_hosts(api: ApiSettings) -> tuple[str, ...]:
    """URL prefixes whose requests carry the session's token (`_Driver.get_file_server_hosts`): the fileserver,
    the SDK's legacy one, and those clearml.conf adds (a files_server that cannot be derived is left out)."""
    main: tuple[str, ...] = ()
    with contextlib.suppress(ConfigError):
        main = (files_server_host(api),)
    return tuple(dict.fromkeys(h for h in (*main, *LEGACY_FILE_SERVERS, *api.extra_file_servers) if h))


def session(verify: bool | str = True, connections: int = 32) -> requests.Session:
    """An HTTP session pooling enough connections for the mount's parallel transfers; retries are `retry`'s.
    `verify`: whether certificates are checked, or against which CA bundle (`ApiSettings`)."""
    http = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=connections, max_retries=0)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    http.verify = verify
    if verify is False:
        unverified("api.verify_certificate or CLEARML_API_HOST_VERIFY_CERT")
    return http


# -- the session's token -------------------------------------------------------------------------------------
class Login:
    """A token from the api server's ``auth.login`` (HTTP basic auth with api.credentials, or CLEARML_AUTH_TOKEN),
    shared by the backends of one pool; renewed `TOKEN_MARGIN` before its ``exp`` and when a request was refused
    with it."""

    def __init__(self, api: ApiSettings, where: str, http: requests.Session, timeouts: Timeouts) -> None:
        self._api, self._where, self._http, self._timeouts = api, where, http, timeouts
        self._server = (api.api_server or DEFAULT_API_SERVER).rstrip("/")
        self._token = ""
        self._expires = 0.0  # time.time() at which the token expires
        self._lock = threading.Lock()

    def token(self) -> str:
        with self._lock:
            if not self._token or time.time() > self._expires - TOKEN_MARGIN:
                self._login()
            return self._token

    def renew(self, refused: str) -> str:
        """A new token, after `refused` was (a token renewed meanwhile by another thread is kept)."""
        with self._lock:
            if self._token == refused:
                self._login()
            return self._token

    def _login(self) -> None:
        auth, headers = self._login_with()
        url = f"{self._server}/auth.login"
        started = time.monotonic()
        try:
            answer = self._http.get(url, auth=auth, headers=headers,
                                    timeout=(self._timeouts.connect, self._timeouts.read))
        except _CAUGHT as exc:
            refused = certificate_error(exc, self._server, "api.verify_certificate")
            if refused is not None:
                raise refused from None
            raise Transient(f"{self._server}: logging in failed ({type(exc).__name__})") from None
        log_request("GET", url, answer.status_code, answer.headers.get("Content-Length"), time.monotonic() - started)
        self._token, self._expires = self._token_of(answer)
        log.debug("logged in to %s as %s", self._server, self._who)

    def _login_with(self) -> tuple[tuple[str, str] | None, dict[str, str]]:
        """How `auth.login` is asked, as the SDK's session asks it: with CLEARML_AUTH_TOKEN as a bearer token (then
        with the token it got last), the key pair ignored; else with api.credentials."""
        if self._api.auth_token:
            return None, {"Authorization": f"Bearer {self._token or self._api.auth_token}"}
        if self._api.access_key and self._api.secret_key:
            return (self._api.access_key, self._api.secret_key), {}
        raise ConfigError(
            f"{self._where}: no api.credentials (access_key and secret_key), nor CLEARML_AUTH_TOKEN, to log in to "
            f"{self._server} with: the ClearML fileserver needs them"
        )

    @property
    def _who(self) -> str:
        return "CLEARML_AUTH_TOKEN" if self._api.auth_token else f"access key {self._api.access_key!r}"

    def _token_of(self, answer: requests.Response) -> tuple[str, float]:
        try:
            body = answer.json()
        except ValueError:
            body = {}
        meta = body.get("meta") if isinstance(body, dict) else None
        why = str(meta.get("result_msg", "") if isinstance(meta, dict) else "")[:200] or answer.reason
        if answer.status_code in (401, 403):
            check = "CLEARML_AUTH_TOKEN" if self._api.auth_token else f"api.credentials in {self._where}"
            raise AccessDenied(
                f"{self._server}: login refused for {self._who} ({answer.status_code}: {self._scrub(why)}); "
                f"check {check}"
            )
        if answer.status_code != 200:
            raise _status_error(answer.status_code, f"{self._server}: logging in: {self._scrub(why)}")
        data = body.get("data") if isinstance(body, dict) else None
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise StorageError(f"{self._server} answered auth.login without a token: is api.api_server the "
                               "ClearML API server?")
        return token, _expiry(token)

    def close(self) -> None:
        self._http.close()

    def _scrub(self, text: str) -> str:
        for secret in (self._api.secret_key, self._api.auth_token, self._token):
            text = text.replace(secret, "<redacted>") if secret else text
        return text


def _expiry(token: str) -> float:
    """The ``exp`` claim of a JWT (read, not verified: the server does that); a token without one lasts."""
    try:
        payload = token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
        return float(exp)
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error):
        return float("inf")


# -- the backend --------------------------------------------------------------------------------------------
class HttpBackend(Backend):
    """One web server: ``http(s)://host[:port]``."""

    reports_progress = True  # (the form's file is read as the socket takes it)

    def __init__(
        self, scheme: str, host: str, *, login: Login | None, file_servers: tuple[str, ...],
        http: requests.Session | None = None, timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.url_prefix = f"{scheme}://{host}"
        self._login = login
        self._file_servers = file_servers
        self._server_roots = frozenset(h.rstrip("/") for h in file_servers)
        self._http = http or session()
        self._timeout = (timeouts.connect, timeouts.read)

    # -- Backend ----------------------------------------------------------------------------------
    @retry()
    def stat(self, key: str) -> ObjectInfo:
        if not key or key.endswith("/") or self._url(key) in self._server_roots:  # (a fileserver's root answers "OK")
            raise NotFound(f"{self._url(key)}: a fileserver serves files only")
        with contextlib.closing(self._send("HEAD", self._url(key))) as answer:
            if answer.status_code not in (405, 501):  # (a server that answers GETs only: asked below)
                _check(answer, self._url(key))
            size = answer.headers.get("Content-Length") if answer.ok else None
        if size is None or not size.isdigit():  # (no length with a HEAD: ask for a byte, and learn the length)
            with contextlib.closing(self._send("GET", self._url(key), {"Range": "bytes=0-0"}, stream=True)) as answer:
                _check(answer, self._url(key))
                size = _total_length(answer)
        return _info(key, answer.headers, int(size))

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        raise Unsupported(f"{self._url(prefix)}: a fileserver cannot list what it holds")

    @retry()
    def read(self, key: str, start: int = 0, length: int | None = None, etag: str | None = None) -> bytes:
        if length == 0:
            return b""
        chunks: list[bytes] = []
        self._get(key, start, length, etag, chunks.append)
        return b"".join(chunks)

    @retry()
    def read_to(
        self, fd: int, key: str, start: int, length: int, etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if length == 0:
            return
        done = 0

        def write(chunk: bytes) -> None:
            nonlocal done
            done += pwrite_all(fd, chunk, start + done)
            if progress is not None:
                progress(done)

        try:
            self._get(key, start, length, etag, write)
        except OSError as exc:
            raise local_error(exc, self._url(key)) from None
        if done != length:
            raise Transient(f"{self._url(key)}: short read ({done} of {length} bytes at {start})")

    @retry()
    def download(self, key: str, dest: Path) -> ObjectInfo:
        with open(dest, "wb") as out:
            try:
                answer = self._get(key, 0, None, None, out.write)
            except OSError as exc:
                raise local_error(exc, self._url(key)) from None
            size = out.tell()
        expected = answer.headers.get("Content-Length")
        if expected and expected.isdigit() and int(expected) != size:
            raise Transient(f"{self._url(key)}: short read ({size} of {expected} bytes)")
        return _info(key, answer.headers, size)

    @retry()
    def upload(self, src: Path, key: str, progress: Progress | None = None, attrs: Attrs | None = None) -> ObjectInfo:
        url = self._url(key)
        if UNSERVABLE.search(key):
            raise InvalidURL(f"{url}: a fileserver cannot serve back a name with '?', '#', '%' or '\\' in it")
        target, field = self._upload_target(key)
        with open(src, "rb") as data:  # a missing source is the caller's OSError, not a storage error
            form = _Form(data, field, progress)
            answer = self._send("POST", target, {"Content-Type": form.content_type}, body=form)
            with contextlib.closing(answer):
                _check(answer, url)
        return self.stat(key)  # (the fileserver answers with the paths it stored, nothing more)

    @retry()
    def delete(self, key: str) -> None:
        url = self._url(key)
        with contextlib.closing(self._send("DELETE", url)) as answer:
            if answer.status_code != 404:
                _check(answer, url)

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        """A fileserver copies nothing itself: the file goes through here, by way of a temporary file."""
        with tempfile.TemporaryDirectory(prefix="clearmlfs-copy-") as folder:
            copy = Path(folder) / "copy"
            try:
                self.download(src_key, copy)
            except OSError as exc:
                raise local_error(exc, self._url(src_key)) from None
            return self.upload(copy, dst_key)

    def set_attrs(self, key: str, attrs: Attrs) -> ObjectInfo:
        """A fileserver keeps no metadata: nothing is stored, and the file is as it was."""
        return self.stat(key)

    def close(self) -> None:
        self._http.close()

    # -- helpers ----------------------------------------------------------------------------------
    def _url(self, key: str) -> str:
        return f"{self.url_prefix}/{key}" if key else self.url_prefix

    def _upload_target(self, key: str) -> tuple[str, str]:
        """Where the SDK POSTs `key`'s upload, and the form field naming it: the fileserver's own URL (it may
        have a path) and the rest of the key; for any other server, its root and the whole key."""
        url = self._url(key)
        for host in self._file_servers:
            if url.startswith(host):
                return host, url[len(host):].lstrip("/")
        return self.url_prefix + "/", key

    def _attach_token(self, url: str) -> bool:
        return self._login is not None and any(url.startswith(host) for host in self._file_servers)

    def _send(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, *, stream: bool = False,
        body: _Form | None = None,
    ) -> requests.Response:
        """`method` of `url`, with the session's token where the SDK sends it; a request refused (401) is sent
        once more with a renewed token."""
        token = self._login.token() if self._login is not None and self._attach_token(url) else None
        for attempt in (1, 2):
            sent = {"Accept-Encoding": "identity", **(headers or {})}
            if token:
                sent["Authorization"] = f"Bearer {token}"
            if body is not None:
                body.rewind()
            started = time.monotonic()
            try:
                answer = self._http.request(method, url, headers=sent, data=body, stream=stream, timeout=self._timeout)
            except _CAUGHT as exc:
                raise _transport_error(exc, url) from None
            log_request(method, url, answer.status_code, answer.headers.get("Content-Length"),
                        time.monotonic() - started, sent.get("Range", ""))
            if answer.status_code == 401 and token and attempt == 1 and self._login is not None:
                answer.close()
                token = self._login.renew(token)
                continue
            return answer
        raise AssertionError("unreachable")

    def _get(
        self, key: str, start: int, length: int | None, etag: str | None, sink: Callable[[bytes], object]
    ) -> requests.Response:
        """GET bytes [start, start+length) of `key` (to its end when length is None) into `sink`, from the
        version `etag` only (Changed otherwise). A server that ignores the range sends the whole file: the
        bytes before `start` are skipped."""
        url = self._url(key)
        headers = {}
        if start or length is not None:
            headers["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        with contextlib.closing(self._send("GET", url, headers, stream=True)) as answer:
            if answer.status_code == 416:  # start at or past the end: nothing to read
                return answer
            _check(answer, url)
            if etag and _etag(answer.headers) != etag:
                raise Changed(f"{url}: changed on the server while being read")
            skip = start if answer.status_code == 200 else 0
            left = length
            try:
                for chunk in answer.iter_content(CHUNK):
                    if skip:
                        chunk, skip = chunk[skip:], max(0, skip - len(chunk))
                    if left is not None:
                        chunk, left = chunk[:left], max(0, left - len(chunk))
                    if chunk:
                        sink(chunk)
                    if left == 0:
                        break
            except _ANSWER_FAILURES as exc:  # (a local OSError, the sink's, is the caller's)
                raise _transport_error(exc, url) from None
        return answer


class _Form:
    """The multipart form the SDK uploads a file with (requests-toolbelt's MultipartEncoder, one field named
    by the path, its file name the same, its type guessed from the name), read as a stream with its length
    known up front."""

    def __init__(self, data: BinaryIO, field: str, progress: Progress | None) -> None:
        boundary = uuid.uuid4().hex
        part = urllib3.fields.RequestField(name=field, data=b"", filename=field)
        part.make_multipart(content_type=mimetypes.guess_type(field)[0] or "binary/octet-stream")
        self._head = f"--{boundary}\r\n{part.render_headers()}".encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        self._data, self._progress = data, progress
        self._size = os.fstat(data.fileno()).st_size
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._at = 0

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def rewind(self) -> None:
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        size = len(self) - self._at if size is None or size < 0 else size
        out = b""
        if self._at < len(self._head):
            out = self._head[self._at:self._at + size]
        end = len(self._head) + self._size
        if len(out) < size and self._at + len(out) < end:
            offset = self._at + len(out) - len(self._head)
            body = os.pread(self._data.fileno(), min(size - len(out), self._size - offset), offset)
            if not body:
                raise StorageError(f"{self._data.name}: shrank while being uploaded")
            out += body
            if self._progress is not None:
                self._progress()
        if len(out) < size and self._at + len(out) >= end:
            tail_at = self._at + len(out) - end
            out += self._tail[tail_at:tail_at + size - len(out)]
        self._at += len(out)
        return out


def _info(key: str, headers: Mapping[str, str], size: int) -> ObjectInfo:
    modified = headers.get("Last-Modified")
    try:
        mtime = email.utils.parsedate_to_datetime(modified).timestamp() if modified else time.time()
    except (TypeError, ValueError):
        mtime = time.time()
    return ObjectInfo(key, size, mtime, _etag(headers) or f"{size}-{modified or ''}", Attrs())


def _etag(headers: Mapping[str, str]) -> str:
    etag = headers.get("ETag", "")
    return etag.removeprefix("W/").strip('"')


def _total_length(answer: requests.Response) -> str:
    """The whole file's length a ranged answer tells (``Content-Range: bytes 0-0/N``)."""
    total = answer.headers.get("Content-Range", "").rpartition("/")[2]
    if answer.status_code == 206 and total.isdigit():
        return total
    length = answer.headers.get("Content-Length", "")
    if answer.status_code == 200 and length.isdigit():
        return length
    raise StorageError(f"{answer.url}: the server does not tell the file's size")


def _check(answer: requests.Response, url: str) -> None:
    if 200 <= answer.status_code < 300:
        return
    reason = f"{answer.status_code} {answer.reason or ''}".strip()
    if answer.status_code == 404:
        raise NotFound(f"{url}: not found ({reason})")
    if answer.status_code in (401, 403):
        raise AccessDenied(f"{url}: access denied ({reason}); check api.credentials and api.files_server")
    if answer.status_code == 413:
        raise Rejected(f"{url}: larger than the server accepts ({reason})")
    raise _status_error(answer.status_code, f"{url}: {reason}")


def _status_error(status: int, message: str) -> ClearmlfsError:
    if status in (408, 429) or (status >= 500 and status not in (501, 505)):
        return Transient(message)
    if 400 <= status < 500:
        return Rejected(message)
    return StorageError(message)


def _transport_error(exc: BaseException, url: str) -> ClearmlfsError:
    """A request that got no answer: the exception's type only (its text may quote headers)."""
    # (what the SDK reads for http(s) storage: api.verify_certificate is for its api server only)
    refused = certificate_error(exc, url, "CLEARML_API_HOST_VERIFY_CERT")
    if refused is not None:
        return refused
    if isinstance(exc, (*TRANSPORT_FAILURES, requests.RequestException)) and not isinstance(
        exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)
    ):
        return Transient(f"{url}: {type(exc).__name__}")
    if isinstance(exc, requests.RequestException):
        return InvalidURL(f"{url}: {type(exc).__name__}")
    assert isinstance(exc, OSError)
    return local_error(exc, url)

