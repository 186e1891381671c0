"""Storage backends, and the pool that hands out one backend per bucket/container."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import S3Credentials, Settings
from ..errors import ClearmlfsError
from ..urls import HTTP_SCHEMES, StorageURL, parse_url
from .base import Attrs, Backend, ObjectInfo, Prefix, retry

if TYPE_CHECKING:
    from .http import Login

__all__ = ["Attrs", "Backend", "BackendPool", "ObjectInfo", "Prefix", "retry"]

log = logging.getLogger(__name__)


class BackendPool:
    """One backend per bucket/container, created on first use and shared (the SDK clients are thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backends: dict[tuple[str, object], Backend] = {}
        self._s3_clients: dict[object, object] = {}  # one connection pool per S3 credentials entry
        self._login: Login | None = None  # the ClearML session's token, for every fileserver
        self._lock = threading.Lock()
        self._multipart_watch: Callable[[str, str | None], None] | None = None

    def watch_multipart(self, watch: Callable[[str, str | None], None]) -> None:
        """Give every backend, now and to come, this `Backend.multipart_watch`."""
        with self._lock:
            self._multipart_watch = watch
            for backend in self._backends.values():
                backend.multipart_watch = watch

    def get(self, url: StorageURL) -> Backend:
        """The backend for `url`'s bucket, with the credentials clearml.conf gives that URL.

        Keyed by bucket *and* credentials entry: GCS entries may differ per subdir.
        """
        creds = self._credentials(url)
        with self._lock:
            backend = self._backends.get((url.root, creds))
            if backend is None:
                backend = self._backends[(url.root, creds)] = self._create(url, creds)
                backend.multipart_watch = self._multipart_watch
            return backend

    def _credentials(self, url: StorageURL) -> object:
        if url.scheme == "s3":
            return self.settings.s3_for(url)
        if url.scheme == "azure":
            return self.settings.azure_for(url)
        if url.scheme == "gs":
            return self.settings.gcs_for(url)
        return None

    def _create(self, url: StorageURL, creds: object) -> Backend:
        # Imported lazily: a user of one provider needs none of the others' SDK import time.
        transfers, timeouts = self.settings.s3.max_multipart_concurrency, self.settings.timeouts
        if url.scheme == "s3":
            from .s3 import S3Backend

            assert isinstance(creds, S3Credentials)
            return S3Backend(creds, self.settings.s3, url.bucket, self._s3_client(creds))
        if url.scheme == "azure":
            from .azure import AzureBackend

            return AzureBackend(creds, url.bucket, max_concurrency=transfers, timeouts=timeouts)  # type: ignore[arg-type]
        if url.scheme == "gs":
            from .gcs import GCSBackend

            return GCSBackend(creds, url.bucket, max_concurrency=transfers, timeouts=timeouts)  # type: ignore[arg-type]
        if url.scheme in HTTP_SCHEMES:
            return self._http_backend(url)
        from .local import LocalBackend

        return LocalBackend()

    def _http_backend(self, url: StorageURL) -> Backend:
        """A web server's backend; every fileserver among them logs in with the one session (held here)."""
        from .http import HttpBackend, Login, file_server_hosts, session

        transfers = self.settings.s3.max_multipart_concurrency
        if self._login is None:
            where = str(self.settings.source) if self.settings.source else "clearml.conf"
            self._login = Login(self.settings.api, where, session(self.settings.api.verify), self.settings.timeouts)
        return HttpBackend(
            url.scheme, url.host, login=self._login, file_servers=file_server_hosts(self.settings.api),
            http=session(self.settings.api.storage_verify, max(8, transfers * 2)), timeouts=self.settings.timeouts,
        )

    def _s3_client(self, creds: S3Credentials) -> object:
        """The client of an S3 credentials entry, shared by every bucket it serves (creating one is slow)."""
        from .s3 import make_client

        shared = dataclasses.replace(creds, bucket="")
        if shared not in self._s3_clients:
            self._s3_clients[shared] = make_client(shared, self.settings.s3, self.settings.timeouts)
        return self._s3_clients[shared]

    def s3_bucket_names(self, creds: S3Credentials) -> list[str]:
        """Buckets an S3 credentials entry sees on its host, through the entry's shared client."""
        from .s3 import list_buckets

        with self._lock:
            client = self._s3_client(creds)
        return list_buckets(client, creds.host)

    def warm_up(self) -> None:
        """Create the clients of the configured buckets now: the SDKs take a while to load on first use."""
        s = self.settings
        urls = [f"{c.prefix}/" for c in s.s3.credentials if c.bucket]
        urls += [f"azure://{c.account_name}.blob.core.windows.net/{c.container_name}/" for c in s.azure
                 if c.container_name]
        urls += [f"{c.prefix}/" for c in s.gcs if c.bucket]
        for url in urls:
            try:
                self.get(parse_url(url))
            except ClearmlfsError as exc:  # reported when that bucket is used
                log.debug("not warming up %s: %s", url, exc)
        for entry in s.s3.credentials:
            if entry.host and not entry.bucket and (entry.has_keys or entry.use_credentials_chain):
                with self._lock:
                    self._s3_client(entry)

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            for client in self._s3_clients.values():
                client.close()  # type: ignore[attr-defined]
            self._backends.clear()
            self._s3_clients.clear()
            if self._login is not None:
                self._login.close()
                self._login = None
