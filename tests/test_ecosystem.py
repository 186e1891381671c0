"""clearmlfs among the tools around it: the ClearML SDK's cache, mount(8) and fstab, getfattr, the CLI on a
terminal and in a pipe, and systemd's readiness protocol. Real servers, real mounts, acted on through the OS."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clearmlfs import __version__
from clearmlfs.cache import CacheContext, EntryState
from clearmlfs.urls import url_to_mount_path
from tests import servers, stores
from tests.mounting import (  # noqa: F401 - no_mounts_left is a session fixture, used by being imported
    clearmlfs,
    mount_options,
    mount_table,
    mounted,
    no_mounts_left,
    poll,
    unmount,
)
from tests.proxy import Proxy
from tests.stores import Store

KIB, MIB = 1024, 1024 * 1024
COMMAND_TIMEOUT = 120.0
VENV_CLI = Path(sys.prefix) / "bin" / "clearmlfs"
SYSTEM_CLI = Path("/usr/local/bin/clearmlfs")
CLI_COMMANDS = ["config", "get", "put", "ls", "cache", "path", "url", "mount", "umount"]


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _data(size: int, seed: int) -> bytes:
    block = hashlib.sha256(f"ecosystem-{seed}".encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def _cache_entry(cache_dir: Path, url: str) -> Path:
    """The ClearML SDK's name for `url` in the global context, computed here independently of clearmlfs."""
    name = f"{hashlib.md5(url.encode()).hexdigest()}.{url.rsplit('/', 1)[-1]}"
    return cache_dir / "storage_manager" / "global" / name


def _private_conf(path: Path, cache_dir: Path, store: Store, api_server: str = "http://127.0.0.1:1") -> Path:
    """stores.write_conf, with every ClearML server URL pointed at `api_server` and mode 0600 (it holds keys)."""
    stores.write_conf(path, cache_dir, store)
    conf = json.loads(path.read_text())
    conf["api"] = {"api_server": api_server, "web_server": api_server, "files_server": api_server}
    path.write_text(json.dumps(conf, indent=2))
    path.chmod(0o600)
    return path


def _put(sw: servers.SeaweedFS, url: str, store: Store, data: bytes) -> str:
    """Upload straight to SeaweedFS (not through the proxy); the object key."""
    key = url[len(store.root) + 1 :]
    sw.client().put_object(Bucket=sw.bucket, Key=key, Body=data)
    return key


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=env)


