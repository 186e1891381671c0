"""Every `clearmlfs` command.

Exit status: 0 success, 1 a storage operation failed, 2 bad configuration or usage.
Errors are one line on stderr, never a traceback (``--log-level debug`` shows more).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import __version__
from .config import S3Credentials, Settings, load_settings
from .errors import ClearmlfsError, ConfigError, InvalidURL
from .logs import private_log, setup_logging
from .storage_manager import StorageManager
from .urls import mount_path_to_url, url_to_mount_path

log = logging.getLogger("clearmlfs")

EXIT_FAILED = 1
EXIT_CONFIG = 2


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    _warn_if_readable(settings)
    StorageManager.configure(settings=settings)
    return settings


def cmd_config(args: argparse.Namespace) -> int:
    """Print what clearml.conf configures, and where each setting comes from (never a secret)."""
    s = _settings(args)
    for line in describe(s):
        print(line)
    from .fs.passthrough import capabilities

    print(f"capabilities: {capabilities()}")
    return 0


def describe(s: Settings) -> list[str]:
    """`clearmlfs config`'s lines: each setting, then [where it came from]: a file and key, an environment
    variable, or the default. Secrets are said to be set, never shown."""
    o = s.origins
    files = ", ".join(str(p) for p in s.sources) or "none found (defaults and environment)"
    d = s.s3.default
    auth = "credentials chain" if d.use_credentials_chain else ("key/secret" if d.has_keys else "no key/secret")
    lines = [
        f"config files: {files}",
        f"cache: {s.cache_dir} [{o.get('cache_dir', 'default')}], file limit {s.cache_file_limit} "
        f"[{o.get('cache_file_limit', 'default')}]"
        + (" (not applied: size-aware cache)" if s.size_cache else "" if s.cache_file_limit_set
           else " (the API's; the mount counts no files: bytes and free space decide)"),
        _size_cache(s),
        f"s3 (buckets without an entry): {auth} [key: {o.get('s3.key', 'default')}], region "
        f"{d.region or 'from boto3'} [{o.get('s3.region', 'default')}]{', http' if not d.secure else ''}"
        + _upload_args(d),
    ]
    for c in s.s3.credentials:
        auth = "key/secret" if c.has_keys else ("credentials chain" if c.use_credentials_chain else "NO KEY/SECRET")
        lines.append(f"s3: {c.prefix} [{auth}{', http' if c.host and not c.secure else ''}{_upload_args(c)}] "
                     f"[{c.origin}]")
    for a in s.azure:
        own = next((e for e in s.azure_own if e.account_name == a.account_name
                    and e.container_name in ("", a.container_name)), None)
        endpoint = (own.endpoint if own else "") or a.account_url
        added = f" [endpoint: {own.origin}]" if own else ""
        lines.append(f"azure: {a.account_name}/{a.container_name or '*'} at {endpoint} [{a.origin}]{added}")
    lines.append(f"gs (buckets without an entry): {_gcs_auth(s.gcs_default.credentials_json)} "
                 f"[{o.get('gs.credentials_json', 'default')}]")
    for g in s.gcs:
        lines.append(f"gs: {g.prefix} {_gcs_auth(g.credentials_json)} [{g.origin}]")
    applied = "applied (size-aware cache)" if s.size_cache else "not applied: file:// is read in place"
    lines.append(f"direct access: {', '.join(s.direct_access) or 'none'}, {applied} [{o.get('direct_access')}]")
    api = s.api
    lines.append(f"api: {api.api_server or 'no server'} [{o.get('api.api_server', 'default')}], key pair "
                 f"{'set' if api.access_key and api.secret_key else 'not set'} [{o.get('api.credentials', 'default')}]")
    t = s.timeouts
    lines.append(f"timeouts: connect {t.connect:g} s [{o.get('timeouts.connect', 'default')}], read {t.read:g} s "
                 f"[{o.get('timeouts.read', 'default')}], operation {t.operation:g} s, revalidate {t.revalidate:g} s;"
                 f" offline reads {'on' if s.offline_reads else 'off'}")
    return lines


def _size_cache(s: Settings) -> str:
    """The SDK's size-aware cache mode: off, or on with its limits."""
    o = {name[len("size_cache."):]: origin for name, origin in s.origins.items() if name.startswith("size_cache.")}
    c = s.size_cache
    if c is None:
        return f"size-aware cache: off [{o.get('mode', 'default')}]"
    return (f"size-aware cache: on [{o.get('mode', 'default')}], max used {_bytes(c.max_used_bytes)} "
            f"[{o.get('max_used_bytes', 'default')}], min free {_bytes(c.min_free_bytes)} "
            f"[{o.get('min_free_bytes', 'default')}], margin {c.cleanup_margin:.0%} "
            f"[{o.get('cleanup_margin_percent', 'default')}], files used within {c.cleanup_seconds_threshold:g} s "
            f"kept [{o.get('cleanup_seconds_threshold', 'default')}]")


