"""Plumbing for scripts/bench.py: a clean environment, SeaweedFS with room for big objects, the three mounts
(clearmlfs, rclone, s3fs) behind one small interface, page-cache dropping, daemon RSS sampling, and the
bench data set in the bucket.

Nothing here measures; bench.py decides what is timed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import servers, stores  # noqa: E402 - needs the repository on sys.path first
from tests.mounting import poll  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
VENV_BIN = Path(sys.executable).parent
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 120.0  # a daemon may still be uploading what was written
EXIT_TIMEOUT = 120.0

# The transfer settings clearml.conf's defaults imply (sdk.aws.boto3.max_multipart_concurrency: 16, boto3's
# 8 MiB parts); the boto3 baselines use them, and the peers get the same parallelism and part size.
CONCURRENCY = 16
PART_MIB = 8


class Unavailable(RuntimeError):
    """A tool could not be installed, started or mounted; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------

_SCRUB_PREFIXES = ("AWS_", "RCLONE_", "CLEARML_", "TRAINS_", "S3FS")
_SCRUB_NAMES = {
    "http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "BOTO_CONFIG",
}


def scrub_environment() -> list[str]:
    """Drop the caller's AWS/rclone/ClearML settings, proxies and CA bundles from this process (and so from
    every subprocess): the bench talks only to its own local server with its own keys. Returns the names."""
    gone = [
        name for name in os.environ
        if name.upper().startswith(_SCRUB_PREFIXES) or name.lower() in _SCRUB_NAMES or name in _SCRUB_NAMES
    ]
    for name in gone:
        del os.environ[name]
    return gone


