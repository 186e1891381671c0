"""Small objects through a real mount: one request per file, fetched ahead of a reader walking a directory.

What the server is asked for is counted by a proxy in front of SeaweedFS.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clearmlfs.fs.namespace import ATTRS_AHEAD, READING_OPENS
from clearmlfs.urls import url_to_mount_path
from tests import servers, stores
from tests.mounting import fetchers_of, mounted, no_mounts_left, poll  # noqa: F401 - session fixture, used by being imported
from tests.proxy import Proxy

KIB, MIB = 1024, 1024 * 1024
COUNT = 40


@pytest.fixture()
def folder(seaweedfs: servers.SeaweedFS) -> Iterator[tuple[str, dict[str, bytes]]]:
    """COUNT small objects of different sizes (one empty) under a fresh prefix: (prefix, name → content)."""
    prefix = f"small-{uuid.uuid4().hex[:8]}"
    client = seaweedfs.client()
    contents = {f"{i:03d}.bin": os.urandom(i * 997) for i in range(COUNT)}
    for name, data in contents.items():
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{name}", Body=data)
    yield prefix, contents


@contextlib.contextmanager
def proxied_mount(seaweedfs: servers.SeaweedFS, tmp_path: Path, options: str) -> Iterator[tuple[Proxy, Path]]:
    """A mount behind a counting proxy: (the proxy, the bucket's folder)."""
    with Proxy(upstream=seaweedfs.endpoint) as proxy:
        store = stores.seaweed_store(seaweedfs, host=proxy.host)
        conf = stores.write_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)
        with mounted(conf, tmp_path / "mnt", extra_args=["-o", f"ttl=30,list_ttl=30,{options}"]) as mnt:
            yield proxy, mnt / url_to_mount_path(store.root)


@pytest.fixture(params=[2, 0], ids=["fetcher-processes", "daemon-threads"])
def proxied(seaweedfs: servers.SeaweedFS, tmp_path: Path, request) -> Iterator[tuple[Proxy, Path]]:
    """A mount behind a counting proxy; files fetched ahead by fetcher processes, or by the daemon's threads."""
    with proxied_mount(seaweedfs, tmp_path, f"fetch_processes={request.param}") as (proxy, bucket):
        started = poll(lambda: len(fetchers_of(tmp_path / "mnt")) == request.param, 10)
        assert started, f"not {request.param} fetcher processes: {fetchers_of(tmp_path / 'mnt')}"
        yield proxy, bucket


def _read_in_name_order(proxy: Proxy, bucket: Path, prefix: str, contents: dict[str, bytes]) -> None:
    proxy.reset()
    for name in sorted(contents):
        assert (bucket / prefix / name).read_bytes() == contents[name], name
    fetched = [r.path.rpartition("/")[2] for r in proxy.requests if r.method == "GET" and f"/{prefix}/" in r.path]
    assert sorted(fetched) == sorted(contents), f"{len(fetched)} GETs for {COUNT} files"


def test_a_directory_read_in_name_order_costs_one_get_per_file(folder, proxied) -> None:
    prefix, contents = folder
    proxy, bucket = proxied
    _read_in_name_order(proxy, bucket, prefix, contents)
    # A file's stored time is learnt from its GET: only files looked up before any GET of them was under way
    # (the first ones, before the read-ahead noticed the walk) paid a HEAD, never one already being fetched.
    got: set[str] = set()
    for r in proxy.requests:
        name = r.path.rpartition("/")[2]
        if r.method == "GET":
            got.add(name)
        elif r.method == "HEAD":
            assert name not in got, f"{name} paid a HEAD after its GET"
    assert proxy.count("HEAD") <= COUNT // 4, "files fetched ahead paid a HEAD too"


