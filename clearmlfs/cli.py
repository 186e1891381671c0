"""Every `clearmlfs` command.

Exit status: 0 success, 1 a storage operation failed, 2 bad configuration or usage.
Errors are one line on stderr, never a traceback (``--log-level debug`` shows more).
"""

from __future__ import annotations

import argparse
import logging
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
