"""A server that stops answering, seen through a real mount of SeaweedFS behind the fault-injecting `Proxy`.

`proxy.stall()` makes every request hang unanswered (a dead load balancer, a partitioned network). The mount
must then fail what needs the server within its op_timeout (never hang a caller), serve fully cached clean
files and cached listings from the cache (unless mounted with offline=off), and recover once the server
answers again. Every action on the mount runs as a subprocess with a timeout, so a hang fails the test
instead of blocking it, and its wall time is measured.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from clearmlfs.cache import entry_name
from tests import servers, stores
from tests.mounting import (
    at,
    clearmlfs,
    daemon_running,
    digest,
    mounted,
    no_mounts_left,  # noqa: F401 - a session fixture, used by being imported
    poll,
)
from tests.proxy import Proxy
from tests.stores import Store, conf_for, random_bytes

KIB, MIB = 1024, 1024 * 1024
UNCACHED_LIMIT = 30.0  # the default op_timeout (20 s), plus slack: what needs the server fails by then
CACHED_LIMIT = 10.0  # the default revalidate_timeout (3 s), plus slack: what is cached is served by then
STRICT_LIMIT = 15.0  # op_timeout=5 in the strict test, plus slack
RECOVERY = 30.0  # after resume(): a retry of the daemon's may still be under way
D_STATE_GRACE = 5.0  # a moment in D (disk I/O) is normal; a process stuck on the mount stays there
KILL_GRACE = 5.0  # for a command killed at its time limit to exit

_abandoned: list[subprocess.Popen[bytes]] = []  # killed, but still waiting on the mount; see run_timed


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    """A command's outcome; returncode None: still running at its time limit (then killed)."""

    returncode: int | None
    stdout: bytes
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __str__(self) -> str:
        status = "hung (killed)" if self.returncode is None else f"exit {self.returncode}"
        return f"{status} after {self.seconds:.1f}s: {self.stderr.strip()[:300]!r}"


def run_timed(cmd: Sequence[str | os.PathLike[str]], limit: float) -> Ran:
    """Run `cmd` for at most `limit` seconds, then kill it.

    Not subprocess.run: after its timeout it waits for the killed process without a bound, and a process killed
    in a FUSE request the daemon has already taken stays in D state until the daemon answers (the kernel lets
    such a request finish). That one is left to `reap_abandoned`, so a hang never blocks the test.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        [os.fspath(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        killed_at = time.monotonic() - started
        proc.kill()
        try:
            proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            _abandoned.append(proc)
        print(f"[offline] {os.fspath(cmd[0])} {Path(cmd[-1]).name}: killed after {killed_at:.1f} s")
        return Ran(None, b"", "", killed_at)
    ran = Ran(proc.returncode, out, err.decode(errors="replace"), time.monotonic() - started)
    print(f"[offline] {os.fspath(cmd[0])} {Path(cmd[-1]).name}: exit {ran.returncode} in {ran.seconds:.2f} s")
    return ran


@pytest.fixture(autouse=True)
def reap_abandoned() -> Iterator[None]:
    """Reap the commands killed while stuck on a mount: they end once it is gone, after the test."""
    yield
    while _abandoned:
        proc = _abandoned.pop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)


def put(seaweedfs: servers.SeaweedFS, store: Store, url: str, body: bytes) -> None:
    assert url.startswith(store.root + "/"), url
    seaweedfs.client().put_object(Bucket=seaweedfs.bucket, Key=url[len(store.root) + 1 :], Body=body)


def server_bytes(seaweedfs: servers.SeaweedFS, store: Store, url: str) -> bytes | None:
    client = seaweedfs.client()
    try:
        return bytes(client.get_object(Bucket=seaweedfs.bucket, Key=url[len(store.root) + 1 :])["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def cache_through(mnt: Path, cache: Path, url: str, body: bytes) -> None:
    """Read `url` through the mount, then wait until its cache entry is complete (renamed from .partially)."""
    assert digest(at(mnt, url).read_bytes()) == digest(body), f"wrong bytes read from {url}"
    entry = cache / "storage_manager" / "global" / entry_name(url)
    assert poll(entry.is_file, 30), f"{url} is not complete in the cache 30 s after it was read whole"


def check_cat(path: Path, body: bytes, limit: float) -> str:
    """'' if `cat path` gives `body` within `limit` seconds, else what went wrong."""
    ran = run_timed(["cat", path], limit)
    if not ran.ok or ran.seconds >= limit:
        return f"cat of {path.name}: {ran}"
    if digest(ran.stdout) != digest(body):
        return f"cat of {path.name}: {len(ran.stdout)} bytes, not the {len(body)} stored"
    return ""


def check_fails(cmd: Sequence[str | os.PathLike[str]], what: str, limit: float) -> str:
    """'' if `cmd` fails (non-zero exit) within `limit` seconds, else what went wrong."""
    ran = run_timed(cmd, limit)
    if ran.returncode is None or ran.seconds >= limit:
        return f"{what} did not return within {limit:.0f}s: {ran}"
    if ran.ok:
        return f"{what} succeeded while the server could not answer ({len(ran.stdout)} bytes of output)"
    return ""


def eventually_reads(path: Path, body: bytes, within: float) -> str:
    """'' once `cat path` gives `body` (polled until `within` seconds), else the last attempt's outcome."""
    last: list[str] = []

    def reads() -> bool:
        last.append(check_cat(path, body, within))
        return last[-1] == ""

    return "" if poll(reads, within, 0.5) else f"after resume: {last[-1]}"


