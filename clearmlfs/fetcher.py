"""A helper process of the mount: fetches small objects into the cache (and keeps it within its limits).

A reader walking a directory of small files turns into a stream of short GETs fetched ahead of it. Inside
the daemon, their CPU (HTTP, signing, cache bookkeeping) would compete with the FUSE requests for one
interpreter lock, and every system call of either side would hand that lock back and forth (hundreds of
futex calls per file, measured). Here they run in processes of their own: the daemon sends a URL and gets
back the cache file, exactly as `CacheContext.fetch_small` would have returned it in a thread; the cache's
own file locks keep processes from fetching the same object twice, as they do for the SDK. The evictions
such a walk causes (a scan and a few syscalls per file) are done here too.

Started by `clearmlfs.fs.fetchers` as ``python -I -m clearmlfs.fetcher``. On stdin: frames of a 4-byte
big-endian length and a pickle: first a `Setup`, then requests ``(operation, args)`` (see `OPERATIONS`).
On stdout, one answer frame each: ``("ready", None)`` once set up, then ``("ok", result)`` or
``("error", message)`` per request. EOF on stdin ends it.
"""

from __future__ import annotations

import pickle
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .backends import BackendPool, ObjectInfo
from .backends.base import deadline
from .cache import CacheContext
from .config import Settings
from .logs import setup_logging
from .urls import parse_url

HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class Setup:
    """What a fetcher needs to reach the storage and the cache exactly as the daemon does."""

    settings: Settings
    base_dir: Path
    context: str
    file_limit: int | None
    byte_limit: int | None
    log_level: str


def frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _read_frame(stream: IO[bytes]) -> Any:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return pickle.loads(stream.read(size))  # from the daemon that started us, through our own pipe


def _fetch_small(cache: CacheContext, backends: BackendPool, url: str, limit: int, known: ObjectInfo | None) -> Any:
    parsed = parse_url(url)
    return cache.fetch_small(url, backends.get(parsed), parsed.key, limit, known)


def _clean(cache: CacheContext, backends: BackendPool, headroom: float) -> int:
    return len(cache.clean(headroom))


OPERATIONS: dict[str, Callable[..., Any]] = {"fetch_small": _fetch_small, "clean": _clean}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of a foreground mount is the daemon's to handle
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers may reach the daemon's pipe
    setup: Setup = _read_frame(requests)
    setup_logging(setup.log_level, None)  # stderr: the daemon's, so its log
    backends = BackendPool(setup.settings)
    backends.warm_up()
    cache = CacheContext(
        setup.base_dir, setup.context, setup.file_limit, setup.byte_limit, setup.settings.cache_min_free,
        size_mode=setup.settings.size_cache,
    )
    answers.write(frame(("ready", None)))
    answers.flush()
    while (request := _read_frame(requests)) is not None:
        operation, args = request
        try:
            with deadline(setup.settings.timeouts.operation):  # no retry past the daemon's operation budget
                answer: tuple[str, Any] = ("ok", OPERATIONS[operation](cache, backends, *args))
        except Exception as exc:  # reported to the daemon, whose reader's own open tries again
            answer = ("error", f"{type(exc).__name__}: {exc}")
        answers.write(frame(answer))
        answers.flush()
    backends.close()


if __name__ == "__main__":
    main()
