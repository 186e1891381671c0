"""What decides how a failure is treated, checked without servers: which errors are worth a retry, that retries
stop at the caller's deadline, which timeouts clearml.conf and the mount options set, and how much the cache
keeps free on its disk."""

from __future__ import annotations

import errno
import http.client
import time
from pathlib import Path

import pytest
import requests
import urllib3

from clearmlfs.backends import azure, gcs, s3
from clearmlfs.backends.base import deadline, retry
from clearmlfs.cache import CacheContext, min_free_bytes
from clearmlfs.config import load_settings
from clearmlfs.errors import ConfigError, NoSpace, StorageError, TimedOut, Transient, to_errno, unreachable
from clearmlfs.mount import parse_options, with_options

CUT_OFF = [
    urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead(10 bytes read, 90 more expected)"),
    http.client.IncompleteRead(b"partial", 90),
    requests.exceptions.ChunkedEncodingError("Connection broken"),
    urllib3.exceptions.ReadTimeoutError(None, "/key", "Read timed out."),  # type: ignore[arg-type]
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
]


@pytest.mark.parametrize("translate", [s3._translate, azure._translate, gcs._translate], ids=["s3", "azure", "gcs"])
@pytest.mark.parametrize("exc", CUT_OFF, ids=lambda e: type(e).__name__)
def test_a_body_cut_off_or_a_dropped_connection_is_transient_on_every_backend(translate, exc: BaseException) -> None:
    assert isinstance(translate(exc, "s3://bucket/key"), Transient)


@pytest.mark.parametrize("translate", [s3._translate, azure._translate, gcs._translate], ids=["s3", "azure", "gcs"])
def test_a_full_cache_disk_during_a_download_is_no_space_on_every_backend(translate) -> None:
    error = translate(OSError(errno.ENOSPC, "No space left on device"), "s3://bucket/key")
    assert isinstance(error, NoSpace) and to_errno(error) == errno.ENOSPC


def test_timed_out_is_etimedout_and_counts_as_unreachable() -> None:
    assert to_errno(TimedOut("x")) == errno.ETIMEDOUT
    assert unreachable(TimedOut("x")) and unreachable(Transient("x")) and not unreachable(StorageError("x"))


def test_retries_stop_at_the_threads_deadline() -> None:
    calls: list[float] = []

    @retry(attempts=50, base_delay=0.2, max_delay=0.2)
    def failing() -> None:
        calls.append(time.monotonic())
        raise Transient("server stalled")

    started = time.monotonic()
    with deadline(1.0), pytest.raises(Transient):
        failing()
    assert time.monotonic() - started < 1.5
    assert 2 <= len(calls) < 50


def _conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clearml.conf"
    path.write_text(text)
    return path


def test_timeouts_come_from_the_clearmlfs_section_then_the_sdks_boto3_keys_then_defaults(tmp_path: Path) -> None:
    defaults = load_settings(_conf(tmp_path, "sdk {}")).timeouts
    assert (defaults.connect, defaults.read, defaults.operation, defaults.revalidate) == (10, 20, 20, 3)
    boto = load_settings(_conf(tmp_path, "sdk.aws.boto3 { connect_timeout: 5, read_timeout: 7 }")).timeouts
    assert (boto.connect, boto.read) == (5, 7)
    own = load_settings(_conf(tmp_path, """
        sdk.aws.boto3 { connect_timeout: 5, read_timeout: 7 }
        clearmlfs { read_timeout: 9, op_timeout: 12, revalidate_timeout: 1, offline: false, cache_min_free: "5%" }
    """))
    assert (own.timeouts.connect, own.timeouts.read, own.timeouts.operation, own.timeouts.revalidate) == (5, 9, 12, 1)
    assert own.offline_reads is False and own.cache_min_free == "5%"
    mounted = with_options(own, parse_options(["op_timeout=30,offline=on,cache_min_free=1G"]))
    assert mounted.timeouts.operation == 30 and mounted.offline_reads and mounted.cache_min_free == "1G"


def test_a_timeout_that_is_not_a_positive_number_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        load_settings(_conf(tmp_path, "clearmlfs { op_timeout: 0 }"))
    with pytest.raises(ConfigError):
        parse_options(["read_timeout=soon"])


def test_the_cache_keeps_ten_percent_of_its_disk_free_or_one_gib_whichever_is_smaller(tmp_path: Path) -> None:
    import os

    st = os.statvfs(tmp_path)
    size = st.f_blocks * st.f_frsize
    assert min_free_bytes(tmp_path) == min(size // 10, 1024**3)
    assert min_free_bytes(tmp_path, "5%") == int(size * 0.05)
    assert min_free_bytes(tmp_path, "256M") == 256 * 1024**2
    assert min_free_bytes(tmp_path, "0") == 0
    with pytest.raises(ConfigError):
        min_free_bytes(tmp_path, "lots")
    assert CacheContext(tmp_path / "cache", min_free="3%").min_free == int(size * 0.03)


def test_the_clearmlfs_section_holds_mount_options_that_given_ones_override(tmp_path: Path) -> None:
    settings = load_settings(_conf(tmp_path, """
        sdk {}
        clearmlfs { ttl: 5, allow_other: false, ro: true, passthrough: false, read_part_size: "16M" }
    """))
    opts = parse_options([*settings.mount_defaults, "ttl=2"])
    assert (opts.ttl, opts.allow_other, opts.read_only, opts.passthrough) == (2, False, True, False)
    assert opts.read_part_size == 16 * 1024**2
    unknown = load_settings(_conf(tmp_path, "clearmlfs { speed: ludicrous }"))
    with pytest.raises(ConfigError, match="unknown mount option 'speed'"):
        parse_options(list(unknown.mount_defaults))
