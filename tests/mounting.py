"""Real clearmlfs mounts in a subprocess, for tests that act on them only through the OS.

    with mounted(conf, tmp_path / "mnt") as mnt:
        subprocess.run(["cp", src, mnt / url_to_mount_path(url)], check=True)

``mounted`` always unmounts (``clearmlfs umount``, then ``fusermount3 -u -z``), and
``no_mounts_left`` (session, autouse where imported) fails the session if a mount under pytest's temporary
folders survived anyway: a leaked FUSE mount would hang the next `ls` or `rm -rf` of /tmp.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

from clearmlfs.urls import url_to_mount_path
from tests import servers

MOUNT_TIMEOUT = 30.0
UMOUNT_TIMEOUT = 60.0  # umount uploads what is still dirty first
COMMAND_TIMEOUT = 120.0


class MountError(AssertionError):
    """The mount did not come up (or go down); the message carries the mount's log."""


def clearmlfs(*args: str | os.PathLike[str]) -> list[str]:
    """The CLI as a command line; ``-m`` so the tests need no installed entry point."""
    return [sys.executable, "-m", "clearmlfs.cli", *map(str, args)]


def mount_table() -> list[tuple[str, str, str, str]]:
    """(source, mount point, fs type, options) of every mount, with /proc's octal escapes (\\040) undone."""

    def unescape(field: str) -> str:
        return field.encode().decode("unicode_escape")

    rows = []
    for line in Path("/proc/mounts").read_text().splitlines():
        source, target, fstype, options, *_ = line.split(" ")
        rows.append((unescape(source), unescape(target), fstype, options))
    return rows


