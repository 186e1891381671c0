"""Every `clearmlfs` command.

Exit status: 0 success, 1 a storage operation failed, 2 bad configuration or usage.
Errors are one line on stderr, never a traceback (``--log-level debug`` shows more).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .config import Settings, load_settings
from .errors import ClearmlfsError, ConfigError, InvalidURL
from .storage_manager import StorageManager

log = logging.getLogger("clearmlfs")

EXIT_FAILED = 1
EXIT_CONFIG = 2


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    StorageManager.configure(settings=settings)
    return settings


def cmd_config(args: argparse.Namespace) -> int:
    """Print what clearml.conf configures (never a secret)."""
    s = _settings(args)
    print(f"config file: {s.source or '(none found; defaults and environment)'}")
    print(f"cache: {s.cache_dir} (file limit {s.cache_file_limit})")
    for c in s.s3.credentials:
        auth = "key" if c.has_keys else ("credentials chain" if c.use_credentials_chain else "NO KEY/SECRET")
        print(f"s3: {c.prefix} [{auth}{', http' if c.host and not c.secure else ''}]")
    for a in s.azure:
        print(f"azure: {a.account_name}/{a.container_name or '*'} at {a.account_url}")
    for g in s.gcs:
        print(f"gs: {g.prefix}")
    print("direct access: " + ", ".join(s.direct_access))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    _settings(args)
    local = StorageManager.get_local_copy(args.url, extract_archive=not args.no_extract)
    if local is None:
        print(f"clearmlfs: cannot fetch {args.url} (see the warning above)", file=sys.stderr)
        return EXIT_FAILED
    if args.dest:
        dest = Path(args.dest)
        if Path(local).is_dir():
            shutil.copytree(local, dest, dirs_exist_ok=True)
        else:
            shutil.copyfile(local, dest / Path(local).name.split(".", 1)[-1] if dest.is_dir() else dest)
        local = str(dest)
    print(local)
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    _settings(args)
    print(StorageManager.upload_file(args.file, args.url))
    return 0


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

    opts = mount.parse_options(args.options)
    mountpoint = Path(args.mountpoint).absolute()
    settings = load_settings(args.config or opts.config)
    _warn_if_readable(settings)
    mount.check_mountpoint(mountpoint)
    if args.foreground:
        mount.serve(settings, mountpoint, opts)
        return 0
    return _mount_in_background(args, settings, mountpoint)


def _warn_if_readable(settings: Settings) -> None:
    if settings.source and settings.source.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; it holds credentials (chmod 600 it)", settings.source)


def _mount_in_background(args: argparse.Namespace, settings: Settings, mountpoint: Path) -> int:
    import subprocess
    import time

    log_file = Path(args.log_file) if args.log_file else _default_log(settings, mountpoint)
    cmd = [sys.executable, "-m", "clearmlfs.cli", "mount", "-f", "--log-level", args.log_level,
           "--log-file", str(log_file), str(mountpoint)]
    cmd += ["--config", str(settings.source)] if settings.source else []
    cmd += [f"-o{o}" for o in args.options]
    with open(log_file, "ab") as out:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(f"clearmlfs: mount failed: {_last_line(log_file)} (log: {log_file})", file=sys.stderr)
            return EXIT_FAILED
        if os.path.ismount(mountpoint):
            return 0
        time.sleep(0.05)
    child.terminate()
    print(f"clearmlfs: mount did not become ready within 60 s (log: {log_file})", file=sys.stderr)
    return EXIT_FAILED


def _default_log(settings: Settings, mountpoint: Path) -> Path:
    folder = settings.cache_dir / "clearmlfs" / "logs"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / f"{str(mountpoint).strip('/').replace('/', '-') or 'root'}.log"


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount; the daemon uploads anything still dirty before it exits."""
    import subprocess

    mountpoint = Path(args.mountpoint).absolute()
    if not os.path.ismount(mountpoint):
        print(f"clearmlfs: {mountpoint} is not mounted", file=sys.stderr)
        return EXIT_FAILED
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"clearmlfs: cannot unmount {mountpoint}: {proc.stderr.strip()}", file=sys.stderr)
        return EXIT_FAILED
    return 0


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
    p = add("mount", cmd_mount, "mount every configured bucket at MOUNTPOINT")
    p.add_argument("mountpoint")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground (systemd, debugging)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="allow_other, ro, config=FILE, cache_dir=DIR, cache_max_bytes=N, cache_files=N, ttl=SECONDS")
    p.add_argument("--log-file", metavar="FILE", help="log here instead of stderr")
    p = add("umount", cmd_umount, "unmount MOUNTPOINT (after uploading what is dirty)")
    p.add_argument("mountpoint")
    return parser


def _setup_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # The SDKs log request headers (signatures, key ids, SAS tokens) at debug level: never let them through.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "azure", "google", "pyfuse3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, getattr(args, "log_file", None))
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
