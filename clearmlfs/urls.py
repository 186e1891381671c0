"""ClearML URLs, their parts, and where they appear inside a mount.

A ClearML URL maps to a path in the mount by replacing ``://`` with ``/``:
``s3://bucket/a/b.pt`` is ``<mnt>/s3/bucket/a/b.pt`` and
``s3://minio:9000/bucket/x`` is ``<mnt>/s3/minio:9000/bucket/x``; a fileserver URL
``http://files:8081/a/b.pt`` is ``<mnt>/http/files:8081/a/b.pt`` (https likewise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InvalidURL

SCHEMES = ("s3", "gs", "azure", "file", "http", "https")
HTTP_SCHEMES = ("http", "https")  # a ClearML fileserver (or any web server): host[:port], then the path
# ClearML accepts these spellings too; they name the same storage.
_ALIASES = {"gcs": "gs", "az": "azure"}
# S3-compatible hosts without a port that clearml.conf names in `host` entries (config registers them): ClearML
# matches those entries before its port rule, so `s3://HOST/bucket/key` is a bucket on HOST.
_S3_HOSTS: set[str] = set()


@dataclass(frozen=True)
class StorageURL:
    """A parsed ClearML URL.

    `host` is set for S3-compatible hosts (``host:port``), Azure accounts
    (``account.blob.core.windows.net``) and http(s) servers (``host[:port]``, as written); empty for AWS S3,
    GCS and file://. `bucket` is the bucket or container ('' for file:// and http(s)). `key` is the object
    key without a leading slash (for http(s): the rest of the URL, query included), or the absolute path for
    file://.
    """

    scheme: str
    host: str
    bucket: str
    key: str

    @property
    def root(self) -> str:
        """URL of the bucket/container this object lives in (``file://`` for local paths)."""
        if self.scheme == "file":
            return "file://"
        if self.scheme in HTTP_SCHEMES:
            return f"{self.scheme}://{self.host}"
        netloc = f"{self.host}/{self.bucket}" if self.host else self.bucket
        return f"{self.scheme}://{netloc}"

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return f"file://{self.key}"
        return f"{self.root}/{self.key}" if self.key else self.root

    @property
    def account(self) -> str:
        """Azure storage account name (the first label of the host)."""
        return self.host.partition(".")[0]

    def child(self, key: str) -> StorageURL:
        return StorageURL(self.scheme, self.host, self.bucket, key)


def parse_url(url: str) -> StorageURL:
    """Split a ClearML URL; a plain local path is taken as file://."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        if not url:
            raise InvalidURL("empty URL")
        return StorageURL("file", "", "", os.path.abspath(os.path.expanduser(url)))
    scheme = _ALIASES.get(scheme.lower(), scheme.lower())
    if scheme == "file":
        return StorageURL("file", "", "", os.path.abspath(os.path.expanduser(rest or "/")))
    if scheme not in SCHEMES:
        raise InvalidURL(
            f"unsupported URL scheme {scheme!r} in {url!r} (expected s3://, gs://, azure://, http(s)://, file://)"
        )
    parts = rest.split("/", 1)
    first, path = parts[0], parts[1] if len(parts) > 1 else ""
    if scheme in HTTP_SCHEMES:
        return _http_url(scheme, first, path, url)
    if not first:
        raise InvalidURL(f"URL {url!r} names no bucket")
    if scheme == "azure" or (scheme == "s3" and (_has_port(first) or first.lower() in _S3_HOSTS)):
        bucket, _, key = path.partition("/")
        if not bucket:
            raise InvalidURL(f"URL {url!r} names no {'container' if scheme == 'azure' else 'bucket'}")
        return StorageURL(scheme, first.lower(), bucket, key)
    return StorageURL(scheme, "", first, path)


def _http_url(scheme: str, netloc: str, path: str, url: str) -> StorageURL:
    # Kept as written, case included: the SDK names a URL's cache file after the URL exactly as given.
    if "@" in netloc:  # (not quoted: the part before '@' is a password)
        raise InvalidURL(f"{scheme}:// URLs with a user or password are not supported; the fileserver logs in "
                         "with api.credentials")
    if not netloc.strip("[]:"):
        raise InvalidURL(f"URL {url!r} names no host")
    return StorageURL(scheme, netloc, "", path)


def register_s3_host(host: str) -> None:
    _S3_HOSTS.add(host.lower())


def _has_port(netloc: str) -> bool:
    # ClearML's rule: an S3 URL whose first part has a port names a non-AWS host.
    host, sep, port = netloc.rpartition(":")
    return bool(sep and host and port.isdigit())


def url_to_mount_path(url: str) -> str:
    """Path of `url` relative to the mount root, e.g. ``s3/bucket/a/b.pt``."""
    parsed = parse_url(url)
    if parsed.scheme == "file":
        return "file" + parsed.key
    return parsed.url.replace("://", "/", 1)


def mount_path_to_url(relpath: str) -> str:
    """Inverse of `url_to_mount_path`: ``s3/bucket/a`` is ``s3://bucket/a``."""
    scheme, sep, rest = relpath.strip("/").partition("/")
    if scheme not in SCHEMES or (not sep and scheme != "file"):
        raise InvalidURL(f"{relpath!r} is not inside a storage folder of the mount")
    return f"{scheme}:///{rest}" if scheme == "file" else f"{scheme}://{rest}"