def mount_options(mountpoint: Path) -> list[str]:
    """The kernel's options of the mount at ``mountpoint`` (the last one, if stacked)."""
    found = [opts for _, target, _, opts in mount_table() if target == str(mountpoint)]
    if not found:
        raise MountError(f"{mountpoint} is not in /proc/mounts")
    return found[-1].split(",")


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """True as soon as ``condition()`` is; False at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)  # poll interval, not a readiness guess


def unmount(mountpoint: Path) -> str:
    """Unmount however possible; returns what went wrong along the way ('' when the CLI did it cleanly)."""
    if not os.path.ismount(mountpoint):
        return ""
    problems = ""
    try:
        done = subprocess.run(
            clearmlfs("umount", mountpoint), capture_output=True, text=True, timeout=UMOUNT_TIMEOUT
        )
        if done.returncode != 0:
            problems = f"clearmlfs umount exited {done.returncode}: {done.stderr.strip()}"
    except subprocess.TimeoutExpired:
        problems = f"clearmlfs umount did not finish in {UMOUNT_TIMEOUT:.0f}s"
    # The CLI may return before the kernel drops the mount; give it a moment before forcing.
    if poll(lambda: not os.path.ismount(mountpoint), 10.0):
        return problems
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)
    return problems or "needed fusermount3 -u -z"


@contextlib.contextmanager
def mounted(
    conf: Path,
    mountpoint: Path,
    *,
    foreground: bool = False,
    extra_args: Sequence[str] = (),
    log_level: str | None = None,
    check_unmount: bool = True,
) -> Iterator[Path]:
    """Mount ``conf`` at ``mountpoint`` for the block; always unmounted after it.

    ``check_unmount``: raise if the clean ``clearmlfs umount`` failed (the mount is gone either way).
    """
    # CLEARMLFS_TEST_LOG_LEVEL=debug when chasing a failure: the log is quoted in the failure message.
    log_level = log_level or os.environ.get("CLEARMLFS_TEST_LOG_LEVEL", "info")
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.mount.log"
    out = mountpoint.parent / f"{mountpoint.name}.mount.out"
    cmd = clearmlfs(
        "mount",
        "--config",
        conf,
        "--log-level",
        log_level,
        "--log-file",
        log,
        *(["-f"] if foreground else []),
        *extra_args,
        mountpoint,
    )
    process: subprocess.Popen[bytes] | None = None
    try:
        # Output to a file, never a pipe: a daemon that inherits the pipe would keep a reader waiting forever.
        with out.open("wb") as sink:
            if foreground:
                process = subprocess.Popen(
                    cmd,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                _wait_foreground(process, mountpoint, log, out)
            else:
                _run_background(cmd, sink, mountpoint, log, out)
        yield mountpoint
    finally:
        problems = unmount(mountpoint)
        if process is not None:
            problems += _reap(process)
        if problems and check_unmount and sys.exc_info()[0] is None:
            raise MountError(f"unmounting {mountpoint}: {problems}\n{_logs(log, out)}")


def _run_background(cmd: list[str], sink: IO[bytes], mountpoint: Path, log: Path, out: Path) -> None:
    try:
        done = subprocess.run(
            cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=MOUNT_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        message = f"`clearmlfs mount` did not return in {MOUNT_TIMEOUT:.0f}s"
        raise MountError(f"{message}\n{_logs(log, out)}") from None
    if done.returncode != 0:
        raise MountError(f"`clearmlfs mount` exited {done.returncode}\n{_logs(log, out)}")
    # "Returns once the mount is ready": it should already be mounted, the short poll only absorbs races.
    if not poll(lambda: os.path.ismount(mountpoint), 5.0):
        raise MountError(f"`clearmlfs mount` exited 0 but {mountpoint} is not a mount\n{_logs(log, out)}")


def _wait_foreground(process: subprocess.Popen[bytes], mountpoint: Path, log: Path, out: Path) -> None:
    if not poll(lambda: os.path.ismount(mountpoint) or process.poll() is not None, MOUNT_TIMEOUT):
        raise MountError(f"foreground mount not up after {MOUNT_TIMEOUT:.0f}s\n{_logs(log, out)}")
    if process.poll() is not None:
        raise MountError(f"foreground mount exited {process.returncode}\n{_logs(log, out)}")


def _reap(process: subprocess.Popen[bytes]) -> str:
    """A foreground mount ends by itself once unmounted; SIGTERM, then SIGKILL, if it does not."""
    try:
        process.wait(timeout=30)
        return "" if process.returncode == 0 else f"; foreground mount exited {process.returncode}"
    except subprocess.TimeoutExpired:
        servers.stop_process(process)
        return "; foreground mount still running after unmount (stopped)"


def _logs(log: Path, out: Path) -> str:
    return f"--- {out}:\n{servers.log_tail(out)}\n--- {log}:\n{servers.log_tail(log, 60)}"


def stop_foreground(process: subprocess.Popen[bytes], sig: signal.Signals, timeout: float = 60.0) -> int:
    """Send ``sig`` to a foreground mount and wait for it to exit; its exit status."""
    process.send_signal(sig)
    return process.wait(timeout=timeout)


def _processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process still there when looked at."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield int(proc.name), (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue


def daemon_pid(mountpoint: Path) -> int | None:
    """The `clearmlfs mount` process serving `mountpoint`, if alive (it uploads what is dirty after unmount)."""
    for pid, argv in _processes():
        if b"clearmlfs.cli" in argv and b"mount" in argv and os.fsencode(str(mountpoint)) in argv:
            return pid
    return None


def fetchers_of(mountpoint: Path) -> set[int]:
    """The fetcher processes of the daemon serving `mountpoint`."""
    daemon = daemon_pid(mountpoint)
    found = set()
    for pid, argv in _processes():
        try:
            if b"clearmlfs.fetcher" in argv and _parent(pid) == daemon:
                found.add(pid)
        except OSError:  # gone meanwhile
            continue
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def digest(data: bytes) -> str:
    """Contents are compared by digest: pytest would spend minutes diffing two MiB-sized values that differ."""
    return hashlib.sha256(data).hexdigest()


def resident_bytes(fd: int, size: int) -> int:
    """How much of `fd`'s first `size` bytes the page cache holds (mincore(2) of a mapping of `fd`). For a file
    in a mount: mapping an open descriptor asks the daemon nothing, and a new open could empty the cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        pages = (ctypes.c_ubyte * (size // mmap.PAGESIZE))()
        assert libc.mincore(address, size, pages) == 0, os.strerror(ctypes.get_errno())
        return sum(page & 1 for page in pages) * mmap.PAGESIZE
    finally:
        libc.munmap(address, size)


def daemon_running(mountpoint: Path) -> bool:
    return daemon_pid(mountpoint) is not None


def mounts_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve())
    targets = [target for _, target, _, _ in mount_table()]
    return [t for t in targets if t == prefix or t.startswith(prefix + "/")]


@pytest.fixture(scope="session", autouse=True)
def no_mounts_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session no mount may remain under pytest's temporary folders."""
    yield
    base = tmp_path_factory.getbasetemp()
    left = mounts_under(base)
    for target in reversed(left):  # innermost first
        subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True, timeout=30)
    assert not left, f"mounts left behind under {base} (now lazily unmounted): {left}"


def at(mnt: Path, url: str) -> Path:
    """Where `url` is inside the mount at `mnt`."""
    return mnt / url_to_mount_path(url)
