"""Start-up of a mount: options, wiring, the trio loop, signals, readiness. Nothing else.

`clearmlfs mount -f` runs `serve()` in the foreground; without -f the CLI starts
the same command as a detached child and returns once the mount answers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from .backends import BackendPool
from .cache import CacheContext, private_dirs
from .config import Settings, Timeouts, parse_bool, parse_size
from .errors import ConfigError
from .fetcher import Setup
from .fs.entries import Entries
from .fs.fetchers import Fetchers
from .fs.files import OpenFiles
from .fs.namespace import Namespace
from .fs.operations import Operations
from .fs.passthrough import Passthrough
from .fs.small import SmallFiles, SmallSettings
from .fs.stream import Downloads, StreamSettings
from .fs.workers import Workers
from .fs.writeback import WriteBack

log = logging.getLogger(__name__)

WARM_UP_SECONDS = 10.0
NOFILE_CAP = 1 << 20  # the soft limit asked for when the hard one is unlimited (the kernel's nr_open default)
READY_FD_ENV = "CLEARMLFS_READY_FD"  # set by a background `clearmlfs mount` for its foreground child

# mount(8)/fstab options that concern mount(8) or systemd, not us.
_IGNORED = {
    "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "dev", "nodev",
    "suid", "nosuid", "exec", "noexec", "async", "atime", "noatime", "relatime", "default_permissions",
}


@dataclass
class MountOptions:
    allow_other: bool = False
    read_only: bool = False
    config: str | None = None
    cache_dir: Path | None = None
    cache_max_bytes: int | None = None
    cache_files: int | None = None
    ttl: float = 1.0
    list_ttl: float = 10.0
    read_part_size: int = 8 * 1024 * 1024
    read_concurrency: int = 4
    read_ahead_kb: int = 4096  # the mount's bdi read-ahead: large sequential FUSE reads
    small_file_size: int = 4 * 1024 * 1024
    readahead_files: int = 32
    fetch_processes: int = 2  # helper processes fetching small files ahead (0: threads of the daemon)
    passthrough: bool = True  # the kernel reads complete cached files itself (fs/passthrough.py)
    # Unset: as clearml.conf says (its `clearmlfs` section; config.Timeouts for the defaults).
    connect_timeout: float | None = None
    read_timeout: float | None = None
    op_timeout: float | None = None
    revalidate_timeout: float | None = None
    offline: bool | None = None  # serve cached files while the server cannot say whether they are current
    cache_min_free: str | None = None  # a size or a percentage of the cache's filesystem
    rename_dir_limit: int = 10_000  # objects a folder rename moves at most: EXDEV beyond (mv then copies)
    server_times: bool = False  # S3: show the server's time, not the stored one, where that would take a HEAD
    write_part_size: int | None = None  # S3 multipart part size; unset: sdk.aws.boto3.multipart_chunksize


# Workload profiles: settings a profile gives unless an option (mount option or `clearmlfs { }`) says otherwise.
# A day stands for "the mount's life": a training job's data does not change under it.
PROFILES: dict[str, tuple[str, ...]] = {
    # Data read many times and never changed: trust attributes and listings, no revalidation on open, no HEAD
    # per file for stored times on S3, read ahead further, and fetch small files in as many helper processes
    # as a data loader has workers (4 instead of 2: a cold shuffled epoch of 5,000 files by 4 readers took
    # 11 s instead of 15, scripts/bench.py's epoch; each process holds ~50 MB while it has work).
    "training": ("ttl=86400", "list_ttl=86400", "server_times", "read_concurrency=8", "readahead_files=64",
                 "fetch_processes=4"),
    # Large files written: large upload parts; close() waits for the upload as always.
    "checkpoint": ("write_part_size=64M",),
    # Read-mostly, changed elsewhere: revalidate on every open after a second, serve the cache when offline.
    "serving": ("ttl=1", "list_ttl=10", "offline=on"),
}


def parse_options(values: list[str]) -> MountOptions:
    """`-o a,b=c` values (repeatable) → MountOptions; an unknown option is a ConfigError."""
    opts = MountOptions()
    items = [p.strip() for v in values for p in v.split(",")]
    profiles = [item for item in items if item.partition("=")[0] == "profile"]
    for item in [*(p for profile in profiles for p in _profile(profile)), *items]:
        name, _, value = item.partition("=")
        if not item or name == "profile" or name in _IGNORED or name.startswith(("x-systemd.", "comment=")):
            continue
        try:
            _apply(opts, name, value)
        except ValueError:
            raise ConfigError(f"mount option {item!r}: bad value") from None
    return opts


def _profile(item: str) -> tuple[str, ...]:
    name = item.partition("=")[2]
    if name not in PROFILES:
        raise ConfigError(f"mount option {item!r}: unknown profile (known: {', '.join(PROFILES)})")
    return PROFILES[name]


def _apply(opts: MountOptions, name: str, value: str) -> None:
    if name == "allow_other":
        opts.allow_other = True
    elif name == "ro":
        opts.read_only = True
    elif name == "config":
        opts.config = value
    elif name == "cache_dir":
        opts.cache_dir = Path(value).expanduser()
    elif name == "cache_max_bytes":
        opts.cache_max_bytes = parse_size(value)
    elif name == "cache_files":
        opts.cache_files = int(value)
    elif name == "ttl":
        opts.ttl = float(value)
    elif name == "list_ttl":
        opts.list_ttl = float(value)
    elif name == "read_part_size":
        opts.read_part_size = parse_size(value)
    elif name == "read_concurrency":
        opts.read_concurrency = max(1, int(value))
    elif name == "read_ahead_kb":
        opts.read_ahead_kb = int(value)
    elif name == "small_file_size":
        opts.small_file_size = parse_size(value)
    elif name == "readahead_files":
        opts.readahead_files = max(0, int(value))
    elif name == "fetch_processes":
        opts.fetch_processes = max(0, int(value))
    elif name == "passthrough":
        opts.passthrough = parse_bool(value)
    elif name in ("connect_timeout", "read_timeout", "op_timeout", "revalidate_timeout"):
        setattr(opts, name, float(value))
    elif name == "offline":
        opts.offline = parse_bool(value)
    elif name == "cache_min_free":
        opts.cache_min_free = value
    elif name == "rename_dir_limit":
        opts.rename_dir_limit = max(0, int(value))
    elif name == "server_times":
        opts.server_times = parse_bool(value) if value else True
    elif name == "write_part_size":
        opts.write_part_size = parse_size(value)
    else:
        raise ConfigError(
            f"unknown mount option {name!r} (known: allow_other, ro, config=, cache_dir=, cache_max_bytes=, "
            "cache_files=, ttl=, list_ttl=, read_part_size=, read_concurrency=, read_ahead_kb=, small_file_size=, "
            "readahead_files=, fetch_processes=, passthrough=on|off, connect_timeout=, read_timeout=, op_timeout=, "
            "revalidate_timeout=, offline=on|off, cache_min_free=, rename_dir_limit=, server_times, write_part_size=, "
            f"profile={'|'.join(PROFILES)})"
        )


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise ConfigError(f"mount point {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise ConfigError(f"{mountpoint} is already a mount point (unmount it first: clearmlfs umount {mountpoint})")


def with_options(settings: Settings, opts: MountOptions) -> Settings:
    """`settings` with what the mount options say instead (they win over clearml.conf)."""
    t = settings.timeouts
    timeouts = Timeouts(
        connect=opts.connect_timeout or t.connect, read=opts.read_timeout or t.read,
        operation=opts.op_timeout or t.operation, revalidate=opts.revalidate_timeout or t.revalidate,
    )
    s3 = settings.s3
    if opts.write_part_size:
        s3 = dataclasses.replace(s3, multipart_chunksize=opts.write_part_size)
    return dataclasses.replace(
        settings, timeouts=timeouts, s3=s3,
        offline_reads=settings.offline_reads if opts.offline is None else opts.offline,
        cache_min_free=settings.cache_min_free if opts.cache_min_free is None else opts.cache_min_free,
    )


@dataclass
class Filesystem:
    """Everything a mount is made of, wired together: `serve` runs it under FUSE, the fast tests without."""

    ops: Operations
    backends: BackendPool
    cache: CacheContext
    writeback: WriteBack
    downloads: Downloads
    small: SmallFiles
    fetchers: Fetchers
    passthrough: Passthrough


def build(settings: Settings, opts: MountOptions, backends: BackendPool | None = None) -> Filesystem:
    """The filesystem `settings` and `opts` describe (`backends`: where its buckets are, if not the SDKs')."""
    settings = with_options(settings, opts)
    cache_dir = opts.cache_dir or settings.cache_dir
    cache = CacheContext(
        cache_dir, "global", opts.cache_files or settings.mount_file_limit, opts.cache_max_bytes,
        settings.cache_min_free, settings.s3.max_multipart_concurrency, size_mode=settings.size_cache,
    )
    backends = backends or BackendPool(settings)
    workers = Workers(transfer_threads=max(4, settings.s3.max_multipart_concurrency), timeouts=settings.timeouts)
    entries = Entries()
    writeback = WriteBack(backends, cache, workers, entries)
    ns = Namespace(settings, backends, cache, workers, writeback, ttl=opts.ttl, list_ttl=opts.list_ttl,
                   rename_dir_limit=opts.rename_dir_limit, stored_times=not opts.server_times)
    setup = Setup(settings, cache_dir, cache.context, cache.file_limit, cache.byte_limit,
                  logging.getLevelName(logging.getLogger().getEffectiveLevel()))
    fetchers = Fetchers(setup, opts.fetch_processes)
    stream = StreamSettings(opts.read_part_size, opts.read_concurrency)
    downloads = Downloads(cache, workers, writeback, stream, fetchers)
    small = SmallFiles(ns, cache, workers, fetchers, downloads.cleaner,
                       SmallSettings(opts.small_file_size, opts.readahead_files))
    if not opts.server_times:
        ns.attrs_by_get = small.attrs_by_get
    passthrough = Passthrough(opts.passthrough, cache.folder, entries)
    files = OpenFiles(ns, cache, workers, writeback, downloads, small, passthrough, opts.read_only)
    ops = Operations(ns, files, ttl=opts.ttl)
    return Filesystem(ops, backends, cache, writeback, downloads, small, fetchers, passthrough)


async def start(fs: Filesystem, nursery: trio.Nursery) -> None:
    """Start the filesystem's background tasks in `nursery`, after learning what earlier mounts left dirty."""
    await trio.to_thread.run_sync(fs.cache.sweep_locks)  # pins a killed daemon left: links keep files alive
    await fs.writeback.load()  # before the first request: files left dirty must show as they are locally
    await fs.ops.ns.finish_renames()  # and folders renamed across a crash show whole, under one name
    await nursery.start(fs.ops.ns.run)
    await nursery.start(fs.downloads.run)
    await nursery.start(fs.small.run)
    await nursery.start(fs.fetchers.run)
    await nursery.start(fs.passthrough.run)
    nursery.start_soon(fs.writeback.run)


def serve(settings: Settings, mountpoint: Path, opts: MountOptions) -> None:
    """Mount, serve until unmounted or signalled, upload what is still dirty, unmount."""
    check_mountpoint(mountpoint)
    raise_open_file_limit()
    fs = build(settings, opts)
    fuse_options = set(pyfuse3.default_options) | {"fsname=clearmlfs", "subtype=clearmlfs"}
    fuse_options |= {"allow_other"} if opts.allow_other else set()
    fuse_options |= {"ro"} if opts.read_only else set()
    pyfuse3.init(fs.ops, str(mountpoint), fuse_options)
    try:
        trio.run(_main, fs, mountpoint, opts.read_ahead_kb)
    finally:
        pyfuse3.close(unmount=True)
        fs.backends.close()
    log.info("unmounted %s", mountpoint)


def raise_open_file_limit() -> None:
    """The soft limit on open descriptors up to the hard one: every file open in the mount holds one in the
    daemon, and the common soft limit (1,024) would fail the opens of all its users past about a thousand with
    EMFILE. (The hard limit is the administrator's: systemd's unit sets it, LimitNOFILE.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)


async def _when_answering(
    mountpoint: Path, read_ahead_kb: int, backends: BackendPool, fetchers: Fetchers, passthrough: Passthrough
) -> None:
    # stat() of the mount point is served by this very loop: from a thread, once pyfuse3.main runs.
    await trio.to_thread.run_sync(_raise_read_ahead, mountpoint, read_ahead_kb)
    await trio.to_thread.run_sync(passthrough.probe)  # the kernel's INIT is done: it can say now
    # Ready means fast: the SDK clients take ~100 ms each to create, and the fetcher processes ~0.4 s of CPU
    # each; neither on the time of the first open, nor on the CPU of the first reads (measured: they cost a
    # cold read started right after the mount 20 % of its speed).
    with trio.move_on_after(WARM_UP_SECONDS):  # a credential lookup that hangs must not hold up the mount
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetchers.prestart)
            await trio.to_thread.run_sync(backends.warm_up, abandon_on_cancel=True)
    _notify_systemd(b"READY=1")
    _notify_parent()
    log.info("mounted %s", mountpoint)


def _notify_parent() -> None:
    """Tell a `clearmlfs mount` waiting in the background (READY_FD_ENV names its pipe) that we are ready."""
    fd = os.environ.pop(READY_FD_ENV, "")
    if fd.isdigit():
        try:
            os.write(int(fd), b"ready\n")
            os.close(int(fd))
        except OSError as exc:
            log.debug("parent gone before the mount was ready: %s", exc)


def _raise_read_ahead(mountpoint: Path, kb: int) -> None:
    """Let the kernel read ahead `kb` KiB: FUSE's default (128 KiB) keeps sequential reads small.

    The kernel caps what a FUSE server may ask for at mount time, so it is set on the mount's bdi.
    """
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(kb))
    except OSError as exc:
        log.info("cannot raise read-ahead (%s): reads stay at the kernel's default size", exc.strerror)


async def _main(fs: Filesystem, mountpoint: Path, read_ahead_kb: int) -> None:
    async with trio.open_nursery() as nursery:
        await start(fs, nursery)
        nursery.start_soon(_on_signals)
        nursery.start_soon(_when_answering, mountpoint, read_ahead_kb, fs.backends, fs.fetchers, fs.passthrough)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    _notify_systemd(b"STOPPING=1")
    left = await fs.writeback.upload_pending()
    if left:
        log.error("%d file(s) could not be uploaded; they stay in the cache (`clearmlfs status` says why)", left)
    await trio.to_thread.run_sync(write_unuploaded, mountpoint, fs.cache)


def unuploaded_report(mountpoint: Path) -> Path:
    """Where a mount, as it ends, lists the files it could not upload, for `clearmlfs umount` to report."""
    folder = Path("/run/clearmlfs") if os.geteuid() == 0 else Path(f"/tmp/clearmlfs-{os.getuid()}")
    name = str(mountpoint.absolute()).strip("/").replace("/", "-") or "root"
    return folder / f"{name}.unuploaded"


def write_unuploaded(mountpoint: Path, cache: CacheContext) -> None:
    report = unuploaded_report(mountpoint)
    lines = [f"{s.url}\t{s.failed or 'not uploaded yet: retried on the next mount'}" for s in cache.dirty_entries()]
    try:
        if lines:
            private_dirs(report.parent)
            report.write_text("\n".join(lines) + "\n")
        else:
            report.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot write %s: %s", report, exc)


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting after uploads", signum)
            pyfuse3.terminate()
            return


def _notify_systemd(message: bytes) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (abstract if it starts with @)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message, address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)
