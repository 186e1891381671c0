"""Safe extraction of the archives StorageManager unpacks into the cache.

Archives come from storage anyone with write access can fill, so no entry may land outside the
extraction folder, and links, devices and FIFOs are never created. We write every entry ourselves
instead of calling ``extractall``: that keeps Python 3.10/3.11 (no tarfile ``filter``) as safe as 3.12+,
and gives every file and folder the cache's private modes (0o600 / 0o700).
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import random
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import StorageError, Unsupported

log = logging.getLogger(__name__)

_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_DRIVE = re.compile(r"^[A-Za-z]:")
# What a damaged or truncated archive raises from zipfile/tarfile and the decompressors under them.
_CORRUPT = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
    NotImplementedError,
    UnicodeDecodeError,
)
_CHUNK = 1 << 20


def archive_suffix(name: str) -> str | None:
    """The archive suffix of file `name` (lower case) when we extract such files, else None."""
    lower = name.lower()
    return next((suffix for suffix in _SUFFIXES if lower.endswith(suffix)), None)


def extract_archive(archive: Path, target: Path, *, max_bytes: int | None = None) -> None:
    """Extract `archive` into `target`, skipping (and logging) every entry that is not safe to create.

    Raises StorageError when the archive is corrupt or declares more than `max_bytes` uncompressed.
    """
    suffix = archive_suffix(archive.name)
    if suffix is None:
        raise Unsupported(f"cannot extract {archive}: not a .zip, .tar, .tar.gz or .tgz file")
    if not target.is_dir():
        target.mkdir(mode=0o700, parents=True)
        target.chmod(0o700)  # mkdir's mode is filtered by the umask
    try:
        if suffix == ".zip":
            _extract_zip(archive, target, max_bytes)
        else:
            _extract_tar(archive, target, max_bytes)
    except _CORRUPT as exc:
        raise StorageError(f"cannot extract {archive}: corrupt or unsupported archive ({exc})") from exc


def extract_once(archive: Path, target: Path, *, max_bytes: int | None = None) -> Path:
    """Extract `archive` to `target` unless a previous call (of any process) already did; return `target`.

    Extraction happens in a sibling folder renamed into place, so `target` is either absent or
    complete, never half-written, and concurrent callers agree on one result.
    """
    if target.is_dir():
        os.utime(target)  # the SDK's cache cleanup evicts by mtime: mark it as recently used
        return target
    # Same naming as the ClearML SDK, so both tools' leftovers look alike in the cache folder.
    nonce = str(random.random()).replace(".", "")
    temp = target.parent / f"{target.name}_{time.time() * 1000:.0f}_{nonce}"
    try:
        extract_archive(archive, temp, max_bytes=max_bytes)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    try:
        os.rename(temp, target)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        if not target.is_dir():
            raise
        # Another process renamed its copy into place first; theirs is as good as ours.
    return target


def _extract_zip(archive: Path, target: Path, max_bytes: int | None) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # The central directory lists every size up front, and zipfile enforces them while reading.
        _check_size(archive, sum(info.file_size for info in infos), max_bytes)
        for info in infos:
            if info.flag_bits & 0x1:
                raise Unsupported(f"cannot extract {archive}: entry {info.filename!r} is encrypted")
            # Unix zips keep st_mode in the high 16 bits; a symlink's "content" is its target.
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                _skip(archive, info.filename, "symlinks and special files are never created")
                continue
            is_dir = info.is_dir() or info.filename.endswith("\\")

            def opener(info: zipfile.ZipInfo = info) -> IO[bytes]:
                return zf.open(info)

            _extract_entry(archive, target, info.filename, is_dir, opener)


def _extract_tar(archive: Path, target: Path, max_bytes: int | None) -> None:
    declared = 0
    # "r:*" sniffs the compression, so a gzipped file named .tar still works.
    with tarfile.open(archive, "r:*") as tar:
        # Sizes are checked as we stream: a .tar.gz has no index, so reading every header first
        # would decompress the whole archive twice. extract_once discards a refused partial result.
        for member in tar:
            if member.isdir():
                _extract_entry(archive, target, member.name, True, _no_data)
            elif member.isfile():
                declared += member.size
                _check_size(archive, declared, max_bytes)

                def opener(member: tarfile.TarInfo = member) -> IO[bytes]:
                    data = tar.extractfile(member)
                    assert data is not None  # only None for non-regular members
                    return data

                _extract_entry(archive, target, member.name, False, opener)
            else:
                _skip(archive, member.name, "links and special files are never created")


def _no_data() -> IO[bytes]:
    raise AssertionError("a directory entry has no data")


def _check_size(archive: Path, declared: int, max_bytes: int | None) -> None:
    if max_bytes is not None and declared > max_bytes:
        raise StorageError(f"cannot extract {archive}: it declares more than {max_bytes} bytes uncompressed")


def _extract_entry(
    archive: Path, target: Path, name: str, is_dir: bool, opener: Callable[[], IO[bytes]]
) -> None:
    dest = _destination(target, name)
    if dest is None:
        _skip(archive, name, "its path leaves the extraction folder")
        return
    try:
        if is_dir:
            _make_private_dirs(target, dest)
            return
        _make_private_dirs(target, dest.parent)
        with opener() as src:
            _write_private_file(src, dest)
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        # e.g. both a file "a" and a file "a/b": a malformed archive, but the rest is still usable.
        _skip(archive, name, f"it clashes with another entry: {exc.strerror}")


def _destination(target: Path, name: str) -> Path | None:
    """Where entry `name` belongs inside `target`, or None when it could land anywhere else."""
    # Windows tools write backslashes as separators; treating them so also catches "..\\evil".
    posix = name.replace("\\", "/")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if posix.startswith("/") or _DRIVE.match(posix) or "\0" in posix or ".." in parts:
        return None
    dest = target.joinpath(*parts)
    # A folder already inside `target` could be a symlink to elsewhere; resolving catches that too.
    root = os.path.realpath(target)
    if os.path.commonpath([root, os.path.realpath(dest)]) != root:
        return None
    return dest


def _make_private_dirs(target: Path, path: Path) -> None:
    """Create `path` and its missing parents below `target`, each 0o700.

    os.makedirs would give the parents umask-derived modes, and the cache is private.
    """
    current = target
    for part in path.relative_to(target).parts:
        current = current / part
        try:
            current.mkdir(mode=0o700)
        except FileExistsError:
            continue
        current.chmod(0o700)  # mkdir's mode is filtered by the umask


def _write_private_file(src: IO[bytes], dest: Path) -> None:
    # O_NOFOLLOW: never write through a symlink, whoever put it there.
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o600)  # a file replaced by a later duplicate entry keeps its old mode otherwise
        shutil.copyfileobj(src, out, _CHUNK)


def _skip(archive: Path, name: str, why: str) -> None:
    log.warning("%s: skipped entry %r: %s", archive.name, name, why)
