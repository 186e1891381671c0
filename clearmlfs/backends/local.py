"""file:// URLs: the local filesystem (or an NFS mount) behind the same interface.

Keys are absolute paths, as `parse_url` gives them for file:// URLs. Uploads write a temporary
sibling and rename it, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import AccessDenied, ClearmlfsError, NoSpace, NotFound, StorageError
from .base import Attrs, Backend, ObjectInfo, Prefix, Progress


def _translate(exc: OSError, path: str) -> ClearmlfsError:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return NotFound(f"file://{path}: not found")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"file://{path}: permission denied")
    if exc.errno == 28:  # ENOSPC
        return NoSpace(f"file://{path}: no space left on device")
    return StorageError(f"file://{path}: {exc.strerror or exc}")


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    # No ETag on a plain file: size and nanosecond mtime change whenever the content does.
    etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"
    return ObjectInfo(key, st.st_size, st.st_mtime, etag, Attrs(st.st_mtime_ns, st.st_mode))


class LocalBackend(Backend):
    url_prefix = "file://"

    @staticmethod
    def _path(key: str) -> str:
        return "/" + key.lstrip("/")

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _translate(exc, path) from None
        if not os.path.isfile(path):
            raise NotFound(f"file://{path}: not a file")
        return _info(key, st)

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | Prefix]:
        folder, _, start = self._path(prefix).rpartition("/")
        try:
            entries = sorted(os.scandir(folder or "/"), key=lambda e: e.name)
        except OSError as exc:
            raise _translate(exc, folder) from None
        for entry in entries:
            if not entry.name.startswith(start):
                continue
            key = entry.path
            if entry.is_dir(follow_symlinks=True):
                if delimiter:
                    yield Prefix(key + "/")
                else:
                    yield from self.list(key + "/", None)
            elif entry.is_file():
                yield _info(key, entry.stat())

    def read(self, key: str, start: int = 0, length: int | None = None, etag: str | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read() if length is None else f.read(length)
        except OSError as exc:
            raise _translate(exc, path) from None

    def download(self, key: str, dest: Path) -> ObjectInfo:
        path = self._path(key)
        try:
            shutil.copyfile(path, dest)
            return _info(key, os.stat(path))
        except OSError as exc:
            raise _translate(exc, path) from None

    def upload(self, src: Path, key: str, progress: Progress | None = None, attrs: Attrs | None = None) -> ObjectInfo:
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".clearmlfs-")
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                if attrs is not None:
                    _apply(tmp, attrs)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return _info(key, os.stat(path))
        except OSError as exc:
            raise _translate(exc, path) from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _translate(exc, path) from None

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        return self.upload(Path(self._path(src_key)), dst_key, attrs=self.stat(src_key).attrs)

    def set_attrs(self, key: str, attrs: Attrs) -> ObjectInfo:
        path = self._path(key)
        try:
            _apply(path, attrs)
            return _info(key, os.stat(path))
        except OSError as exc:
            raise _translate(exc, path) from None


def _apply(path: str, attrs: Attrs) -> None:
    """A file's own times and mode are what a local "object" stores."""
    if attrs.mtime_ns is not None:
        os.utime(path, ns=(attrs.mtime_ns, attrs.mtime_ns))
    if attrs.mode is not None:
        os.chmod(path, stat.S_IMODE(attrs.mode))