def _bytes(limit: int) -> str:
    return f"{limit} bytes" if limit > 0 else "no limit"


def _upload_args(c: S3Credentials) -> str:
    return f", upload args {', '.join(sorted(c.upload_args))}" if c.extra_args else ""  # (names: a value may be a key)


def _gcs_auth(credentials_json: str) -> str:
    if not credentials_json:
        return "application default credentials"
    return "inline JSON key" if credentials_json.lstrip().startswith("{") else f"key file {credentials_json}"


def cmd_get(args: argparse.Namespace) -> int:
    """Fetch URL into the managed cache (progress bar on a terminal); print the local path."""
    _settings(args)
    with _download_progress(args.url):
        local = StorageManager.get_local_copy(args.url, extract_archive=not args.no_extract)
    if local is None:
        print(f"clearmlfs: cannot fetch {args.url} (see the warning above)", file=sys.stderr)
        return EXIT_FAILED
    if args.dest:
        local = _copy_out(Path(local), Path(args.dest), args.url)
    print(local)
    return 0


def _copy_out(local: Path, dest: Path, url: str) -> str:
    if local.is_dir():
        shutil.copytree(local, dest, dirs_exist_ok=True)
        return str(dest)
    target = dest / url.rstrip("/").rsplit("/", 1)[-1] if dest.is_dir() else dest
    shutil.copyfile(local, target)
    return str(target)


@contextlib.contextmanager
def _download_progress(url: str) -> Iterator[None]:
    """A tqdm bar fed by the growing download files, when stderr is a terminal; nothing otherwise."""
    if not sys.stderr.isatty() or url.startswith("file://"):
        yield
        return
    from tqdm import tqdm

    from .cache import DEFAULT_CONTEXT, CacheContext

    total = StorageManager.get_file_size_bytes(url, silence_errors=True)
    settings = StorageManager.settings()
    entry = CacheContext(settings.cache_dir, DEFAULT_CONTEXT, size_mode=settings.size_cache).path_for(url)
    done = threading.Event()
    # A fresh pty may report a 0×0 terminal, where tqdm would draw nothing.
    size = shutil.get_terminal_size((80, 24))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name.split(".", 1)[-1],
               file=sys.stderr, ncols=size.columns or 80, nrows=size.lines or 24)

    def watch() -> None:
        while not done.wait(0.2):
            bar.update(_partial_bytes(entry) - bar.n)
        if total:
            bar.update(total - bar.n)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        bar.close()


