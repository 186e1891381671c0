"""Helper processes (`clearmlfs.fetcher`) that fetch small objects ahead of a reader, and evict what such
a walk pushes out of the cache, off the daemon's GIL.

They start with the mount (each needs ~0.4 s of CPU to load the SDK, which a reader's first walk would
otherwise wait for), exit after `idle_seconds` without work, and start again when needed. Anything going
wrong with one (it cannot start, it dies, it answers garbage) fails only the fetch at hand: read-ahead is an
optimisation, and the reader's own open fetches the file in the daemon as usual.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import trio

from ..backends import ObjectInfo
from ..errors import StorageError
from ..fetcher import HEADER, Setup, frame
from .stream import TaskHost

log = logging.getLogger(__name__)

SmallResult = tuple[Path | None, ObjectInfo | None] | None  # what CacheContext.fetch_small returns
MAX_ANSWER = 1 << 20  # a path and an ObjectInfo, or an error message: far smaller


class _Process:
    """One fetcher, asked one question at a time."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.idle_since = time.monotonic()
        self.answered = 0
        self._buffer = bytearray()

    async def ask(self, request: object) -> object:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send_all(frame(request))
            (size,) = HEADER.unpack(await self._receive(HEADER.size))
            if size > MAX_ANSWER:  # out of step: not waiting for bytes that will never come
                raise pickle.UnpicklingError(f"an answer of {size} bytes")
            return pickle.loads(await self._receive(size))  # from our own child, through our own pipe
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, pickle.UnpicklingError) as exc:
            raise StorageError(f"fetcher process {self.process.pid}: {type(exc).__name__}: {exc}") from None

    async def _receive(self, size: int) -> bytes:
        assert self.process.stdout is not None
        while len(self._buffer) < size:
            data = await self.process.stdout.receive_some()
            if not data:
                raise StorageError(f"fetcher process {self.process.pid} exited (status {self.process.poll()})")
            self._buffer += data
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    async def close(self) -> None:
        with trio.move_on_after(5) as waiting:
            waiting.shield = True
            assert self.process.stdin is not None
            await self.process.stdin.aclose()  # EOF: it exits
            await self.process.wait()
        if waiting.cancelled_caught:
            self.process.kill()


class Fetchers(TaskHost):
    # -I: nothing from the environment or the current folder (perhaps inside this very mount).
    COMMAND = (sys.executable, "-I", "-m", "clearmlfs.fetcher")

    def __init__(self, setup: Setup, processes: int, idle_seconds: float = 30.0) -> None:
        self.setup, self.processes, self.idle_seconds = setup, processes, idle_seconds
        self._slots = trio.CapacityLimiter(max(1, processes))
        self._idle: list[_Process] = []
        self._failures = 0
        self._starting = 0  # started in the background by `ready`

    @property
    def available(self) -> bool:
        return self.processes > 0 and self._failures < 3 and self.nursery is not None

    def ready(self) -> bool:
        """Whether a started fetcher is idle now, to take a reader's own fetch without a wait; if none is but
        one may be, one starts in the background for the next."""
        if not self.available:
            return False
        if self._idle:
            return True
        if self._slots.available_tokens > self._starting and self.nursery is not None:
            self._starting += 1
            self.nursery.start_soon(self._start_spare)
        return False

    async def _start_spare(self) -> None:
        try:
            await self._prestart_one()
        finally:
            self._starting -= 1

    async def fetch_small(self, url: str, limit: int, known: ObjectInfo | None) -> SmallResult:
        """`CacheContext.fetch_small(url, ...)`, done by a fetcher process."""
        return cast(SmallResult, await self._call("fetch_small", url, limit, known))

    async def clean(self, headroom: float) -> None:
        """`CacheContext.clean(headroom)`, done by a fetcher process."""
        await self._call("clean", headroom)

    async def _call(self, operation: str, *args: object) -> object:
        async with self._slots:
            fetcher = self._idle.pop() if self._idle else await self._start()
            try:
                answer = await fetcher.ask((operation, args))
                if not (isinstance(answer, tuple) and len(answer) == 2 and answer[0] in ("ok", "error")):
                    raise StorageError(f"fetcher process {fetcher.process.pid}: unexpected answer")
            except BaseException as exc:
                self._discard(fetcher, exc)
                raise
            fetcher.idle_since, fetcher.answered = time.monotonic(), fetcher.answered + 1
            self._idle.append(fetcher)
        status, result = answer
        if status != "ok":
            raise StorageError(str(result))
        return result

    def _discard(self, fetcher: _Process, exc: BaseException) -> None:
        fetcher.process.kill()  # an exchange cut short leaves its pipe out of step
        if fetcher.answered == 0 and not isinstance(exc, trio.Cancelled):
            self._failures += 1  # it could not even start: a broken install is not tried forever
            log.warning("fetcher process %d failed before its first answer: %s", fetcher.process.pid, exc)
        if self.nursery is not None:
            with contextlib.suppress(RuntimeError):  # the mount is shutting down: exiting reaps it
                self.nursery.start_soon(fetcher.process.wait)

    async def prestart(self) -> None:
        """Start the fetchers now: called while the mount gets ready."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.processes):
                nursery.start_soon(self._prestart_one)

    async def _prestart_one(self) -> None:
        async with self._slots:
            try:
                fetcher = await self._start()
            except StorageError as exc:
                log.warning("%s", exc)
                return
            self._idle.append(fetcher)

    async def _start(self) -> _Process:
        try:
            process = await trio.lowlevel.open_process(
                list(self.COMMAND), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/"
            )
        except OSError as exc:
            self._failures += 1
            raise StorageError(f"cannot start a fetcher process: {exc}") from exc
        fetcher = _Process(process)
        try:
            await fetcher.ask(self.setup)  # answered once its SDK clients are ready
        except BaseException as exc:
            self._discard(fetcher, exc)
            raise
        log.debug("fetcher process %d started", process.pid)
        return fetcher

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._retire_idle)
                task_status.started()
        finally:
            self.nursery = None
            for fetcher in self._idle:
                await fetcher.close()
            self._idle.clear()

    async def _retire_idle(self) -> None:
        while True:
            await trio.sleep(self.idle_seconds / 2)
            now = time.monotonic()
            for fetcher in [f for f in self._idle if now - f.idle_since > self.idle_seconds]:
                self._idle.remove(fetcher)
                await fetcher.close()
