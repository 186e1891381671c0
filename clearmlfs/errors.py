"""Project exceptions, and the one table that maps them to errno.

Backends translate their SDK's exceptions into these; everything above the
backends (cache, StorageManager, the FUSE layer, the CLI) only sees these.
"""

from __future__ import annotations

import errno


class ClearmlfsError(Exception):
    """Base of every error clearmlfs raises on purpose."""


class ConfigError(ClearmlfsError):
    """clearml.conf is missing, malformed, or does not allow the request."""


class InvalidURL(ClearmlfsError):
    """A URL that names no storage clearmlfs understands."""


class NameTooLong(InvalidURL):
    """A name over 255 bytes, or an object key over its provider's limit."""


class StorageError(ClearmlfsError):
    """A storage request failed; subclasses say why."""


class NotFound(StorageError):
    """The object, prefix, bucket or container does not exist."""


class AccessDenied(StorageError):
    """The credentials were refused for this bucket or object."""


class AlreadyExists(StorageError):
    """The target exists and the operation would not replace it."""


class Transient(StorageError):
    """A failure worth retrying: throttling, 5xx, reset or timed-out connection, short body."""


class TimedOut(StorageError):
    """No answer within the time allowed (an operation's budget, or a request's timeout after its retries)."""


class Changed(StorageError):
    """The object changed on the server while a version of it was being read."""


class NoSpace(StorageError):
    """The local cache disk is full."""


class Unsupported(StorageError):
    """The operation is not supported by this storage or by clearmlfs."""


class NotEmpty(StorageError):
    """rmdir of a prefix that still holds objects."""


class CrossDevice(StorageError):
    """A rename the storage cannot do in place (a directory, across buckets): callers fall back to copying."""


class Rejected(StorageError):
    """The server refused the request as made (a 4xx other than 408 and 429): the same request cannot succeed."""


class ReadOnly(StorageError):
    """The mount is read-only."""


# Order matters: the first matching class wins, so subclasses come first.
_ERRNO: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, errno.ENOENT),
    (AccessDenied, errno.EACCES),
    (AlreadyExists, errno.EEXIST),
    (NoSpace, errno.ENOSPC),
    (Changed, errno.ESTALE),
    (TimedOut, errno.ETIMEDOUT),
    (Unsupported, errno.ENOTSUP),
    (NotEmpty, errno.ENOTEMPTY),
    (CrossDevice, errno.EXDEV),
    (ReadOnly, errno.EROFS),
    (NameTooLong, errno.ENAMETOOLONG),
    (InvalidURL, errno.EINVAL),
    (ConfigError, errno.EACCES),
    (Transient, errno.EIO),
    (StorageError, errno.EIO),
    (FileNotFoundError, errno.ENOENT),
    (PermissionError, errno.EACCES),
)


def permanent(exc: BaseException) -> bool:
    """Whether an upload that failed with `exc` cannot succeed by being tried again as it is (the bucket is
    missing, access is denied, the server rejects the key or the request), as opposed to a server that did not
    answer or answered 5xx/408/429."""
    return isinstance(exc, (Rejected, AccessDenied, NotFound, InvalidURL, Unsupported, ConfigError))


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the server could not answer (connection refused or reset, 5xx, timed out), as
    opposed to an answer that settles the question (not found, denied)."""
    return isinstance(exc, (Transient, TimedOut))


def to_errno(exc: BaseException) -> int:
    """The errno a filesystem caller should see for `exc` (EIO when nothing more precise fits)."""
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