def _partial_bytes(entry: Path) -> int:
    total = 0
    for path in entry.parent.glob(f"{entry.name}_*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def cmd_put(args: argparse.Namespace) -> int:
    _settings(args)
    print(StorageManager.upload_file(args.file, args.url))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """stats / prune / clear of the managed cache (the `global` context the mount uses)."""
    from .cache import DEFAULT_CONTEXT, SERVED_OFFLINE, CacheContext

    settings = _settings(args)
    cache = CacheContext(
        settings.cache_dir, DEFAULT_CONTEXT, settings.mount_file_limit, min_free=settings.cache_min_free,
        size_mode=settings.size_cache,
    )
    if args.action == "stats":
        files, size = cache.stats()
        dirty = cache.dirty_entries()
        limit = "none (bytes and free space decide)" if cache.file_limit is None else cache.file_limit
        print(f"folder: {cache.folder}\nfiles: {files}\nbytes: {size}\nfile limit: {limit}")
        partial, partial_size = cache.partial_stats()
        print(f"partial copies (ranges of objects read at random): {partial}, {partial_size} bytes on disk")
        print(f"kept free on its disk: {cache.min_free}")
        print(f"served offline: {cache.counters().get(SERVED_OFFLINE, 0)} (opens of cached files the server could "
              "not confirm)")
        failed = [s for s in dirty if s.failed]
        print(f"dirty (not yet uploaded): {len(dirty)}")
        for state in dirty:
            print(f"  {state.url}")
        print(f"failed (refused by the server, not retried): {len(failed)}")
        return 0
    if args.action in ("retry", "discard"):
        if not args.url:
            raise InvalidURL(f"`clearmlfs cache {args.action}` needs the URL of a file not uploaded")
        waiting = cache.state(args.url)
        if waiting is None or not waiting.dirty:
            print(f"clearmlfs: {args.url} has nothing waiting to be uploaded", file=sys.stderr)
            return EXIT_FAILED
        if args.action == "retry":
            cache.retry(args.url)
            print(f"{args.url}: will be uploaded again by the mount (within 30 s) or at the next mount")
        else:
            cache.forget(args.url)
            print(f"{args.url}: dropped from the cache; the server's object is as it was")
        return 0
    if args.action == "prune":
        cache.byte_limit = args.max_bytes
        print(f"evicted {len(cache.clean())} entries")
        return 0
    dirty = cache.dirty_entries()
    if dirty and not args.force:
        print(f"clearmlfs: {len(dirty)} cached file(s) are not uploaded yet; --force drops them too", file=sys.stderr)
        return EXIT_FAILED
    print(f"removed {len(cache.clear(include_dirty=args.force))} entries")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Every file of the cache not uploaded yet, with what it is waiting for and since when."""
    from .cache import DEFAULT_CONTEXT, CacheContext

    settings = _settings(args)
    cache = CacheContext(settings.cache_dir, DEFAULT_CONTEXT, settings.cache_file_limit, size_mode=settings.size_cache)
    pending = cache.pending_report()
    if not pending:
        print("every file is uploaded")
        return 0
    for what, url, since, reason in pending:
        line = f"{what:<9} {_age(time.time() - since):>6}  {url}"
        print(f"{line}  ({reason})" if reason else line)
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def cmd_path(args: argparse.Namespace) -> int:
    """The path of URL inside a clearmlfs mount."""
    mountpoint = Path(args.mountpoint) if args.mountpoint else _only_mount()
    print(mountpoint / url_to_mount_path(args.url))
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    """The URL of a path inside a clearmlfs mount."""
    path = Path(args.path).absolute()
    for mountpoint in _clearmlfs_mounts():
        if path == mountpoint or mountpoint in path.parents:
            print(mount_path_to_url(str(path.relative_to(mountpoint))))
            return 0
    raise InvalidURL(f"{path} is not inside a clearmlfs mount")


def _clearmlfs_mounts() -> list[Path]:
    found = []
    with open("/proc/self/mounts") as table:
        for line in table:
            source, target, fstype = line.split()[:3]
            if fstype == "fuse.clearmlfs" or (fstype.startswith("fuse") and source == "clearmlfs"):
                found.append(Path(_unescape_mount(target)))
    return found


def _unescape_mount(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _only_mount() -> Path:
    mounts = _clearmlfs_mounts()
    if len(mounts) != 1:
        raise InvalidURL(f"{len(mounts)} clearmlfs mounts found; name one with --mountpoint")
    return mounts[0]


def cmd_ls(args: argparse.Namespace) -> int:
    _settings(args)
    names = StorageManager.list(args.url, return_full_path=True)
    if names is None:
        return EXIT_FAILED
    for name in names:
        print(name)
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount every configured bucket at MOUNTPOINT (foreground with -f; else return once it answers)."""
    from . import mount

    config = args.config or mount.parse_options(args.options).config
    loaded = load_settings(config)
    opts = mount.parse_options([*loaded.mount_defaults, *args.options])  # the given ones win
    mountpoint = Path(args.mountpoint).absolute()
    settings = mount.with_options(loaded, opts)  # (checks them, too)
    _warn_if_readable(settings)  # (the background child warns again into the log)
    mount.check_mountpoint(mountpoint)
    if args.foreground:
        mount.serve(settings, mountpoint, opts)
        return 0
    return _mount_in_background(args, settings, mountpoint)


def _warn_if_readable(settings: Settings) -> None:
    for source in settings.sources:
        if source.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; it holds credentials (chmod 600 it)", source)


def _mount_in_background(args: argparse.Namespace, settings: Settings, mountpoint: Path) -> int:

    log_file = Path(args.log_file) if args.log_file else _default_log(settings, mountpoint)
    cmd = [sys.executable, "-m", "clearmlfs.cli", "mount", "-f", "--log-level", args.log_level,
           "--log-file", str(log_file), str(mountpoint)]
    # (Two home files are merged: the child, with the same environment, finds them itself.)
    cmd += ["--config", str(settings.source)] if len(settings.sources) == 1 else []
    cmd += [f"-o{o}" for o in args.options]
    from .mount import READY_FD_ENV

    ready_read, ready_write = os.pipe()
    env = {**os.environ, READY_FD_ENV: str(ready_write)}
    with open(private_log(log_file), "ab") as out:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                 pass_fds=(ready_write,), env=env)
    os.close(ready_write)
    try:
        return _wait_ready(child, ready_read, mountpoint, log_file)
    finally:
        os.close(ready_read)


