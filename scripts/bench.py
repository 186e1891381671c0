"""clearmlfs against rclone (--vfs-cache-mode full) and s3fs-fuse over the same local SeaweedFS bucket.

    .venv/bin/python scripts/bench.py [--quick] [--runs N] [--json OUT] [--only read,ttfb,...]
                                      [--tools clearmlfs,rclone,s3fs] [--workdir DIR] [--fresh-data]

Workloads (each measured on every tool and, where one makes sense, a boto3/local baseline; the tools take
turns within a round, the order rotating between rounds; where there is a baseline, it runs the workload once
first, unmeasured, so that no tool makes the server's first run of it):

  read    cold sequential read of the big object with 1 MiB reads (dd), then a hot re-read right after
  ttfb    cold: open() to the first 1 MiB read returning
  write   copy a local file (in page cache) into the mount: until close() returns, and until the object is
          complete on the server (HEAD polled) -- rclone uploads after close, so the latter is the fair one
  ls      `ls -lR` of a prefix with many small objects, cold metadata
  small   read many 64 KiB objects one after the other, cold
  rss     peak VmRSS of the daemon and its child processes (sampled every 50 ms) while reading the stream
  walk    `find` through 3 folders of distinct objects, one after the other, the kernel's dentries dropped
          between walks: the daemon's RSS after the third walk against after the first (memory that follows
          the kernel stays level)
  rename  `mv` of a big file, then of a folder of 1,000 small objects (fresh server-side copies each run)
  epoch   a training epoch: many 100 KiB files read whole by 4 processes in a shuffled order, cold, then a
          second epoch (another order) on the same mount after the page cache is dropped
  pread   random 64 KiB preads in the big object, cold: time, per-read p50/p99, and the bytes the tool
          fetched (through the proxy: counted there; otherwise what its cache holds once it settles)
  files   2,000 distinct files held open at once, the daemon started under a soft RLIMIT_NOFILE of 1,024:
          how many opens succeed, and the descriptors the daemon holds meanwhile
  find    `find` of 100,000 objects (100 folders), cold, then again on the same mount (the kernel's dentries
          dropped in between: the daemon answers); the daemon's RSS after the second walk against the first

--latency-ms N / --bandwidth-mbs N put a proxy in front of the server for every tool and baseline: each answer
starts N ms late, each response flows at most N MB/s, as a remote object store behaves; then concurrency, not
this machine's CPU, decides.

"Cold" = the tool unmounted, its cache folder emptied, mounted again, then `sync; echo 3 > drop_caches`.
MB = 10^6 bytes. Needs root (FUSE mounts, drop_caches, apt-get) and 20 GiB free disk.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as lib  # noqa: E402 - the script's own folder is not on sys.path when run by path

MB = 1_000_000
DISK_NEEDED = 20 * lib.GiB
SUBJECTS = (*lib.TOOLS, "baseline")
GROUPS = ("read", "ttfb", "write", "ls", "small", "rss", "walk", "rename", "epoch", "pread", "files", "find")
EPOCH_PROCESSES = 4
FILES_SOFT_LIMIT = 1_024  # the common default soft RLIMIT_NOFILE, under which the daemon is started
RENAME_DIR_COUNT = 1_000
ALIASES = {"cold-read": "read", "hot-read": "read", "cold_read": "read", "hot_read": "read", "ls-lR": "ls"}


@dataclass(frozen=True)
class Sizes:
    big: int
    ls_count: int
    small_count: int
    small_size: int
    stream: int
    walk_count: int  # objects in each of the walk's 3 folders
    epoch_count: int
    pread_count: int
    find_count: int
    epoch_size: int = 100 * 1024
    pread_size: int = 64 * 1024
    files_count: int = 2_000

    @staticmethod
    def pick(quick: bool) -> Sizes:
        if quick:
            return Sizes(big=256 * lib.MiB, ls_count=1_000, small_count=200, small_size=64 * 1024, stream=lib.GiB,
                         walk_count=2_000, epoch_count=500, pread_count=200, find_count=10_000)
        return Sizes(big=lib.GiB, ls_count=10_000, small_count=2_000, small_size=64 * 1024, stream=4 * lib.GiB,
                     walk_count=20_000, epoch_count=5_000, pread_count=2_000, find_count=100_000)


def human(size: int) -> str:
    return f"{size // lib.GiB} GiB" if size % lib.GiB == 0 else f"{size // lib.MiB} MiB"


@dataclass(frozen=True)
class Metric:
    key: str
    group: str
    label: str
    unit: str
    higher_is_better: bool


def metrics(sizes: Sizes) -> list[Metric]:
    big, stream = human(sizes.big), human(sizes.stream)
    return [
        Metric("cold_read", "read", f"cold sequential read {big}", "MB/s", True),
        Metric("ttfb", "ttfb", f"time to first 1 MiB of {big}, cold", "ms", False),
        Metric("hot_read", "read", f"hot re-read {big}", "MB/s", True),
        Metric("write_server", "write", f"write {big} until on server", "MB/s", True),
        Metric("write_close", "write", f"write {big} until close()", "MB/s", True),
        Metric("ls", "ls", f"ls -lR {sizes.ls_count:,} objects, cold", "s", False),
        Metric("small", "small", f"read {sizes.small_count:,} x 64 KiB, cold", "s", False),
        Metric("rss_peak", "rss", f"peak RSS, daemon + helpers, streaming {stream}", "MB", False),
        Metric("stream_read", "rss", f"cold sequential read {stream} (the RSS run)", "MB/s", True),
        Metric("walk_rss_first", "walk", f"daemon RSS after a find of {sizes.walk_count:,} objects", "MB", False),
        Metric("walk_rss_third", "walk", f"... after 2 more of {sizes.walk_count:,} others each", "MB", False),
        Metric("walk_rss_growth", "walk", "RSS after the 3rd walk / after the 1st", "x", False),
        Metric("rename_file", "rename", f"mv of a {big} file, cold", "s", False),
        Metric("rename_dir", "rename", f"mv of a folder of {RENAME_DIR_COUNT:,} objects, cold", "s", False),
        Metric("epoch_cold", "epoch", f"epoch of {sizes.epoch_count:,} x 100 KiB, 4 processes, cold", "s", False),
        Metric("epoch_second", "epoch", "... second epoch, same mount", "s", False),
        Metric("pread", "pread", f"{sizes.pread_count:,} random 64 KiB preads in {big}, cold", "s", False),
        Metric("pread_p50", "pread", "... per pread, median", "ms", False),
        Metric("pread_p99", "pread", "... per pread, 99th percentile", "ms", False),
        Metric("pread_fetched", "pread", f"... bytes fetched (read: {sizes.pread_count * sizes.pread_size / MB:.0f})",
               "MB", False),
        Metric("files_ok", "files", f"{sizes.files_count:,} files held open, soft limit 1,024: opened", "files",
               True),
        Metric("files_fds", "files", "... descriptors the daemon holds meanwhile", "fds", False),
        Metric("find_cold", "find", f"find {sizes.find_count:,} objects, cold", "s", False),
        Metric("find_warm", "find", "... again, same mount", "s", False),
        Metric("find_rss_growth", "find", "daemon RSS after the 2nd find / after the 1st", "x", False),
    ]


@dataclass
class Results:
    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def add(self, metric: str, subject: str, value: float) -> None:
        self.runs.setdefault(metric, {}).setdefault(subject, []).append(value)

    def error(self, metric: str, subject: str, message: str) -> None:
        self.errors.setdefault(metric, {}).setdefault(subject, []).append(message)

    def median(self, metric: str, subject: str) -> float | None:
        values = self.runs.get(metric, {}).get(subject)
        return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------

# Run in a child process so the timed code is the same for every tool and nothing is cached in the bench.
TTFB_CHILD = """
import os, sys, time
t0 = time.perf_counter()
fd = os.open(sys.argv[1], os.O_RDONLY)
data = os.read(fd, 1 << 20)
t1 = time.perf_counter()
os.close(fd)
print((t1 - t0) * 1000, len(data))
"""

SMALL_CHILD = """
import os, sys, time
folder, count = sys.argv[1], int(sys.argv[2])
total = 0
t0 = time.perf_counter()
for i in range(count):
    with open(os.path.join(folder, f"{i:05d}.bin"), "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
print(time.perf_counter() - t0, total)
"""

EPOCH_CHILD = """
import os, random, sys, time
from concurrent.futures import ProcessPoolExecutor
folder, count, seed, procs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
names = [f"{i:05d}.bin" for i in range(count)]
random.Random(seed).shuffle(names)

def read(part):
    total = 0
    for name in part:
        with open(os.path.join(folder, name), "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total

if __name__ == "__main__":
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        total = sum(pool.map(read, [names[i::procs] for i in range(procs)]))
    print(time.perf_counter() - t0, total)
"""

PREAD_CHILD = """
import os, random, statistics, sys, time
path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
end = os.fstat(fd).st_size - size
rng, took = random.Random(7), []
t0 = time.perf_counter()
for _ in range(count):
    offset = rng.randrange(0, end) // 4096 * 4096
    t = time.perf_counter()
    if len(os.pread(fd, size, offset)) != size:
        sys.exit(f"short pread at {offset}")
    took.append(time.perf_counter() - t)
elapsed = time.perf_counter() - t0
took.sort()
print(elapsed, took[len(took) // 2] * 1000, took[int(len(took) * 0.99)] * 1000)
"""

# Holds `count` files open at once and counts the daemon's descriptors meanwhile.
FILES_CHILD = """
import os, resource, sys, time
folder, count, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
fds, failed = [], 0
t0 = time.perf_counter()
for i in range(count):
    try:
        fd = os.open(os.path.join(folder, f"{i:05d}.bin"), os.O_RDONLY)
        os.read(fd, 1)
        fds.append(fd)
    except OSError:
        failed += 1
elapsed = time.perf_counter() - t0
held = len(os.listdir(f"/proc/{pid}/fd"))
for fd in fds:
    os.close(fd)
print(len(fds), held, elapsed, failed)
"""


class BenchError(RuntimeError):
    """One measurement went wrong (short read, wrong listing, ...); recorded, the bench goes on."""


MEASURE_ERRORS = (BenchError, OSError, subprocess.SubprocessError)  # a failed measurement, not a failed bench


def timed(cmd: list[str], timeout: float = 3600.0) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    done = lib.run(cmd, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise BenchError(f"{cmd[0]} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return elapsed, done.stdout, done.stderr


def dd_read(path: Path, size: int) -> float:
    """Seconds to read ``path`` with 1 MiB reads; checks the byte count dd reports."""
    elapsed, _, err = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    copied = [line for line in err.splitlines() if "bytes" in line]
    if not copied or int(copied[-1].split()[0]) != size:
        raise BenchError(f"dd read {copied[-1] if copied else err.strip()!r}, expected {size} bytes")
    return elapsed


class Bench:
    def __init__(self, args: argparse.Namespace, info: Any, tools: dict[str, lib.Tool], sizes: Sizes,
                 proxy: Any = None, direct: Any = None) -> None:
        self.args = args
        self.info = info
        self.tools = tools
        self.sizes = sizes
        self.proxy = proxy  # tests.proxy.Proxy every tool and baseline talks through, in latency mode
        self.client = lib.bench_client(info)  # the baselines' client: through the proxy if there is one
        self.admin = lib.bench_client(direct or info)  # data set-up and checks, never slowed down
        self.bucket = info.bucket
        self.results = Results()
        self.local_src = args.workdir / "local" / f"src-{sizes.big}.bin"
        self.keys = {
            "big": f"bench/big-{sizes.big}.bin",
            "stream": f"bench/stream-{sizes.stream}.bin",
            "ls": f"bench/ls-{sizes.ls_count}/",
            "small": f"bench/small-{sizes.small_count}x{sizes.small_size}/",
            "walk": f"bench/walk-3x{sizes.walk_count}/",
            "epoch": f"bench/epoch-{sizes.epoch_count}x{sizes.epoch_size}/",
            "files": f"bench/files-{sizes.files_count}/",
            "find": f"bench/find-{sizes.find_count}/",
        }

    # --- data -----------------------------------------------------------------------------------------

    def prepare_data(self, groups: list[str]) -> None:
        s, c, b = self.sizes, self.admin, self.bucket
        steps: list[tuple[str, Callable[[], bool]]] = []
        if {"read", "ttfb", "pread"} & set(groups):
            steps.append((f"{human(s.big)} object", lambda: lib.ensure_object(c, b, self.keys["big"], s.big)))
        if {"read", "write"} & set(groups):
            steps.append((f"local {human(s.big)} file", lambda: lib.ensure_local_file(self.local_src, s.big) or True))
        if "rss" in groups:
            steps.append((f"{human(s.stream)} object",
                          lambda: lib.ensure_object(c, b, self.keys["stream"], s.stream)))
        if "ls" in groups:
            many = [f"{i:05d}.bin" for i in range(s.ls_count)]
            steps.append((f"{s.ls_count:,} small objects",
                          lambda: lib.ensure_many(c, b, self.keys["ls"], many, 256)))
        if "small" in groups:
            small = [f"{i:05d}.bin" for i in range(s.small_count)]
            steps.append((f"{s.small_count:,} x 64 KiB objects",
                          lambda: lib.ensure_many(c, b, self.keys["small"], small, s.small_size)))
        if "walk" in groups:
            names = [f"{i // 1000:02d}/{i:05d}.bin" for i in range(s.walk_count)]  # 1,000 a folder
            for w in range(3):
                steps.append((f"walk folder {w}: {s.walk_count:,} objects",
                              lambda w=w: lib.ensure_many(c, b, f"{self.keys['walk']}{w}/", names, 16)))
        if "epoch" in groups:
            epoch = [f"{i:05d}.bin" for i in range(s.epoch_count)]
            steps.append((f"{s.epoch_count:,} x 100 KiB objects",
                          lambda: lib.ensure_many(c, b, self.keys["epoch"], epoch, s.epoch_size)))
        if "files" in groups:
            held = [f"{i:05d}.bin" for i in range(s.files_count)]
            steps.append((f"{s.files_count:,} x 4 KiB objects",
                          lambda: lib.ensure_many(c, b, self.keys["files"], held, 4096)))
        if "find" in groups:
            found = [f"{i // 1000:03d}/{i:06d}.bin" for i in range(s.find_count)]
            steps.append((f"{s.find_count:,} objects in {s.find_count // 1000} folders",
                          lambda: lib.ensure_many(c, b, self.keys["find"], found, 16)))
        for label, step in steps:
            t0 = time.perf_counter()
            made = step()
            note = f"created in {time.perf_counter() - t0:.1f}s" if made else "already there"
            log(f"data: {label}: {note}")

    # --- one measurement per (group, subject) -------------------------------------------------------

    def measure(self, group: str, subject: str) -> dict[str, float]:
        if subject == "baseline":
            return getattr(self, f"baseline_{group}")()
        tool = self.tools[subject]
        return getattr(self, f"tool_{group}")(tool)

    def tool_read(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        path = tool.path(self.keys["big"])
        cold = dd_read(path, self.sizes.big)
        hot = dd_read(path, self.sizes.big)
        return {"cold_read": self.sizes.big / MB / cold, "hot_read": self.sizes.big / MB / hot}

    def tool_ttfb(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        _, out, _ = timed([sys.executable, "-c", TTFB_CHILD, str(tool.path(self.keys["big"]))])
        ms, got = out.split()
        if int(got) <= 0:
            raise BenchError("first read returned no data")
        return {"ttfb": float(ms)}

    def tool_write(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        lib.warm_page_cache(self.local_src)
        key = f"bench-write-{tool.name}-{uuid.uuid4().hex[:8]}.bin"
        size = self.sizes.big
        try:
            t0 = time.perf_counter()
            timed(["dd", f"if={self.local_src}", f"of={tool.path(key)}", "bs=1M"])
            closed = time.perf_counter() - t0
            if not lib.poll(lambda: lib.object_size(self.admin, self.bucket, key) == size, 1800.0):
                raise BenchError(f"{key} not complete on the server 30 min after close")
            on_server = time.perf_counter() - t0
        finally:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=key)
        return {"write_close": size / MB / closed, "write_server": size / MB / on_server}

    def tool_ls(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        elapsed, out, _ = timed(["ls", "-lR", str(tool.path(self.keys["ls"].rstrip("/")))])
        files = sum(1 for line in out.splitlines() if line.startswith("-"))
        if files != self.sizes.ls_count:
            raise BenchError(f"ls -lR showed {files} files, expected {self.sizes.ls_count}")
        return {"ls": elapsed}

    def tool_small(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        folder = tool.path(self.keys["small"].rstrip("/"))
        _, out, _ = timed([sys.executable, "-c", SMALL_CHILD, str(folder), str(self.sizes.small_count)])
        seconds, total = out.split()
        if int(total) != self.sizes.small_count * self.sizes.small_size:
            raise BenchError(f"read {total} bytes, expected {self.sizes.small_count * self.sizes.small_size}")
        return {"small": float(seconds)}

    def tool_rss(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        if tool.pid is None:
            raise BenchError("daemon process not found in /proc")
        with lib.RssSampler(tool.pid) as sampler:
            elapsed = dd_read(tool.path(self.keys["stream"]), self.sizes.stream)
        if sampler.samples == 0:
            raise BenchError(f"no RSS sample of pid {tool.pid}")
        return {"rss_peak": sampler.peak / MB, "stream_read": self.sizes.stream / MB / elapsed}

    def tool_rename(self, tool: lib.Tool) -> dict[str, float]:
        """`mv` of a big file and of a folder of small objects, each a fresh copy (on the server) made for the run."""
        c, b = self.admin, self.bucket
        base = f"bench/rename-{tool.name}-{uuid.uuid4().hex[:8]}"
        c.copy({"Bucket": b, "Key": self.keys["big"]}, b, f"{base}/big.bin")
        lib.ensure_many(c, b, f"{base}/dir/", [f"{i:04d}.bin" for i in range(RENAME_DIR_COUNT)], 1024)
        try:
            tool.fresh()
            file_seconds, _, _ = timed(["mv", str(tool.path(f"{base}/big.bin")), str(tool.path(f"{base}/moved.bin"))])
            dir_seconds, _, _ = timed(["mv", str(tool.path(f"{base}/dir")), str(tool.path(f"{base}/moved"))])
            if lib.object_size(c, b, f"{base}/moved.bin") != self.sizes.big:
                raise BenchError(f"{base}/moved.bin is not the {self.sizes.big} bytes renamed")
            if lib.count_keys(c, b, f"{base}/moved/") < RENAME_DIR_COUNT:
                raise BenchError(f"{base}/moved/ does not hold the {RENAME_DIR_COUNT} objects renamed")
        finally:
            lib.delete_prefix(c, b, f"{base}/")
        return {"rename_file": file_seconds, "rename_dir": dir_seconds}

    def tool_walk(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        if tool.pid is None:
            raise BenchError("daemon process not found in /proc")
        rss = []
        for w in range(3):
            _, out, _ = timed(["find", str(tool.path(self.keys["walk"] + str(w))), "-type", "f"])
            if len(out.splitlines()) != self.sizes.walk_count:
                raise BenchError(f"find showed {len(out.splitlines())} files, expected {self.sizes.walk_count}")
            rss.append(lib.settled_rss(tool.pid))
            lib.drop_dentries()
        return {"walk_rss_first": rss[0] / MB, "walk_rss_third": rss[2] / MB, "walk_rss_growth": rss[2] / rss[0]}

    def tool_epoch(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        cold = self._epoch(tool.path(self.keys["epoch"].rstrip("/")), seed=1)
        lib.drop_caches()  # the dataset outgrows the page cache; the tool's own cache must serve it
        second = self._epoch(tool.path(self.keys["epoch"].rstrip("/")), seed=2)
        return {"epoch_cold": cold, "epoch_second": second}

    def _epoch(self, folder: Path, seed: int) -> float:
        count = self.sizes.epoch_count
        _, out, _ = timed([sys.executable, "-c", EPOCH_CHILD, str(folder), str(count), str(seed),
                           str(EPOCH_PROCESSES)])
        seconds, total = out.split()
        if int(total) != count * self.sizes.epoch_size:
            raise BenchError(f"an epoch read {total} bytes, expected {count * self.sizes.epoch_size}")
        return float(seconds)

    def tool_pread(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        before = self.proxy.bytes_sent() if self.proxy else 0
        _, out, _ = timed([sys.executable, "-c", PREAD_CHILD, str(tool.path(self.keys["big"])),
                           str(self.sizes.pread_count), str(self.sizes.pread_size)])
        seconds, p50, p99 = (float(x) for x in out.split())
        # What the tool goes on fetching after the last pread counts too: wait until it stops.
        if self.proxy:
            fetched = lib.settled(lambda: self.proxy.bytes_sent()) - before
        else:
            fetched = lib.settled(lambda: lib.disk_usage(tool.cache_dir))
        return {"pread": seconds, "pread_p50": p50, "pread_p99": p99, "pread_fetched": fetched / MB}

    def tool_files(self, tool: lib.Tool) -> dict[str, float]:
        tool.unmount()
        tool.clear_cache()
        tool.soft_nofile = FILES_SOFT_LIMIT
        try:
            tool.mount()
        finally:
            tool.soft_nofile = None
        if tool.pid is None:
            raise BenchError("daemon process not found in /proc")
        _, out, _ = timed([sys.executable, "-c", FILES_CHILD, str(tool.path(self.keys["files"].rstrip("/"))),
                           str(self.sizes.files_count), str(tool.pid)])
        opened, held, _, _ = out.split()
        return {"files_ok": float(opened), "files_fds": float(held)}

    def tool_find(self, tool: lib.Tool) -> dict[str, float]:
        tool.fresh()
        if tool.pid is None:
            raise BenchError("daemon process not found in /proc")
        cold = self._find(tool.path(self.keys["find"].rstrip("/")))
        first = lib.settled_rss(tool.pid)
        lib.drop_dentries()
        warm = self._find(tool.path(self.keys["find"].rstrip("/")))
        second = lib.settled_rss(tool.pid)
        return {"find_cold": cold, "find_warm": warm, "find_rss_growth": second / first}

    def _find(self, folder: Path) -> float:
        elapsed, out, _ = timed(["find", str(folder), "-type", "f"])
        if len(out.splitlines()) != self.sizes.find_count:
            raise BenchError(f"find showed {len(out.splitlines())} files, expected {self.sizes.find_count}")
        return elapsed

    # Baselines: boto3 with clearml.conf's implied TransferConfig, and the local page cache.

    def baseline_epoch(self) -> dict[str, float]:
        """boto3 get_object of the same shuffled files, 4 threads (the GIL is released while waiting)."""
        names = [f"{i:05d}.bin" for i in range(self.sizes.epoch_count)]
        random.Random(1).shuffle(names)
        clients = [lib.bench_client(self.info) for _ in range(EPOCH_PROCESSES)]

        def read(i: int) -> int:
            return sum(len(clients[i].get_object(Bucket=self.bucket, Key=self.keys["epoch"] + n)["Body"].read())
                       for n in names[i::EPOCH_PROCESSES])

        lib.drop_caches()
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(EPOCH_PROCESSES) as pool:
            total = sum(pool.map(read, range(EPOCH_PROCESSES)))
        elapsed = time.perf_counter() - t0
        if total != self.sizes.epoch_count * self.sizes.epoch_size:
            raise BenchError(f"read {total} bytes")
        return {"epoch_cold": elapsed}

    def baseline_pread(self) -> dict[str, float]:
        """Ranged GETs of exactly the bytes read: the floor for time and bytes fetched."""
        size, count, key = self.sizes.pread_size, self.sizes.pread_count, self.keys["big"]
        rng, took = random.Random(7), []
        lib.drop_caches()
        t0 = time.perf_counter()
        for _ in range(count):
            offset = rng.randrange(0, self.sizes.big - size) // 4096 * 4096
            t = time.perf_counter()
            body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
            if len(body["Body"].read()) != size:
                raise BenchError(f"short ranged GET at {offset}")
            took.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
        took.sort()
        return {"pread": elapsed, "pread_p50": took[len(took) // 2] * 1000,
                "pread_p99": took[int(len(took) * 0.99)] * 1000, "pread_fetched": count * size / MB}

    def baseline_find(self) -> dict[str, float]:
        lib.drop_caches()
        t0 = time.perf_counter()
        count = lib.count_keys(self.client, self.bucket, self.keys["find"])
        elapsed = time.perf_counter() - t0
        if count != self.sizes.find_count:
            raise BenchError(f"listed {count} keys, expected {self.sizes.find_count}")
        return {"find_cold": elapsed}

    def baseline_read(self) -> dict[str, float]:
        target = self.args.workdir / "local" / "download.bin"
        target.unlink(missing_ok=True)
        lib.drop_caches()
        try:
            t0 = time.perf_counter()
            self.client.download_file(self.bucket, self.keys["big"], str(target), Config=lib.transfer_config())
            cold = time.perf_counter() - t0
        finally:
            target.unlink(missing_ok=True)
        lib.warm_page_cache(self.local_src)
        hot = dd_read(self.local_src, self.sizes.big)
        return {"cold_read": self.sizes.big / MB / cold, "hot_read": self.sizes.big / MB / hot}

    def baseline_ttfb(self) -> dict[str, float]:
        client = lib.bench_client(self.info)  # a new connection, as a fresh open() has
        lib.drop_caches()
        t0 = time.perf_counter()
        body = client.get_object(Bucket=self.bucket, Key=self.keys["big"])["Body"]
        data = body.read(lib.MiB)
        elapsed = time.perf_counter() - t0
        body.close()
        if not data:
            raise BenchError("first read returned no data")
        return {"ttfb": elapsed * 1000}

    def baseline_write(self) -> dict[str, float]:
        lib.drop_caches()
        lib.warm_page_cache(self.local_src)
        key = f"bench-write-boto3-{uuid.uuid4().hex[:8]}.bin"
        try:
            t0 = time.perf_counter()
            self.client.upload_file(str(self.local_src), self.bucket, key, Config=lib.transfer_config())
            elapsed = time.perf_counter() - t0
        finally:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=key)
        return {"write_server": self.sizes.big / MB / elapsed}

    def baseline_ls(self) -> dict[str, float]:
        lib.drop_caches()
        t0 = time.perf_counter()
        count = lib.count_keys(self.client, self.bucket, self.keys["ls"])
        elapsed = time.perf_counter() - t0
        if count != self.sizes.ls_count:
            raise BenchError(f"listed {count} keys, expected {self.sizes.ls_count}")
        return {"ls": elapsed}

    def baseline_small(self) -> dict[str, float]:
        lib.drop_caches()
        prefix, total = self.keys["small"], 0
        t0 = time.perf_counter()
        for i in range(self.sizes.small_count):
            total += len(self.client.get_object(Bucket=self.bucket, Key=f"{prefix}{i:05d}.bin")["Body"].read())
        elapsed = time.perf_counter() - t0
        if total != self.sizes.small_count * self.sizes.small_size:
            raise BenchError(f"read {total} bytes")
        return {"small": elapsed}

    # --- the loop -------------------------------------------------------------------------------------

    def run(self, groups: list[str]) -> None:
        all_metrics = metrics(self.sizes)
        for group in groups:
            subjects = [t for t in self.tools] + (["baseline"] if hasattr(self, f"baseline_{group}") else [])
            group_metrics = [m.key for m in all_metrics if m.group == group]
            if "baseline" in subjects:
                self.warm_up(group)
            for run in range(self.args.runs):
                shift = run % len(subjects)
                for subject in subjects[shift:] + subjects[:shift]:
                    self.measure_once(group, subject, run, group_metrics)

    def warm_up(self, group: str) -> None:
        """One unmeasured baseline run of `group` first. The server's first run of a workload tends to be its
        slowest, whoever makes it (clearmlfs's first write was the slowest of its three in every full run without
        this), and with three rounds of four subjects the rotation hands that run to the first tool every time."""
        try:
            values = self.measure(group, "baseline")
        except MEASURE_ERRORS as exc:
            log(f"[{group} warm-up] baseline: error: {exc}")
            return
        log(f"[{group} warm-up] baseline (not counted): {_summary(values)}")

    def measure_once(self, group: str, subject: str, run: int, group_metrics: list[str]) -> None:
        if subject in self.results.unavailable:
            return
        tag = f"[{group} {run + 1}/{self.args.runs}] {subject}"
        try:
            values = self.measure(group, subject)
        except lib.Unavailable as exc:
            self.results.unavailable[subject] = f"mount failed: {exc}"
            log(f"{tag}: n/a ({exc})")
            return
        except MEASURE_ERRORS as exc:
            for key in group_metrics:
                self.results.error(key, subject, str(exc))
            log(f"{tag}: error: {exc}")
            return
        finally:
            if subject in self.tools:
                problem = self.tools[subject].unmount()
                if problem:
                    log(f"{tag}: unmount: {problem}")
        for key, value in values.items():
            self.results.add(key, subject, value)
        log(f"{tag}: {_summary(values)}")


def _summary(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in values.items())


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(results: Results, sizes: Sizes, groups: list[str], tools: list[str]) -> tuple[str, dict[str, Any]]:
    header = ["workload", "unit", *SUBJECTS, "cmfs/best peer", "cmfs/baseline"]
    rows, medians = [], {}
    for m in metrics(sizes):
        if m.group not in groups:
            continue
        med = {s: results.median(m.key, s) for s in SUBJECTS}
        medians[m.key] = med
        peers = [v for s, v in med.items() if s in ("rclone", "s3fs") and v is not None]
        best = (max(peers) if m.higher_is_better else min(peers)) if peers else None
        cells = [fmt(med[s]) if s in tools or s == "baseline" else "-" for s in SUBJECTS]
        arrow = "higher better" if m.higher_is_better else "lower better"
        rows.append([m.label, f"{m.unit} ({arrow})", *cells, ratio(med["clearmlfs"], best),
                     ratio(med["clearmlfs"], med["baseline"])])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines), medians


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run, 256 MiB / 1,000 / 200 objects, 1 GiB stream")
    parser.add_argument("--runs", type=int, help="runs per workload and tool (default 3; 1 with --quick)")
    parser.add_argument("--json", type=Path, help="raw values + medians (default WORKDIR/results.json)")
    parser.add_argument("--only", help=f"comma-separated workloads out of {','.join(GROUPS)}")
    parser.add_argument("--tools", default="clearmlfs,rclone,s3fs",
                        help=f"comma-separated, out of {','.join(lib.TOOLS)}")
    parser.add_argument("--workdir", type=Path, default=lib.REPO / ".bench",
                        help="server data, caches, mounts, logs (default .bench/)")
    parser.add_argument("--fresh-data", action="store_true", help="wipe the server data kept from earlier runs")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="latency mode: a proxy in front of the server delays every answer by this much")
    parser.add_argument("--bandwidth-mbs", type=float, default=0.0,
                        help="latency mode: ... and caps each response at this many MB/s (0: no cap)")
    args = parser.parse_args(argv)
    args.workdir = args.workdir.absolute()
    args.runs = args.runs or (1 if args.quick else 3)
    args.json = args.json or args.workdir / "results.json"
    groups = [ALIASES.get(g.strip(), g.strip()) for g in (args.only or ",".join(GROUPS)).split(",") if g.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for name, given, known in (("workload", groups, GROUPS), ("tool", tools, tuple(lib.TOOLS))):
        bad = [g for g in given if g not in known]
        if bad:
            parser.error(f"unknown {name} {bad} (known: {', '.join(known)})")
    args.groups = [g for g in GROUPS if g in groups]
    args.tool_names = [t for t in lib.TOOLS if t in tools]
    return args


def preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        sys.exit("bench.py needs root: FUSE mounts for three tools, drop_caches, apt-get")
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < DISK_NEEDED:
        sys.exit(f"bench.py needs {DISK_NEEDED // lib.GiB} GiB free under {args.workdir}; "
                 f"{free / lib.GiB:.1f} GiB are")
    try:
        lib.drop_caches()
    except OSError as exc:
        sys.exit(f"cannot drop the page cache ({exc}); cold numbers would be meaningless")
    if not Path("/dev/fuse").exists():
        sys.exit("/dev/fuse is missing")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight(args)
    scrubbed = lib.scrub_environment()
    sizes = Sizes.pick(args.quick)
    if args.fresh_data:
        shutil.rmtree(args.workdir / "seaweed", ignore_errors=True)
    versions: dict[str, str] = {}
    settings: dict[str, dict[str, str]] = {}
    started = time.time()
    bench: Bench | None = None
    server = None
    tools: dict[str, lib.Tool] = {}
    with contextlib.ExitStack() as cleanup, lib.sigterm_as_interrupt():
        try:
            log(f"starting SeaweedFS under {args.workdir / 'seaweed'}")
            server, master = lib.start_seaweedfs(args.workdir / "seaweed")
            cleanup.callback(server.stop)
            cleanup.callback(lib.vacuum, master)  # runs before the server stops
            log(lib.vacuum(master) or "vacuumed deleted objects left by earlier runs")
            versions["weed"] = lib.weed_version()
            info, proxy = server.info, None
            if args.latency_ms or args.bandwidth_mbs:
                proxy = lib.latency_proxy(server.info.endpoint, args.latency_ms / 1000, args.bandwidth_mbs * MB)
                cleanup.callback(proxy.stop)
                info = dataclasses.replace(server.info, endpoint=proxy.url, host=proxy.host)
                versions["proxy"] = f"{args.latency_ms:g} ms to first byte, {args.bandwidth_mbs:g} MB/s per response"
            unavailable = {}
            for name in args.tool_names:
                tool = lib.TOOLS[name](name, args.workdir, info)
                try:
                    versions[name] = tool.prepare()
                except lib.Unavailable as exc:
                    unavailable[name] = str(exc)
                    log(f"{name}: n/a ({exc})")
                    continue
                settings[name] = tool.settings
                tools[name] = tool
                cleanup.callback(tool.unmount)  # unmounts and waits for the daemon, whatever happens
                tool.unmount()  # a mount left by an interrupted earlier run
            for name, version in versions.items():
                log(f"version: {name}: {version}")
            bench = Bench(args, info, tools, sizes, proxy=proxy, direct=server.info)
            bench.results.unavailable.update(unavailable)
            bench.prepare_data(args.groups)
            bench.run(args.groups)
        except KeyboardInterrupt:
            log("interrupted: unmounting and stopping the server")
            args.interrupted = True
            if bench is None:
                return 130
        finally:
            for tool in tools.values():
                with contextlib.suppress(Exception):
                    tool.unmount()
                    tool.clear_cache()  # GiBs of cached copies; the server data is kept for the next run
    assert bench is not None
    results = bench.results
    text, medians = table(results, sizes, args.groups, args.tool_names)
    print()
    partial = " -- INTERRUPTED, partial results" if getattr(args, "interrupted", False) else ""
    print(f"clearmlfs bench: {args.runs} run(s) each, medians; {'--quick' if args.quick else 'full'} sizes; "
          f"{time.time() - started:.0f}s{partial}")
    print(text)
    print("\nratios: clearmlfs / faster peer (or / baseline), in the row's unit: for 'higher better' rows > 1 means "
          "clearmlfs wins, for 'lower better' rows < 1 does.")
    print("baseline: read = boto3 download_file to a local file (cold) / dd of a local file in page cache (hot); "
          f"ttfb = boto3 get_object + read 1 MiB; write = boto3 upload_file; ls = list_objects_v2 pages; "
          f"small = get_object loop; epoch = get_object, {EPOCH_PROCESSES} threads; pread = ranged GETs of "
          f"the bytes read; find = list_objects_v2 pages; boto3 TransferConfig max_concurrency {lib.CONCURRENCY}, "
          f"{lib.PART_MIB} MiB parts (clearml.conf defaults)")
    for name, version in versions.items():
        print(f"version  {name}: {version}")
    for name, conf in settings.items():
        for key, value in conf.items():
            print(f"setting  {name} {key}: {value}")
    for name, reason in results.unavailable.items():
        print(f"n/a      {name}: {reason}")
    for metric, by_subject in results.errors.items():
        for subject, messages in by_subject.items():
            print(f"error    {metric} {subject} ({len(messages)}x): {messages[-1][:300]}")
    if scrubbed:
        print(f"ignored from the environment: {', '.join(sorted(scrubbed))}")
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": dataclasses.asdict(sizes),
        "units": {m.key: m.unit for m in metrics(sizes)},
        "versions": versions, "settings": settings,
        "runs": results.runs, "medians": medians, "errors": results.errors, "unavailable": results.unavailable,
        "started": started, "seconds": time.time() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"raw values: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