class _ApiServerSpy:
    """An HTTP server standing in for ClearML's api/web/files servers: it only records that it was asked."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        spy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                spy.paths.append(f"{self.command} {self.path}")
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_HEAD = _any

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture()
def api_spy() -> Iterator[_ApiServerSpy]:
    spy = _ApiServerSpy()
    yield spy
    spy.stop()


# ---------------------------------------------------------------------------------------------------------
# 1. One cache with the real ClearML SDK
# ---------------------------------------------------------------------------------------------------------

_SDK_GET = """
import sys
from clearml import StorageManager
print("CACHED:" + str(StorageManager.get_local_copy(sys.argv[1], extract_archive=False)))
"""


def _sdk_get_local_copy(conf: Path, home: Path, url: str) -> str:
    """clearml.StorageManager.get_local_copy(url) in a clean process that knows only `conf` (no API keys)."""
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CLEARML_CONFIG_FILE": str(conf), "LANG": "C.UTF-8"}
    done = _run([sys.executable, "-c", _SDK_GET, url], env=env)
    assert done.returncode == 0, f"clearml SDK failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    found = [line for line in done.stdout.splitlines() if line.startswith("CACHED:")]
    assert found, f"no result from the clearml SDK:\n{done.stdout}\n{done.stderr}"
    return found[-1][len("CACHED:") :]


@pytest.fixture()
def shared_cache(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, api_spy: _ApiServerSpy, tmp_path: Path
) -> tuple[Store, Path, Path]:
    """A SeaweedFS store reached through the counting proxy; (store, clearml.conf, cache dir shared by both)."""
    store = stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)
    cache_dir = tmp_path / "cache"
    conf = _private_conf(tmp_path / "clearml.conf", cache_dir, store, api_server=api_spy.url)
    return store, conf, cache_dir


def _only_entry(cache_dir: Path, url: str) -> Path | None:
    """The one complete cache file whose name starts with md5(url) (long names are shortened at the end)."""
    digest = hashlib.md5(url.encode()).hexdigest()
    found = [
        p for p in (cache_dir / "storage_manager" / "global").glob(f"{digest}.*") if not p.name.endswith(".partially")
    ]
    return found[0] if len(found) == 1 else None


@pytest.mark.parametrize("name", ["weights.bin", "my model (v2).pt", "x" * 230 + ".ckpt.pt"],
                         ids=["plain", "spaces", "long-name"])
def test_file_read_through_the_mount_is_found_by_the_clearml_sdk_without_a_download(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, api_spy: _ApiServerSpy, shared_cache, tmp_path: Path,
    name: str,
) -> None:
    store, conf, cache_dir = shared_cache
    url = f"{store.fresh_prefix()}/{name}"
    assert url.startswith(f"s3://{seaweedfs_proxy.host}/"), url  # ClearML's form for a host entry
    data = _data(3 * MIB + 17, seed=1)
    key = _put(seaweedfs, url, store, data)
    with mounted(conf, tmp_path / "mnt") as mnt:
        seaweedfs_proxy.reset()
        done = subprocess.run(["cat", str(mnt / url_to_mount_path(url))], capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == data, done.stderr
        assert seaweedfs_proxy.count("GET", key) >= 1, "the mount did not download through the proxy"

        def complete() -> bool:
            entry = _only_entry(cache_dir, url)
            return entry is not None and entry.stat().st_size == len(data)

        assert poll(complete, 10.0), (
            f"after a full cat the mount's cache file for {url} is missing or incomplete: "
            f"{sorted(p.name for p in (cache_dir / 'storage_manager' / 'global').iterdir())}"
        )
        entry = _only_entry(cache_dir, url)
        assert entry is not None and entry.read_bytes() == data
        if len(_cache_entry(cache_dir, url).name) <= 255 - 32:
            assert entry == _cache_entry(cache_dir, url), "not named <md5(url)>.<basename>"
        else:  # too long: shortened as the SDK does, keeping 32 characters for download suffixes
            assert len(entry.name) <= 255 - 32 and entry.name.endswith(".ckpt.pt"), entry.name
        seaweedfs_proxy.reset()
        got = _sdk_get_local_copy(conf, tmp_path / "home", url)
    assert got == str(entry), f"the SDK and the mount disagree on the cache file: {got} vs {entry}"
    assert seaweedfs_proxy.count("GET", key) == 0, f"SDK re-downloaded: {seaweedfs_proxy.requests}"
    assert seaweedfs_proxy.bytes_sent(key) == 0
    assert api_spy.paths == [], f"StorageManager contacted the ClearML api server: {api_spy.paths}"


def test_file_fetched_by_the_clearml_sdk_is_read_through_the_mount_without_a_download(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, api_spy: _ApiServerSpy, shared_cache, tmp_path: Path
) -> None:
    store, conf, cache_dir = shared_cache
    url = f"{store.fresh_prefix()}/dataset.npz"
    data = _data(2 * MIB + 5, seed=2)
    key = _put(seaweedfs, url, store, data)
    expected = _cache_entry(cache_dir, url)
    seaweedfs_proxy.reset()
    got = _sdk_get_local_copy(conf, tmp_path / "home", url)
    assert got == str(expected), f"the SDK cached {url} as {got}, expected {expected}"
    assert Path(got).read_bytes() == data
    assert seaweedfs_proxy.bytes_sent(key) >= len(data), "the SDK did not download through the proxy"
    assert api_spy.paths == [], f"StorageManager contacted the ClearML api server: {api_spy.paths}"
    with mounted(conf, tmp_path / "mnt") as mnt:
        seaweedfs_proxy.reset()
        assert _getfattr(mnt / url_to_mount_path(url)).get("user.clearml.cached") == "true"
        done = subprocess.run(["cat", str(mnt / url_to_mount_path(url))], capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == data, done.stderr
        gets = [r for r in seaweedfs_proxy.requests if r.method == "GET" and key in r.path]
        assert not gets, f"the mount downloaded an object the SDK had cached: {gets}"
        assert seaweedfs_proxy.bytes_sent(key) == 0
    assert expected.read_bytes() == data


@pytest.mark.parametrize("sdk_limit", [None, 100_000], ids=["sdk-default-100", "raised-in-clearml-conf"])
def test_an_sdk_cleanup_in_the_same_folder_keeps_the_mounts_dataset_only_if_its_limit_is_raised(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, shared_cache, tmp_path: Path, sdk_limit: int | None
) -> None:
    # The documented interplay (README, "The cache"): the SDK deletes all but the newest files of its context
    # whenever it downloads (clearml 2.1.12 even deletes pinned ones), so the mount fetches them again; the count
    # set in clearml.conf, which both read, keeps them.
    store, conf, cache_dir = shared_cache
    if sdk_limit is not None:
        tree = json.loads(conf.read_text())
        tree["sdk"]["storage"]["cache"]["default_cache_manager_size"] = sdk_limit
        conf.write_text(json.dumps(tree))
    prefix = store.fresh_prefix()
    names = [f"{i:03d}.bin" for i in range(130)]
    for name in names:
        _put(seaweedfs, f"{prefix}/{name}", store, name.encode())
    with mounted(conf, tmp_path / "mnt", extra_args=["-o", "ttl=3600"]) as mnt:
        folder = mnt / url_to_mount_path(prefix)
        assert all((folder / name).read_bytes() == name.encode() for name in names)
        assert poll(lambda: all(_cache_entry(cache_dir, f"{prefix}/{n}").exists() for n in names), 10.0)
        _put(seaweedfs, f"{prefix}/model.bin", store, b"weights")
        _sdk_get_local_copy(conf, tmp_path / "home", f"{prefix}/model.bin")  # a miss: the SDK cleans first
        kept = [n for n in names if _cache_entry(cache_dir, f"{prefix}/{n}").exists()]
        seaweedfs_proxy.reset()
        assert all((folder / name).read_bytes() == name.encode() for name in names)
        fetched = seaweedfs_proxy.count("GET", f"{prefix.split('/', 3)[-1]}/")
    if sdk_limit is None:
        assert len(kept) == 100 and fetched == len(names) - 100, (len(kept), fetched)
    else:
        assert kept == names and fetched == 0, (len(kept), fetched)


def test_sdk_copy_of_an_object_overwritten_since_is_not_served_by_the_mount(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, shared_cache, tmp_path: Path
) -> None:
    """README: "a cached copy is checked against the server's ETag before it is reused" — SDK copies too."""
    store, conf, _ = shared_cache
    url = f"{store.fresh_prefix()}/retrained.pt"
    old, new = _data(64 * KIB, seed=6), _data(64 * KIB, seed=7)  # same size, different content
    _put(seaweedfs, url, store, old)
    assert Path(_sdk_get_local_copy(conf, tmp_path / "home", url)).read_bytes() == old
    _put(seaweedfs, url, store, new)
    with mounted(conf, tmp_path / "mnt") as mnt:
        seen = (mnt / url_to_mount_path(url)).read_bytes()
    assert seen == new, (
        "the mount served the ClearML SDK's stale cached copy of an object overwritten since with one of the "
        "same size: CacheContext._is_current (clearmlfs/cache.py) trusts an SDK copy (no state file) on size "
        "alone; its single-part S3 ETag is the MD5 of the content and could be compared"
    )


# ---------------------------------------------------------------------------------------------------------
# 2. mount(8) and fstab
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def cli_on_path() -> Iterator[dict[str, str]]:
    """/usr/local/bin/clearmlfs → this checkout's venv, as the README tells users; env for mount(8).

    A link to another checkout (CI runs in a fresh clone) is pointed here for the test, then put back.
    """
    previous = os.readlink(SYSTEM_CLI) if SYSTEM_CLI.is_symlink() else None
    if SYSTEM_CLI.exists() and previous is None:
        pytest.fail(f"{SYSTEM_CLI} is a real file, not a link to a venv: refusing to replace it")
    if previous is None or SYSTEM_CLI.resolve() != VENV_CLI.resolve():
        SYSTEM_CLI.unlink(missing_ok=True)
        SYSTEM_CLI.symlink_to(VENV_CLI)
    env = dict(os.environ)
    env["PATH"] = f"/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{env.get('PATH', '')}"
    try:
        yield env
    finally:
        if previous is not None and os.readlink(SYSTEM_CLI) != previous:
            SYSTEM_CLI.unlink()
            SYSTEM_CLI.symlink_to(previous)


@pytest.fixture()
def seaweed_conf(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> tuple[Store, Path]:
    store = stores.seaweed_store(seaweedfs)
    return store, _private_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)


def _daemons_serving(mountpoint: Path) -> list[str]:
    """Command lines of processes that mention `mountpoint` (the background mount daemon)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if str(mountpoint).encode() in args and any(b"clearmlfs" in a for a in args):
                found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