def test_with_server_times_a_small_file_costs_no_head(folder, seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    prefix, contents = folder
    with proxied_mount(seaweedfs, tmp_path, "server_times") as (proxy, bucket):
        _read_in_name_order(proxy, bucket, prefix, contents)
        assert proxy.count("HEAD") == 0, "a small file's open paid a HEAD before its GET"


def test_the_next_files_are_fetched_before_the_reader_opens_them(folder, proxied) -> None:
    prefix, contents = folder
    proxy, bucket = proxied
    names = sorted(contents)
    proxy.reset()
    for name in names[:3]:  # a reader going through the directory in name order
        (bucket / prefix / name).read_bytes()
    ahead = lambda: {r.path.rpartition("/")[2] for r in proxy.requests if r.method == "GET"} & set(names[3:])  # noqa: E731
    assert poll(lambda: len(ahead()) >= 4, 10, 0.01), f"only {sorted(ahead())} fetched ahead of the reader"
    for name in names[3:8]:
        assert (bucket / prefix / name).read_bytes() == contents[name]
    fetched = [r.path.rpartition("/")[2] for r in proxy.requests if r.method == "GET" and f"/{prefix}/" in r.path]
    assert len(fetched) == len(set(fetched)), f"files fetched ahead were fetched again when opened: {fetched}"


def test_a_random_open_fetches_no_neighbours(folder, proxied) -> None:
    prefix, contents = folder
    proxy, bucket = proxied
    names = sorted(contents)
    proxy.reset()
    for name in (names[30], names[7], names[19]):
        assert (bucket / prefix / name).read_bytes() == contents[name]
    time.sleep(0.5)
    assert proxy.count("GET", f"/{prefix}/") == 3, [r.path for r in proxy.requests]


def test_in_a_folder_being_read_a_cold_open_costs_its_get_alone_and_a_stat_walk_its_heads_alone(
    folder, seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    """Once a folder's files are being opened (a data loader's shuffled epoch), a lookup of one of its small files
    is answered by the GET whose headers carry what a HEAD would say, and the open that follows asks nothing.
    `ls -l` still asks by HEAD: no file body."""
    prefix, contents = folder
    order = random.Random(5).sample(sorted(contents), 2 * READING_OPENS)
    with proxied_mount(seaweedfs, tmp_path, "fetch_processes=2") as (proxy, bucket):
        for name in order[:READING_OPENS]:
            assert (bucket / prefix / name).read_bytes() == contents[name]
        proxy.reset()
        for name in order[READING_OPENS:]:
            assert (bucket / prefix / name).read_bytes() == contents[name]
        files = [(r.method, r.path.rpartition("/")[2]) for r in proxy.requests if f"/{prefix}/" in r.path]
        assert sorted(files) == sorted(("GET", name) for name in order[READING_OPENS:]), files
        proxy.reset()
        listed = {p.name: p.stat().st_size for p in (bucket / prefix).iterdir()}
        assert listed == {name: len(data) for name, data in contents.items()}
        assert proxy.count("GET", f"/{prefix}/") == 0, "a stat walk fetched file bodies"


def test_a_folder_listed_then_read_in_shuffled_order_costs_a_get_per_file_and_no_heads(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    """A data loader lists its folder first (ImageFolder, a glob), then opens the files shuffled. The listing
    starts asking ahead for what `ls -l` would stat next; once files are being opened, that stops and each file
    costs its GET alone. `ls -l` afterwards still fetches no file body."""
    prefix = f"listed-{uuid.uuid4().hex[:8]}"
    names = [f"{i:04d}.bin" for i in range(1000)]  # more than the stat walk asks ahead of the first files
    client = seaweedfs.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{n}", Body=n.encode()),
                      names))
    order = random.Random(7).sample(names, READING_OPENS + 40)
    with proxied_mount(seaweedfs, tmp_path, "fetch_processes=2") as (proxy, bucket):
        assert sorted(p.name for p in (bucket / prefix).iterdir()) == names
        for name in order[:READING_OPENS]:
            assert (bucket / prefix / name).read_bytes() == name.encode()
        assert settled(lambda: len(proxy.requests)), "the stat walk's HEADs went on"
        heads = proxy.count("HEAD", f"/{prefix}/")
        assert heads <= ATTRS_AHEAD + 2 * READING_OPENS, f"{heads} HEADs: the stat walk went on through the folder"
        proxy.reset()
        for name in order[READING_OPENS:]:
            assert (bucket / prefix / name).read_bytes() == name.encode()
        files = [(r.method, r.path.rpartition("/")[2]) for r in proxy.requests if f"/{prefix}/" in r.path]
        assert sorted(files) == sorted(("GET", name) for name in order[READING_OPENS:]), files
        proxy.reset()
        assert {p.name: p.stat().st_size for p in (bucket / prefix).iterdir()} == {n: len(n) for n in names}
        assert proxy.count("GET", f"/{prefix}/") == 0, "a stat walk fetched file bodies"


def test_a_first_epoch_lists_its_folder_once_though_some_files_are_cached_already(
    folder, seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    """A shuffled first epoch: each file's GET (at its lookup, once the folder is being read) answers for it, so
    the few files cached before it (past `ttl`) are asked about one by one; the folder is not listed again."""
    prefix, contents = folder
    names = sorted(contents)
    cached = names[:3]
    order = random.Random(11).sample(names[3:], len(names) - 3) + cached  # (the cached ones opened last)
    with proxied_mount(seaweedfs, tmp_path, "ttl=0.5,list_ttl=30,readahead_files=0") as (proxy, bucket):
        for name in cached:
            assert (bucket / prefix / name).read_bytes() == contents[name]
        time.sleep(0.6)
        proxy.reset()
        for name in order:
            assert (bucket / prefix / name).read_bytes() == contents[name]
        listings = [r for r in proxy.requests if "list-type" in r.query]
        assert not listings, f"the folder was listed again: {[r.query for r in listings]}"


def settled(count: Callable[[], int], quiet: float = 0.5, within: float = 10) -> bool:
    """Whether `count()` stopped changing for `quiet` seconds within `within`."""
    deadline, last, since = time.monotonic() + within, count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


def test_lookups_in_one_folder_are_answered_at_once(folder, seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    """The kernel sends the lookups of one folder together (FUSE_CAP_PARALLEL_DIROPS): readers opening files of
    a dataset folder do not wait for each other's requests. Two stats are held by a stalled server at once."""
    prefix, contents = folder
    names = sorted(contents)
    options = "fetch_processes=0,revalidate_timeout=30,read_timeout=30"
    with proxied_mount(seaweedfs, tmp_path, options) as (proxy, bucket):
        assert (bucket / prefix / names[0]).stat().st_size == len(contents[names[0]])  # the folder is listed
        proxy.reset()
        proxy.stall()
        sizes: dict[str, int] = {}
        readers = [threading.Thread(target=lambda n=n: sizes.update({n: (bucket / prefix / n).stat().st_size}))
                   for n in names[1:3]]
        for reader in readers:
            reader.start()
        held = lambda: {r.path.rpartition("/")[2] for r in proxy.requests if f"/{prefix}/" in r.path}  # noqa: E731
        both = poll(lambda: held() >= set(names[1:3]), 10, 0.05)
        proxy.resume()
        for reader in readers:
            reader.join(60)
        assert both, f"one lookup waited for the other: held {sorted(held())}"
        assert sizes == {n: len(contents[n]) for n in names[1:3]}


def test_a_small_file_changed_on_the_server_is_seen_after_ttl_and_an_unchanged_one_costs_a_304(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    key = f"small-{uuid.uuid4().hex[:8]}/changing.txt"
    client = seaweedfs.client()
    client.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"first version")
    with Proxy(upstream=seaweedfs.endpoint) as proxy:
        store = stores.seaweed_store(seaweedfs, host=proxy.host)
        conf = stores.write_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)
        with mounted(conf, tmp_path / "mnt", extra_args=["-o", "ttl=0.2"]) as mnt:
            path = mnt / url_to_mount_path(store.root) / key
            assert path.read_bytes() == b"first version"
            time.sleep(0.3)
            proxy.reset()
            assert path.read_bytes() == b"first version"
            assert [r.status for r in proxy.requests if r.method in ("GET", "HEAD")] == [304]
            client.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"second, longer version")
            time.sleep(0.3)
            assert path.read_bytes() == b"second, longer version"


def test_a_file_that_grew_past_the_small_limit_since_its_listing_is_read_whole(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    prefix = f"small-{uuid.uuid4().hex[:8]}"
    client = seaweedfs.client()
    client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/grows.bin", Body=b"tiny")
    big = os.urandom(3 * MIB + 5)
    store = stores.seaweed_store(seaweedfs)
    conf = stores.write_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)
    with mounted(conf, tmp_path / "mnt", extra_args=["-o", "ttl=0.2,small_file_size=1M"]) as mnt:
        folder = mnt / url_to_mount_path(store.root) / prefix
        assert os.listdir(folder) == ["grows.bin"]  # listed at 4 bytes
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/grows.bin", Body=big)
        time.sleep(0.3)
        with open(folder / "grows.bin", "rb") as f:
            assert f.read() == big


def test_a_fetcher_process_killed_mid_walk_costs_the_reader_nothing_and_all_end_with_the_mount(
    folder, seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    prefix, contents = folder
    names = sorted(contents)
    store = stores.seaweed_store(seaweedfs)
    conf = stores.write_conf(tmp_path / "clearml.conf", tmp_path / "cache", store)
    seen: set[int] = set()
    with mounted(conf, tmp_path / "mnt") as mnt:
        folder_path = mnt / url_to_mount_path(store.root) / prefix
        for name in names[:10]:
            assert (folder_path / name).read_bytes() == contents[name]
        assert poll(lambda: len(fetchers_of(tmp_path / "mnt")) == 2, 10), "the mount did not start two fetchers"
        seen |= fetchers_of(tmp_path / "mnt")
        for pid in seen:
            os.kill(pid, signal.SIGKILL)
        for name in names[10:]:
            assert (folder_path / name).read_bytes() == contents[name], name
        assert poll(lambda: len(fetchers_of(tmp_path / "mnt") - seen) > 0, 10), "no fetcher took the dead ones' place"
        seen |= fetchers_of(tmp_path / "mnt")
    assert poll(lambda: not any(Path(f"/proc/{pid}").exists() for pid in seen), 10), "fetchers outlived the mount"


@pytest.mark.parametrize(
    "broken",
    [
        "import sys; sys.exit(3)",
        "import sys, time; sys.stdout.buffer.write(b'garbage!'); sys.stdout.flush(); time.sleep(60)",
    ],
    ids=["exits", "answers-garbage-and-stays"],
)
def test_fetchers_that_cannot_start_fail_their_fetch_and_are_given_up_after_three(
    tmp_path: Path, broken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken install (say, clearmlfs importable only through PYTHONPATH, which -I ignores) must cost the
    mount nothing but its read-ahead helpers: each fetch fails as a StorageError, which the read-ahead drops,
    and after three failed starts the mount stops trying and fetches in its own threads."""
    import sys

    import trio

    from clearmlfs.config import Settings
    from clearmlfs.errors import StorageError
    from clearmlfs.fetcher import Setup
    from clearmlfs.fs.fetchers import Fetchers

    monkeypatch.setattr(Fetchers, "COMMAND", (sys.executable, "-c", broken))
    fetchers = Fetchers(Setup(Settings(), tmp_path, "global", 100, None, "WARNING"), processes=2)
    failures = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(fetchers.run)
            assert fetchers.available
            while fetchers.available:
                with pytest.raises(StorageError) as caught:
                    await fetchers.fetch_small("s3://127.0.0.1:1/b/x", 1024, None)
                failures.append(str(caught.value))
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(failures) == 3, failures


def test_a_dataset_of_more_files_than_the_sdks_limit_is_fetched_once_over_two_epochs(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    # ClearML's default_cache_manager_size (100) is not set in this clearml.conf: the mount counts no files, and
    # the second epoch is served from the cache.
    prefix = f"epochs-{uuid.uuid4().hex[:8]}"
    client = seaweedfs.client()
    names = [f"{i:03d}.bin" for i in range(250)]
    for name in names:
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{name}", Body=name.encode() * 100)
    with proxied_mount(seaweedfs, tmp_path, "ttl=3600") as (proxy, bucket):
        proxy.reset()
        for epoch in range(2):
            for name in random.Random(epoch).sample(names, len(names)):
                assert (bucket / prefix / name).read_bytes() == name.encode() * 100, name
        fetched = [r.path.rpartition("/")[2] for r in proxy.requests if r.method == "GET" and f"/{prefix}/" in r.path]
        assert sorted(fetched) == names, f"{len(fetched)} GETs for {len(names)} files over two epochs"