def run(cmd: list[str], timeout: float = 1800.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def drop_dentries() -> None:
    """`echo 2 > /proc/sys/vm/drop_caches`: the kernel forgets the dentries and inodes it can (FORGET to FUSE)."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def settled_rss(pid: int, quiet: float = 0.5, limit: float = 10.0) -> int:
    """VmRSS of `pid` once it has not changed for `quiet` seconds (or after `limit`): a walk's last replies and
    the FORGETs after it are handled by then."""
    deadline, last, since = time.monotonic() + limit, rss_bytes(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.05)
        now = rss_bytes(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def disk_usage(folder: Path) -> int:
    """Bytes allocated under `folder` (holes in sparse files excluded), as `du` counts them."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def settled(measure: Callable[[], int], quiet: float = 2.0, limit: float = 300.0) -> int:
    """`measure()` once it has not changed for `quiet` seconds (at most `limit` seconds from now)."""
    deadline = time.monotonic() + limit
    last, since = measure(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = measure()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def drop_caches() -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches` (root only; bench.py checks once up front)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# ---------------------------------------------------------------------------------------------------------
# Processes found through /proc
# ---------------------------------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def alive(pid: int) -> bool:
    """Running and not a zombie (a daemon re-parented to a PID 1 that never reaps stays a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def find_daemon(match: Callable[[list[str]], bool]) -> int | None:
    """The newest live process whose argv satisfies ``match``."""
    found = [pid for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()) if match(_cmdline(pid))]
    found = [pid for pid in found if alive(pid)]
    return max(found) if found else None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and its child processes (clearmlfs's fetcher processes count as the daemon's memory;
    pages they share with it are counted twice, so this errs high)."""
    children = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    total = rss_bytes(pid)  # (children are listed by the thread that started them)
    for child in children:
        with contextlib.suppress(OSError):
            total += tree_rss_bytes(int(child))
    return total


class RssSampler:
    """Samples the VmRSS of a process and its children every ``interval`` seconds on a thread; ``peak`` in
    bytes."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, tree_rss_bytes(self.pid))
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------
# SeaweedFS
# ---------------------------------------------------------------------------------------------------------


def start_seaweedfs(workdir: Path) -> tuple[servers.Running[servers.SeaweedFS], str]:
    """tests.servers.start_seaweedfs, with two differences the bench needs: the log stays in the bench dir
    (not tests/.logs, which a concurrent test run owns), and volumes are large enough for GiB objects
    (the tests' 64 MB x 100 volumes hold 6.4 GB at most, less than the bench writes). Also returns the
    master's URL, for ``vacuum``."""
    servers.LOG_DIR = workdir / "logs"
    weed = servers.require_binary(servers.VENV_BIN / "weed")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "identities.json"
    config.write_text(json.dumps(servers.seaweed_identities(), indent=2))
    ports = servers.free_ports(8)
    cmd = servers.seaweed_command(weed, data, config, ports)
    cmd = [arg for arg in cmd if not arg.startswith(("-master.volumeSizeLimitMB=", "-volume.max="))]
    cmd += ["-master.volumeSizeLimitMB=1024", "-volume.max=64"]
    with servers.started("seaweedfs", cmd, workdir) as (process, log_path):
        info = servers.SeaweedFS(
            endpoint=f"http://127.0.0.1:{ports[0]}",
            host=f"127.0.0.1:{ports[0]}",
            admin=servers.SEAWEED_ADMIN,
            key_a=servers.SEAWEED_KEY_A,
            key_b=servers.SEAWEED_KEY_B,
            bucket=servers.TEST_BUCKET,
            log_path=log_path,
        )
        port = ports[0]
        servers.wait_until("seaweedfs", process, log_path, lambda: servers.http_answers("127.0.0.1", port))
        admin = info.client()
        servers.wait_until(
            "seaweedfs", process, log_path, lambda: servers.create_s3_buckets(admin, [servers.TEST_BUCKET])
        )
        servers.wait_until("seaweedfs", process, log_path, lambda: servers.probe_s3_write(admin, info.bucket))
    running = servers.Running("seaweedfs", process, log_path, info, stop_grace=1.0)
    return running, f"http://127.0.0.1:{ports[2]}"


def vacuum(master: str) -> str:
    """Reclaim the space of deleted objects now: SeaweedFS only marks them, and every write run deletes a
    GiB-sized object (without this the data folder grows by ~12 GiB per full run). '' or what failed."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{master}/vol/vacuum?garbageThreshold=0.01", timeout=600) as reply:
            reply.read()
    except OSError as exc:
        return f"vacuum failed: {exc}"
    return ""


def weed_version() -> str:
    done = run([str(servers.VENV_BIN / "weed"), "version"], timeout=30)
    return (done.stdout.strip().splitlines() or ["?"])[0]


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART_MIB * MiB, multipart_chunksize=PART_MIB * MiB, max_concurrency=CONCURRENCY
    )


def bench_client(info: servers.SeaweedFS) -> Any:
    """boto3 client with a connection pool large enough for the transfer threads."""
    return servers.s3_client(
        info.endpoint, *info.admin, max_pool_connections=64, read_timeout=300, retries={"max_attempts": 5}
    )


# ---------------------------------------------------------------------------------------------------------
# Data set
# ---------------------------------------------------------------------------------------------------------


class RandomStream(io.RawIOBase):
    """``size`` random bytes as a readable stream, so a 4 GiB object needs no 4 GiB local file."""

    def __init__(self, size: int, block: int = 4 * MiB) -> None:
        self.left = size
        self.block = os.urandom(block)  # one random block, rotated: incompressible enough and fast

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.left)
        offset = self.left % len(self.block)
        done = 0
        while done < n:
            take = min(n - done, len(self.block) - offset)
            view[done:done + take] = self.block[offset:offset + take]
            done += take
            offset = 0
        self.left -= n
        return n


def object_size(client: Any, bucket: str, key: str) -> int | None:
    try:
        return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except client.exceptions.ClientError:
        return None


def ensure_object(client: Any, bucket: str, key: str, size: int) -> bool:
    """Upload ``size`` random bytes to ``key`` unless an object of that size is there. True if uploaded."""
    if object_size(client, bucket, key) == size:
        return False
    client.upload_fileobj(
        io.BufferedReader(RandomStream(size), buffer_size=PART_MIB * MiB), bucket, key, Config=transfer_config()
    )
    return True


def delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    """Every object under ``prefix`` deleted (a thousand a request)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def count_keys(client: Any, bucket: str, prefix: str) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(page.get("KeyCount", 0) for page in pages)


def ensure_many(client: Any, bucket: str, prefix: str, names: list[str], size: int) -> bool:
    """``names`` under ``prefix``, each ``size`` random bytes, created by a thread pool unless all exist."""
    if count_keys(client, bucket, prefix) == len(names):
        return False

    def put(name: str) -> None:
        client.put_object(Bucket=bucket, Key=prefix + name, Body=os.urandom(size))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for _ in pool.map(put, names):
            pass
    return True


def ensure_local_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = RandomStream(size)
    with path.open("wb") as out:
        shutil.copyfileobj(io.BufferedReader(stream, buffer_size=8 * MiB), out, 8 * MiB)


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass


# ---------------------------------------------------------------------------------------------------------
# The mounts
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Tool:
    """One FUSE implementation mounted over the bench bucket. ``fresh()`` is the cold state: unmounted,
    its cache emptied, mounted again, page cache dropped."""

    name: str
    workdir: Path
    info: servers.SeaweedFS
    settings: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    soft_nofile: int | None = None  # start the daemon under this soft RLIMIT_NOFILE (its hard limit unchanged)

    @property
    def mountpoint(self) -> Path:
        return self.workdir / "mnt" / self.name

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache" / self.name

    @property
    def log_file(self) -> Path:
        return self.workdir / "logs" / f"{self.name}.log"

    def path(self, key: str) -> Path:
        """Where the bucket's ``key`` appears in the mount."""
        return self.mountpoint / key

    def prepare(self) -> str:
        """Install/configure if needed; returns the version string. Raises Unavailable."""
        raise NotImplementedError

    def mount_command(self) -> list[str]:
        raise NotImplementedError

    def is_daemon(self, argv: list[str]) -> bool:
        raise NotImplementedError

    def unmount_command(self) -> list[str]:
        tool = shutil.which("fusermount3") or shutil.which("fusermount") or "umount"
        return [tool, "-u", str(self.mountpoint)] if "fusermount" in tool else [tool, str(self.mountpoint)]

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(self.mountpoint):
            raise Unavailable(f"{self.mountpoint} is already a mount")
        limit = ["prlimit", f"--nofile={self.soft_nofile}:"] if self.soft_nofile else []
        with (self.workdir / "logs" / f"{self.name}.out").open("ab") as out:
            proc = subprocess.Popen(
                [*limit, *self.mount_command()], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        # The commands return once mounted (or daemonise); either way the mount table is the judge.
        ok = poll(lambda: os.path.ismount(self.mountpoint) or (proc.poll() not in (None, 0)), MOUNT_TIMEOUT)
        if not ok or not os.path.ismount(self.mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            raise Unavailable(f"{self.name} did not mount (exit {proc.poll()}): {self.log_tail()}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=MOUNT_TIMEOUT)
        found = poll(lambda: find_daemon(self.is_daemon) is not None, 10.0)
        self.pid = find_daemon(self.is_daemon) if found else None

    def unmount(self) -> str:
        """Unmount and wait for the daemon to exit; returns what needed force ('' when clean)."""
        problems = ""
        if os.path.ismount(self.mountpoint):
            done = run(self.unmount_command(), timeout=UMOUNT_TIMEOUT)
            if not poll(lambda: not os.path.ismount(self.mountpoint), UMOUNT_TIMEOUT):
                problems = f"unmount failed ({done.stderr.strip()}); lazily unmounted"
                run(["fusermount3", "-u", "-z", str(self.mountpoint)], timeout=30)
        pid, self.pid = self.pid, None
        if pid is not None and not poll(lambda: not alive(pid), EXIT_TIMEOUT):
            problems += f"; daemon {pid} still running after unmount (killed)"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if poll(lambda: not alive(pid), 10.0):
                    break
        return problems.strip("; ")

    def fresh(self) -> None:
        self.unmount()
        self.clear_cache()
        self.mount()
        drop_caches()

    def log_tail(self) -> str:
        tails = [servers.log_tail(p, 15) for p in (self.log_file, self.workdir / "logs" / f"{self.name}.out")]
        return " | ".join(t.replace("\n", " / ") for t in tails if t != "(no log)")[-1500:]


class Clearmlfs(Tool):
    def prepare(self) -> str:
        exe = VENV_BIN / "clearmlfs"
        if not exe.exists():
            raise Unavailable(f"{exe} missing (run scripts/setup.sh)")
        # One per tool: each clearmlfs variant has its own cache folder, which its clearml.conf names.
        self.conf = self.workdir / "conf" / f"{self.name}.conf"
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        stores.write_conf(self.conf, self.cache_dir, stores.seaweed_store(self.info))
        self.conf.chmod(0o600)
        self.settings = {
            "config": "clearml.conf: one host entry (secure: false, multipart: true); boto3 defaults "
                      "(max_multipart_concurrency 16); mount options default",
            "cache": str(self.cache_dir),
        }
        done = run([str(exe), "--version"], timeout=60)
        version = (done.stdout or done.stderr).strip()
        if done.returncode != 0 or not version:
            version = run([sys.executable, "-c", "import clearmlfs; print(clearmlfs.__version__)"]).stdout.strip()
        return f"clearmlfs {version}".replace("clearmlfs clearmlfs", "clearmlfs")

    def path(self, key: str) -> Path:
        return self.mountpoint / "s3" / self.info.host / self.info.bucket / key

    def mount_command(self) -> list[str]:
        return [str(VENV_BIN / "clearmlfs"), "mount", "--config", str(self.conf), "--log-file", str(self.log_file),
                str(self.mountpoint)]

    def unmount_command(self) -> list[str]:
        return [str(VENV_BIN / "clearmlfs"), "umount", str(self.mountpoint)]

    def is_daemon(self, argv: list[str]) -> bool:
        return "-f" in argv and "mount" in argv and str(self.mountpoint) in argv and any(
            "clearmlfs" in a for a in argv[:3])

    def clear_cache(self) -> None:
        # The ClearML cache folder and clearmlfs's state beside it; the log lives outside on purpose.
        for sub in ("storage_manager", "clearmlfs"):
            shutil.rmtree(self.cache_dir / sub, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)


def apt_install(packages: list[str]) -> str:
    """``apt-get install -y``; ``apt-get update`` first only if the plain install fails. '' or the error."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    done = run(cmd, timeout=900, env=env)
    if done.returncode != 0:
        run(["apt-get", "update", "-q"], timeout=900, env=env)
        done = run(cmd, timeout=900, env=env)
    return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["apt-get failed"])[-1]


def ensure_binary(name: str, package: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    problem = apt_install([package])
    found = shutil.which(name)
    if not found:
        raise Unavailable(f"{name} not installed (apt-get install {package}: {problem or 'no binary after install'})")
    return found


class Rclone(Tool):
    def prepare(self) -> str:
        self.exe = ensure_binary("rclone", "rclone")
        self.conf = self.workdir / "conf" / "rclone.conf"
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        key, secret = self.info.admin
        self.conf.write_text(
            "[bench]\ntype = s3\nprovider = Other\n"
            f"endpoint = {self.info.endpoint}\naccess_key_id = {key}\nsecret_access_key = {secret}\n"
            f"upload_concurrency = {CONCURRENCY}\nchunk_size = {PART_MIB}Mi\n"
        )
        self.conf.chmod(0o600)
        self.settings = {
            "flags": "--vfs-cache-mode full --vfs-write-back 0s (upload right after close instead of 5 s later); "
                     "other VFS settings default (read chunks 128Mi, buffer 16Mi, dir cache 5m)",
            "s3": f"provider Other, path-style, upload_concurrency {CONCURRENCY}, chunk_size {PART_MIB}Mi",
            "cache": str(self.cache_dir),
        }
        done = run([self.exe, "version"], timeout=60)
        return (done.stdout.strip().splitlines() or ["rclone ?"])[0]

    def mount_command(self) -> list[str]:
        return [
            self.exe, "mount", f"bench:{self.info.bucket}", str(self.mountpoint),
            "--config", str(self.conf), "--vfs-cache-mode", "full", "--vfs-write-back", "0s",
            "--cache-dir", str(self.cache_dir), "--daemon", "--log-file", str(self.log_file), "--log-level", "NOTICE",
        ]

    def is_daemon(self, argv: list[str]) -> bool:
        return bool(argv) and argv[0].endswith("rclone") and "mount" in argv and str(self.mountpoint) in argv


class S3fs(Tool):
    def prepare(self) -> str:
        self.exe = ensure_binary("s3fs", "s3fs")
        self.passwd = self.workdir / "conf" / "s3fs.passwd"
        self.passwd.parent.mkdir(parents=True, exist_ok=True)
        self.passwd.write_text("{}:{}\n".format(*self.info.admin))
        self.passwd.chmod(0o600)
        self.settings = {
            "options": f"use_cache={self.cache_dir} (a local disk cache like the other two), use_path_request_style, "
                       f"parallel_count={CONCURRENCY}, multipart_size={PART_MIB} (MB); others default",
            "cache": str(self.cache_dir),
        }
        done = run([self.exe, "--version"], timeout=60)
        return (done.stdout.strip().splitlines() or ["s3fs ?"])[0]

    def mount_command(self) -> list[str]:
        opts = [
            f"url={self.info.endpoint}", "use_path_request_style", f"passwd_file={self.passwd}",
            f"use_cache={self.cache_dir}", f"parallel_count={CONCURRENCY}", f"multipart_size={PART_MIB}",
            f"logfile={self.log_file}", "dbglevel=warn",
        ]
        return [self.exe, self.info.bucket, str(self.mountpoint), *[x for o in opts for x in ("-o", o)]]

    def is_daemon(self, argv: list[str]) -> bool:
        return bool(argv) and argv[0].endswith("s3fs") and str(self.mountpoint) in argv


class ClearmlfsServerTimes(Clearmlfs):
    """clearmlfs with `-o server_times`: S3 files show Last-Modified, not their stored times (no HEAD each)."""

    def prepare(self) -> str:
        version = super().prepare()
        self.settings["config"] = self.settings["config"].replace("mount options default", "-o server_times")
        return version

    def mount_command(self) -> list[str]:
        return [*super().mount_command()[:-1], "-o", "server_times", str(self.mountpoint)]


class ClearmlfsTraining(Clearmlfs):
    """clearmlfs with `-o profile=training`: the dataset is taken as unchanging for the mount's life."""

    def prepare(self) -> str:
        version = super().prepare()
        self.settings["config"] = self.settings["config"].replace("mount options default", "-o profile=training")
        return version

    def mount_command(self) -> list[str]:
        return [*super().mount_command()[:-1], "-o", "profile=training", str(self.mountpoint)]


TOOLS: dict[str, type[Tool]] = {
    "clearmlfs": Clearmlfs, "clearmlfs-server-times": ClearmlfsServerTimes, "clearmlfs-training": ClearmlfsTraining,
    "rclone": Rclone, "s3fs": S3fs,
}


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so every finally runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def latency_proxy(upstream: str, first_byte_delay: float, rate: float) -> Any:
    """A proxy in front of the server that answers `first_byte_delay` s late and sends each response body at
    `rate` bytes/s at most (0: no cap), as a remote object store does."""
    from tests.proxy import Proxy

    proxy = Proxy(upstream)
    proxy.first_byte_delay, proxy.rate = first_byte_delay, rate
    return proxy.start()
