"""Storage backends, and the pool that hands out one backend per bucket/container."""

from __future__ import annotations

import threading

from ..config import Settings
from ..urls import StorageURL
from .base import Backend, ObjectInfo, Prefix, retry

__all__ = ["Backend", "BackendPool", "ObjectInfo", "Prefix", "retry"]


class BackendPool:
    """One backend per bucket/container, created on first use and shared (the SDK clients are thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backends: dict[tuple[str, object], Backend] = {}
        self._lock = threading.Lock()

    def get(self, url: StorageURL) -> Backend:
        """The backend for `url`'s bucket, with the credentials clearml.conf gives that URL.

        Keyed by bucket *and* credentials entry: GCS entries may differ per subdir.
        """
        creds = self._credentials(url)
        with self._lock:
            backend = self._backends.get((url.root, creds))
            if backend is None:
                backend = self._backends[(url.root, creds)] = self._create(url, creds)
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
        transfers = self.settings.s3.max_multipart_concurrency
        if url.scheme == "s3":
            from .s3 import S3Backend

            return S3Backend(creds, self.settings.s3, url.bucket)  # type: ignore[arg-type]
        if url.scheme == "azure":
            from .azure import AzureBackend

            return AzureBackend(creds, url.bucket, max_concurrency=transfers)  # type: ignore[arg-type]
        if url.scheme == "gs":
            from .gcs import GCSBackend

            return GCSBackend(creds, url.bucket, max_concurrency=transfers)  # type: ignore[arg-type]
        from .local import LocalBackend

        return LocalBackend()

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()