def in_d_state(mountpoint: Path) -> list[str]:
    """Processes whose command line mentions `mountpoint` (the daemon, a leftover cat) in uninterruptible sleep."""
    needle = os.fsencode(str(mountpoint))
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile
            continue
        if needle in argv and state == "D":
            command = argv.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {command}")
    return found


def served_offline(conf: Path) -> int | None:
    """The `served offline` count of `clearmlfs cache stats`, None if it prints none."""
    done = subprocess.run(
        clearmlfs("cache", "stats", "--config", conf), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"clearmlfs cache stats exited {done.returncode}: {done.stderr}"
    found = re.search(r"served offline\D*(\d+)", done.stdout)
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------------------------------------------------
# A stalled server, default options
# ---------------------------------------------------------------------------------------------------------


def test_a_stalled_server_fails_uncached_requests_in_bounded_time_and_serves_cached_files(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    base = store.fresh_prefix()
    # The uncached object is above small_file_size (4 MiB): reading small.bin must not fetch it ahead.
    small, big, uncached = f"{base}/small.bin", f"{base}/big.bin", f"{base}/uncached.bin"
    bodies = {small: random_bytes(100 * KIB, 1), big: random_bytes(20 * MIB, 2), uncached: random_bytes(5 * MIB, 3)}
    for url, body in bodies.items():
        put(seaweedfs, store, url, body)
    unlisted = f"{base}/never-listed/deep.bin"  # a folder the mount never listed: only the server knows it
    put(seaweedfs, store, unlisted, b"deep")
    conf, cache = conf_for(tmp_path, "c", store)
    mountpoint = tmp_path / "mnt"
    problems: list[str] = []
    with mounted(conf, mountpoint) as mnt:
        for url in (small, big):
            cache_through(mnt, cache, url, bodies[url])
        # The listing is cached.
        assert sorted(os.listdir(at(mnt, base))) == ["big.bin", "never-listed", "small.bin", "uncached.bin"]
        seaweedfs_proxy.stall()
        try:
            problems += stalled_checks(mnt, base, bodies, small, big, uncached)
            problems += [p for p in [check_fails(["stat", at(mnt, unlisted)], "stat of a never listed object",
                                                 UNCACHED_LIMIT)] if p]
        finally:
            seaweedfs_proxy.resume()
        problems += recovery_checks(seaweedfs, store, mnt, tmp_path, base, uncached, bodies[uncached])
        if not poll(lambda: not in_d_state(mountpoint), D_STATE_GRACE):
            problems.append(f"processes stuck in D state on the mount: {in_d_state(mountpoint)}")
    # Read once the daemon is gone: by then whatever it counts is on disk, however often it saves it.
    assert poll(lambda: not daemon_running(mountpoint), 120, 0.2), "the daemon did not exit after unmount"
    count = served_offline(conf)
    if count is None or count < 1:
        problems.append(f"`clearmlfs cache stats` reports served offline = {count} (want >= 1)")
    assert problems == [], "\n".join(problems)


def stalled_checks(
    mnt: Path, base: str, bodies: dict[str, bytes], small: str, big: str, uncached: str
) -> list[str]:
    problems = []
    # Its name and size are in the listing cached above (one listing answers the lookups of siblings), so
    # stat may be answered without the server; it must return in bounded time, and never with a wrong size.
    ran = run_timed(["stat", "--format=%s", at(mnt, uncached)], UNCACHED_LIMIT)
    if ran.returncode is None or ran.seconds >= UNCACHED_LIMIT:
        problems.append(f"stat of the uncached object did not return within {UNCACHED_LIMIT:.0f}s: {ran}")
    elif ran.ok and ran.stdout.strip() != str(len(bodies[uncached])).encode():
        problems.append(f"stat of the uncached object gave size {ran.stdout.strip()!r}, not {len(bodies[uncached])}")
    problems.append(check_fails(["cat", at(mnt, uncached)], "cat of the uncached object", UNCACHED_LIMIT))
    problems.append(check_cat(at(mnt, small), bodies[small], CACHED_LIMIT))
    problems.append(check_cat(at(mnt, big), bodies[big], CACHED_LIMIT))
    listed = run_timed(["ls", "-1", at(mnt, base)], CACHED_LIMIT)
    names = sorted(listed.stdout.decode(errors="replace").split())
    want = ["big.bin", "never-listed", "small.bin", "uncached.bin"]
    if not listed.ok or listed.seconds >= CACHED_LIMIT or names != want:
        problems.append(f"ls of the cached listing: {listed}; names {names}")
    return [p for p in problems if p]


def recovery_checks(
    seaweedfs: servers.SeaweedFS, store: Store, mnt: Path, tmp_path: Path, base: str, uncached: str, body: bytes
) -> list[str]:
    problems = [eventually_reads(at(mnt, uncached), body, RECOVERY)]
    written, new = f"{base}/written-after.bin", random_bytes(300 * KIB, 4)
    source = tmp_path / "written-after.bin"
    source.write_bytes(new)
    copied = run_timed(["cp", source, at(mnt, written)], 60)
    if not copied.ok:
        problems.append(f"writing a new file after resume: {copied}")
    elif server_bytes(seaweedfs, store, written) != new:
        problems.append("a file written after resume (close acknowledged) is not on the server")
    return [p for p in problems if p]


# ---------------------------------------------------------------------------------------------------------
# offline=off
# ---------------------------------------------------------------------------------------------------------


def test_strict_mode_does_not_serve_cached_files_while_the_server_is_unreachable(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    url, body = f"{store.fresh_prefix()}/small.bin", random_bytes(100 * KIB, 5)
    put(seaweedfs, store, url, body)
    conf, cache = conf_for(tmp_path, "c", store)
    options = ["-o", "offline=off,revalidate_timeout=2,op_timeout=5"]
    with mounted(conf, tmp_path / "mnt", extra_args=options) as mnt:
        cache_through(mnt, cache, url, body)
        time.sleep(1.5)  # not a readiness wait: lets the 1 s attribute TTL expire, so the open must revalidate
        seaweedfs_proxy.stall()
        try:
            failed = check_fails(["cat", at(mnt, url)], "cat of a cached file with offline=off", STRICT_LIMIT)
        finally:
            seaweedfs_proxy.resume()
        assert failed == "", failed
        recovered = eventually_reads(at(mnt, url), body, RECOVERY)
        assert recovered == "", recovered