def _wait_ready(child: subprocess.Popen[bytes], ready_read: int, mountpoint: Path, log_file: Path) -> int:
    """Return once the child says it is ready (or exits: then say why)."""

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([ready_read], [], [], 0.05)[0]:
            if os.read(ready_read, 64) and os.path.ismount(mountpoint):
                return 0
        if child.poll() is not None:
            print(f"clearmlfs: mount failed: {_last_line(log_file)} (log: {log_file})", file=sys.stderr)
            return EXIT_FAILED
    child.terminate()
    print(f"clearmlfs: mount did not become ready within 60 s (log: {log_file})", file=sys.stderr)
    return EXIT_FAILED


def _default_log(settings: Settings, mountpoint: Path) -> Path:
    from .cache import private_dirs

    folder = settings.cache_dir / "clearmlfs" / "logs"
    private_dirs(folder)
    return folder / f"{str(mountpoint).strip('/').replace('/', '-') or 'root'}.log"


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount, then wait for the daemon to finish uploading what is dirty and exit; exit 1 naming the files it
    could not upload."""
    from .mount import unuploaded_report

    mountpoint = Path(args.mountpoint).absolute()
    if not os.path.ismount(mountpoint):
        print(f"clearmlfs: {mountpoint} is not mounted", file=sys.stderr)
        return EXIT_FAILED
    daemons = _daemons_of(mountpoint)
    report = unuploaded_report(mountpoint)
    report.unlink(missing_ok=True)  # (an earlier mount's)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"clearmlfs: cannot unmount {mountpoint}: {proc.stderr.strip()}", file=sys.stderr)
        return EXIT_FAILED
    deadline, told = time.monotonic() + 15 * 60, False
    while (alive := [pid for pid in daemons if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        if not told and time.monotonic() > deadline - 15 * 60 + 2:
            print("clearmlfs: waiting for pending uploads to finish...", file=sys.stderr)
            told = True
        time.sleep(0.1)
    if alive:
        print(f"clearmlfs: the daemon (pid {alive[0]}) is still uploading; its log says more", file=sys.stderr)
        return EXIT_FAILED
    return _report_unuploaded(report)


def _report_unuploaded(report: Path) -> int:
    """Name the files the mount could not upload (they stay in its cache: `clearmlfs status`)."""
    try:
        lines = [line.split("\t", 1) for line in report.read_text().splitlines() if line]
    except FileNotFoundError:
        return 0
    print(f"clearmlfs: {len(lines)} file(s) could not be uploaded; they stay in the cache (`clearmlfs status`, "
          "`clearmlfs cache retry|discard URL`):", file=sys.stderr)
    for url, reason in (line if len(line) == 2 else [line[0], ""] for line in lines):
        print(f"  {url}: {reason}", file=sys.stderr)
    return EXIT_FAILED


def _daemons_of(mountpoint: Path) -> list[int]:
    """PIDs of `clearmlfs mount -f ... MOUNTPOINT` processes serving this mount point."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [os.fsdecode(a) for a in argv if a]
        if "mount" in words and "-f" in words and str(mountpoint) in words and any("clearmlfs" in w for w in words):
            found.append(int(entry.name))
    return found