def _check_mounted_by_helper(mnt: Path, store: Store, url: str, data: bytes) -> None:
    rows = [(src, fstype) for src, target, fstype, _ in mount_table() if target == str(mnt)]
    assert rows and rows[-1] == ("clearmlfs", "fuse.clearmlfs"), f"/proc/mounts has {rows} for {mnt}"
    assert (mnt / url_to_mount_path(url)).read_bytes() == data


def _umount_with_umount8(mnt: Path, env: dict[str, str]) -> None:
    done = _run(["umount", str(mnt)], env=env)
    assert done.returncode == 0, f"umount {mnt}: {done.stderr}"
    assert poll(lambda: not os.path.ismount(mnt), 10.0), f"{mnt} still mounted after umount"
    assert poll(lambda: not _daemons_serving(mnt), 30.0), f"daemon still running: {_daemons_serving(mnt)}"


def test_mount8_with_fuse_type_mounts_and_umount8_unmounts(
    seaweedfs: servers.SeaweedFS, seaweed_conf, cli_on_path: dict[str, str], tmp_path: Path
) -> None:
    store, conf = seaweed_conf
    url = f"{store.fresh_prefix()}/via-mount8.txt"
    _put(seaweedfs, url, store, b"mounted by mount(8)\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        done = _run(
            ["mount", "-t", "fuse.clearmlfs", "clearmlfs", str(mnt), "-o", f"config={conf},allow_other"],
            env=cli_on_path,
        )
        assert done.returncode == 0, f"mount -t fuse.clearmlfs exited {done.returncode}: {done.stderr}"
        assert os.path.ismount(mnt), f"mount(8) returned before {mnt} answered"
        _check_mounted_by_helper(mnt, store, url, b"mounted by mount(8)\n")
        assert "allow_other" in mount_options(mnt)
        _umount_with_umount8(mnt, cli_on_path)
    finally:
        unmount(mnt)