def _byte_size(text: str) -> int:
    from .config import parse_size

    return parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clearmlfs", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"clearmlfs {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="clearml.conf to use (default: as ClearML finds it)")
    common.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    add("config", cmd_config, "show what clearml.conf configures (no secrets)")
    p = add("get", cmd_get, "fetch URL into the managed cache and print the local path (or copy it to DEST)")
    p.add_argument("url")
    p.add_argument("dest", nargs="?")
    p.add_argument("--no-extract", action="store_true", help="do not extract .zip/.tar/.tar.gz archives")
    p = add("put", cmd_put, "upload FILE to URL")
    p.add_argument("file")
    p.add_argument("url")
    p = add("ls", cmd_ls, "list the objects under URL")
    p.add_argument("url")
    p = add("cache", cmd_cache, "show, prune or clear the managed cache")
    p.add_argument("action", choices=["stats", "prune", "clear", "retry", "discard"])
    p.add_argument("url", nargs="?", help="retry, discard: the file not uploaded (`clearmlfs status` lists them)")
    p.add_argument("--max-bytes", type=_byte_size, default=None, help="prune: evict until the cache is this small")
    p.add_argument("--force", action="store_true", help="clear: also drop files not uploaded yet")
    add("status", cmd_status, "list the files not uploaded yet: dirty, uploading, or refused by the server")
    p = add("path", cmd_path, "print the path of URL inside a clearmlfs mount")
    p.add_argument("url")
    p.add_argument("--mountpoint", help="the mount to use (default: the only clearmlfs mount)")
    p = add("url", cmd_url, "print the URL of PATH inside a clearmlfs mount")
    p.add_argument("path")
    p = add("mount", cmd_mount, "mount every configured bucket at MOUNTPOINT")
    p.add_argument("mountpoint")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground (systemd, debugging)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="allow_other, ro, config=FILE, cache_dir=DIR, cache_max_bytes=N, cache_files=N, ttl=SECONDS, "
                   "op_timeout=SECONDS, offline=on|off, cache_min_free=SIZE|PCT%% (README: mount options)")
    p.add_argument("--log-file", metavar="FILE", help="log here instead of stderr")
    p = add("umount", cmd_umount, "unmount MOUNTPOINT (after uploading what is dirty)")
    p.add_argument("mountpoint")
    return parser


def _from_mount_helper(argv: list[str]) -> list[str]:
    """mount(8) → mount.fuse3 runs `clearmlfs SOURCE MOUNTPOINT -o OPTS`: that is `clearmlfs mount`."""
    parser_commands = {"config", "get", "put", "ls", "cache", "status", "path", "url", "mount", "umount"}
    if len(argv) >= 2 and argv[0] not in parser_commands and not argv[0].startswith("-"):
        return ["mount", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_from_mount_helper(list(sys.argv[1:] if argv is None else argv)))
    setup_logging(args.log_level, getattr(args, "log_file", None))
    try:
        return int(args.func(args))
    except (ConfigError, InvalidURL) as exc:
        print(f"clearmlfs: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ClearmlfsError as exc:
        print(f"clearmlfs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"clearmlfs: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line for the user, the traceback in the debug log
        log.debug("unexpected error", exc_info=True)
        print(f"clearmlfs: internal error: {type(exc).__name__}: {exc} (--log-level debug shows more)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