def test_fstab_line_with_mount8_and_systemd_options_mounts(
    seaweedfs: servers.SeaweedFS, seaweed_conf, cli_on_path: dict[str, str], tmp_path: Path
) -> None:
    store, conf = seaweed_conf
    url = f"{store.fresh_prefix()}/via-fstab.txt"
    _put(seaweedfs, url, store, b"mounted from fstab\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    options = f"config={conf},_netdev,noauto,x-systemd.automount"
    fstab.write_text(f"# test fstab\nclearmlfs  {mnt}  fuse.clearmlfs  {options}  0  0\n")
    try:
        done = _run(["mount", "-T", str(fstab), str(mnt)], env=cli_on_path)
        assert done.returncode == 0, f"mount -T {fstab} exited {done.returncode}: {done.stderr}"
        assert os.path.ismount(mnt)
        _check_mounted_by_helper(mnt, store, url, b"mounted from fstab\n")
        _umount_with_umount8(mnt, cli_on_path)
    finally:
        unmount(mnt)


# ---------------------------------------------------------------------------------------------------------
# 3. Extended attributes
# ---------------------------------------------------------------------------------------------------------


def _getfattr(path: Path) -> dict[str, str]:
    done = _run(["getfattr", "-d", "--absolute-names", str(path)])
    assert done.returncode == 0, f"getfattr -d {path}: {done.stderr}"
    return dict(re.findall(r'^([\w.]+)="(.*)"$', done.stdout, flags=re.MULTILINE))


def test_getfattr_shows_url_etag_and_whether_the_object_is_cached(
    seaweedfs: servers.SeaweedFS, seaweed_conf, tmp_path: Path
) -> None:
    store, conf = seaweed_conf
    url = f"{store.fresh_prefix()}/attrs/ckpt.pt"
    data = _data(1 * MIB + 3, seed=3)
    key = _put(seaweedfs, url, store, data)
    etag = seaweedfs.client().head_object(Bucket=seaweedfs.bucket, Key=key)["ETag"].strip('"')
    with mounted(conf, tmp_path / "mnt") as mnt:
        path = mnt / url_to_mount_path(url)
        before = _getfattr(path)
        assert before == {"user.clearml.url": url, "user.clearml.etag": etag, "user.clearml.cached": "false"}
        done = subprocess.run(["cat", str(path)], capture_output=True, timeout=60)
        assert done.returncode == 0 and done.stdout == data
        after = _getfattr(path)
        assert after == {"user.clearml.url": url, "user.clearml.etag": etag, "user.clearml.cached": "true"}
        folder = _run(["getfattr", "-d", "--absolute-names", str(path.parent)])
        assert folder.returncode == 0 and "user.clearml" not in folder.stdout  # directories have none


# ---------------------------------------------------------------------------------------------------------
# 4. The command line
# ---------------------------------------------------------------------------------------------------------


def _run_on_pty(cmd: list[str], timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a pseudo-terminal; (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    finally:
        os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, b"".join(chunks).decode(errors="replace")


def _stats(conf: Path) -> dict[str, str]:
    done = _run(clearmlfs("cache", "stats", "--config", conf))
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"^([\w ()-]+?): (.*)$", done.stdout, flags=re.MULTILINE))


def test_get_draws_a_progress_bar_on_a_terminal_and_prints_only_the_path_in_a_pipe(
    seaweedfs: servers.SeaweedFS, seaweed_conf, tmp_path: Path
) -> None:
    store, conf = seaweed_conf
    base = store.fresh_prefix()
    big, small = f"{base}/big.bin", f"{base}/small.bin"
    _put(seaweedfs, big, store, _data(24 * MIB, seed=4))
    _put(seaweedfs, small, store, _data(100 * KIB, seed=5))
    status, output = _run_on_pty(clearmlfs("get", "--config", conf, big))
    assert status == 0, output
    assert "%|" in output and ("B/s" in output or "24.0M" in output), f"no progress bar:\n{output!r}"
    lines = [part.strip() for part in re.split(r"[\r\n]+", output) if part.strip()]
    assert lines[-1] == str(_cache_entry(tmp_path / "cache", big)), f"does not end with the path:\n{output!r}"
    piped = _run(clearmlfs("get", "--config", conf, small))
    assert piped.returncode == 0
    assert (piped.stdout, piped.stderr) == (f"{_cache_entry(tmp_path / 'cache', small)}\n", "")


def test_cache_stats_prune_and_clear_which_refuses_to_drop_unuploaded_files(
    seaweedfs: servers.SeaweedFS, seaweed_conf, tmp_path: Path
) -> None:
    store, conf = seaweed_conf
    cache_dir = tmp_path / "cache"
    base = store.fresh_prefix()
    urls = [f"{base}/f{i}.bin" for i in range(3)]
    for i, url in enumerate(urls):
        _put(seaweedfs, url, store, _data(10 * KIB * (i + 1), seed=10 + i))
        assert _run(clearmlfs("get", "--config", conf, url)).returncode == 0
    stats = _stats(conf)
    assert stats["files"] == "3" and stats["bytes"] == str(60 * KIB), stats
    assert stats["file limit"] == "none (bytes and free space decide)", stats
    assert stats["dirty (not yet uploaded)"] == "0", stats

    pruned = _run(clearmlfs("cache", "prune", "--max-bytes", "0", "--config", conf))
    assert pruned.returncode == 0 and "evicted 3" in pruned.stdout, pruned
    assert not any(_cache_entry(cache_dir, u).exists() for u in urls)
    assert _stats(conf)["files"] == "0"

    assert _run(clearmlfs("get", "--config", conf, urls[0])).returncode == 0
    cleared = _run(clearmlfs("cache", "clear", "--config", conf))
    assert cleared.returncode == 0 and not _cache_entry(cache_dir, urls[0]).exists(), cleared

    # A file written through a mount but not uploaded yet: clear must refuse, unless forced.
    dirty_url = f"{base}/unsaved.bin"
    cache = CacheContext(cache_dir)
    cache.path_for(dirty_url).write_bytes(b"only copy")
    cache.save_state(EntryState(dirty_url, dirty=True))
    assert _run(clearmlfs("get", "--config", conf, urls[1])).returncode == 0
    stats = _stats(conf)
    assert stats["dirty (not yet uploaded)"] == "1" and dirty_url in _run(
        clearmlfs("cache", "stats", "--config", conf)).stdout
    refused = _run(clearmlfs("cache", "clear", "--config", conf))
    assert refused.returncode != 0 and "--force" in refused.stderr, refused
    assert cache.path_for(dirty_url).read_bytes() == b"only copy"
    assert _cache_entry(cache_dir, urls[1]).exists(), "a refused clear removed entries anyway"
    forced = _run(clearmlfs("cache", "clear", "--force", "--config", conf))
    assert forced.returncode == 0, forced
    assert not cache.path_for(dirty_url).exists() and not _cache_entry(cache_dir, urls[1]).exists()
    stats = _stats(conf)
    assert stats["files"] == "0" and stats["dirty (not yet uploaded)"] == "0", stats


def test_path_and_url_convert_both_ways_with_a_live_mount(
    seaweedfs: servers.SeaweedFS, seaweed_conf, tmp_path: Path
) -> None:
    store, conf = seaweed_conf
    url = f"{store.fresh_prefix()}/models/a.pt"
    _put(seaweedfs, url, store, b"a")
    with mounted(conf, tmp_path / "live mnt") as mnt:  # a space: /proc/mounts writes it as \040
        to_path = _run(clearmlfs("path", url, "--mountpoint", mnt))
        assert to_path.returncode == 0, to_path.stderr
        path = to_path.stdout.strip()
        assert path == str(mnt / url_to_mount_path(url)) and Path(path).read_bytes() == b"a"
        to_url = _run(clearmlfs("url", path))
        assert (to_url.returncode, to_url.stdout.strip()) == (0, url), to_url.stderr
        outside = _run(clearmlfs("url", tmp_path))
        assert outside.returncode != 0 and "not inside a clearmlfs mount" in outside.stderr


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_every_command_has_help(command: str) -> None:
    done = _run(clearmlfs(command, "--help"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f"usage: clearmlfs {command}" in done.stdout


def test_version_is_printed() -> None:
    for cmd in (clearmlfs("--version"), [str(VENV_CLI), "--version"]):
        done = _run(cmd)
        assert (done.returncode, done.stdout.strip()) == (0, f"clearmlfs {__version__}"), done


# ---------------------------------------------------------------------------------------------------------
# 5. systemd readiness (Type=notify)
# ---------------------------------------------------------------------------------------------------------


def _receive(sock: socket.socket, wanted: bytes, timeout: float) -> list[bytes]:
    """Datagrams until one carries the line `wanted` (or the deadline); all of them."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            break
        if wanted in got[-1].split(b"\n"):
            break
    return got


def test_foreground_mount_notifies_systemd_ready_then_stopping(seaweed_conf, tmp_path: Path) -> None:
    _, conf = seaweed_conf
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with tempfile.TemporaryDirectory(prefix="cfs-notify-") as folder:  # AF_UNIX paths are short
        address = os.path.join(folder, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address)
        env = dict(os.environ, NOTIFY_SOCKET=address)
        out = (tmp_path / "mount.out").open("wb")
        proc = subprocess.Popen(
            clearmlfs("mount", "-f", "--config", conf, mnt),
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            ready = _receive(sock, b"READY=1", 30.0)
            answering = os.path.ismount(mnt)
            assert ready and b"READY=1" in ready[-1].split(b"\n"), f"no READY=1: {ready}; {proc.poll()=}"
            assert answering, "READY=1 arrived before the mount point answered"
            assert "s3" in os.listdir(mnt)
            proc.send_signal(signal.SIGTERM)
            stopping = _receive(sock, b"STOPPING=1", 30.0)
            assert stopping and b"STOPPING=1" in stopping[-1].split(b"\n"), f"no STOPPING=1 after SIGTERM: {stopping}"
            assert proc.wait(timeout=60) == 0, (tmp_path / "mount.out").read_text()
            assert poll(lambda: not os.path.ismount(mnt), 10.0), f"{mnt} still mounted after the daemon exited"
        finally:
            sock.close()
            out.close()
            unmount(mnt)
            if proc.poll() is None:
                servers.stop_process(proc)
