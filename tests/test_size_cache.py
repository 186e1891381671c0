"""The ClearML SDK's size-aware cache mode (`sdk.storage.cache.disk_space_file_size_strategy`): with it on,
clearmlfs and the real SDK still share one cache — the same layout, the same eviction by bytes, pins kept."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from clearmlfs import StorageManager
from clearmlfs.cache import CacheContext
from clearmlfs.cli import describe
from clearmlfs.config import load_settings
from clearmlfs.errors import ConfigError
from clearmlfs.urls import url_to_mount_path
from tests import servers, stores
from tests.mounting import mounted, no_mounts_left, poll  # noqa: F401 - no_mounts_left: a session fixture
from tests.proxy import Proxy
from tests.stores import Store

KB = 1000
SECTION = "disk_space_file_size_strategy"

_SDK_GET = """
import sys
from clearml import StorageManager
for url in sys.argv[1:]:
    print("CACHED:" + str(StorageManager.get_local_copy(url, extract_archive=False)))
"""

_SDK_EXTRACT = """
import sys
from clearml import StorageManager
for url in sys.argv[1:]:
    print("CACHED:" + str(StorageManager.get_local_copy(url, name="a-name")))
"""

_SDK_PATH = """
import sys
from clearml.storage.helper import StorageHelperDiskSpaceFileSizeStrategy as Helper
for url in sys.argv[1:]:
    helper = Helper.get(url)
    print("PATH:" + helper._get_cache_path(helper._get_direct_access_path(url)[1]))
"""


def _sdk(script: str, conf: Path, home: Path, *urls: str) -> list[str]:
    """`script` run by the real SDK in a clean process that knows only `conf`; its tagged answers, in order."""
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CLEARML_CONFIG_FILE": str(conf), "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-c", script, *urls], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"clearml SDK failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    answers = [line.split(":", 1)[1] for line in done.stdout.splitlines() if line.startswith(("CACHED:", "PATH:"))]
    assert len(answers) == len(urls), f"unexpected SDK output:\n{done.stdout}\n{done.stderr}"
    return answers


def _size_mode(max_used: Any = -1, threshold: float = 20.0, margin: str = "10%") -> dict[str, Any]:
    size = {"max_used_bytes": max_used, "min_free_bytes": 0, "cleanup_margin_percent": margin}
    return {"storage": {"cache": {"cleanup_seconds_threshold": threshold, SECTION: {"enabled": True, "size": size}}}}


def _put(sw: servers.SeaweedFS, store: Store, url: str, data: bytes) -> str:
    key = url[len(store.root) + 1 :]
    sw.client().put_object(Bucket=sw.bucket, Key=key, Body=data)
    return key


def _age(path: Path, seconds: float) -> None:
    """Make `path` look last used `seconds` ago (its access time: the SDK's eviction order in this mode)."""
    st = path.stat()
    os.utime(path, (time.time() - seconds, st.st_mtime))


def _files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in (cache / "storage").rglob("*") if p.is_file()}


@pytest.fixture()
def proxied(seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy) -> Store:
    return stores.seaweed_store(seaweedfs, host=seaweedfs_proxy.host)


# -- settings, as the SDK reads them -------------------------------------------------------------------------
def _settings(tmp_path: Path, sdk: dict[str, Any]) -> Any:
    conf = stores.write_conf(tmp_path / "c.conf", tmp_path / "cache", extra=sdk)
    return load_settings(conf)


def test_mode_is_off_by_default_and_on_when_enabled_or_a_legacy_size_section_is_set(tmp_path: Path) -> None:
    assert _settings(tmp_path, {}).size_cache is None
    assert _settings(tmp_path, {"storage": {"cache": {SECTION: {"enabled": False, "size": {}}}}}).size_cache is None
    on = _settings(tmp_path, {"storage": {"cache": {SECTION: {"enabled": True}}}}).size_cache
    assert on is not None and on.min_free_bytes == 10**10 and on.max_used_bytes == -1  # the SDK's "10GB"
    legacy = _settings(tmp_path, {"storage": {"cache": {"size": {"max_used_bytes": "2GB"}}}}).size_cache
    assert legacy is not None and legacy.max_used_bytes == 2 * 10**9
    binary = _settings(tmp_path, {"storage": {"cache": {SECTION: {"enabled": True, "size": {
        "max_used_bytes": "1GiB", "cleanup_margin_percent": 20}}}}}).size_cache
    assert binary is not None and binary.max_used_bytes == 2**30 and binary.cleanup_margin == 0.2


@pytest.mark.parametrize("sdk, reason", [
    ({SECTION: {"enabled": "false"}}, "unquoted"),
    ({SECTION: {"enabled": True, "size": {"max_used_bytes": "2G"}}}, "ambiguous"),
    ({SECTION: {"enabled": True, "secondary": {"default_base_dir": "/mnt/team-cache"}}}, "secondary cache"),
], ids=["quoted-enabled", "ambiguous-unit", "secondary"])
def test_what_clearmlfs_cannot_follow_is_a_config_error(tmp_path: Path, sdk: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        _settings(tmp_path, {"storage": {"cache": sdk}})


def test_config_shows_the_mode_its_limits_and_where_each_comes_from(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"

    def shown(sdk: dict[str, Any]) -> list[str]:
        return [line for line in describe(_settings(tmp_path, sdk)) if line.startswith(("cache:", "size-aware"))]

    cache, mode = shown(_size_mode(max_used="2GB", threshold=30))
    strategy = f"{conf}: sdk.storage.cache.{SECTION}"
    assert cache.endswith("file limit 100 [default] (not applied: size-aware cache)")
    assert mode == (
        f"size-aware cache: on [{strategy}.enabled], max used 2000000000 bytes [{strategy}.size.max_used_bytes], "
        f"min free no limit [{strategy}.size.min_free_bytes], margin 10% [{strategy}.size.cleanup_margin_percent], "
        f"files used within 30 s kept [{conf}: sdk.storage.cache.cleanup_seconds_threshold]"
    )
    _, legacy = shown({"storage": {"cache": {"size": {"max_used_bytes": "1GiB"}}}})
    assert legacy == (
        f"size-aware cache: on [{conf}: sdk.storage.cache.size], max used 1073741824 bytes "
        f"[{conf}: sdk.storage.cache.size.max_used_bytes], min free 10000000000 bytes [default], margin 5% "
        "[default], files used within 20 s kept [default]"
    )
    cache, off = shown({})
    assert off == "size-aware cache: off [default]"
    assert cache.endswith("file limit 100 [default] (the API's; the mount counts no files: bytes and free space "
                          "decide)")
    _, disabled = shown({"storage": {"cache": {SECTION: {"enabled": False}}}})
    assert disabled == f"size-aware cache: off [{strategy}.enabled]"


def test_clearmlfs_own_limits_are_refused_in_this_mode(tmp_path: Path) -> None:
    settings = _settings(tmp_path, _size_mode())
    with pytest.raises(ConfigError, match="min_free_bytes"):
        CacheContext(settings.cache_dir, min_free="5%", size_mode=settings.size_cache)


# -- one cache with the SDK ----------------------------------------------------------------------------------
def test_cache_path_of_each_url_is_the_sdks(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    store = stores.seaweed_store(seaweedfs)
    conf, cache_dir = stores.conf_for(tmp_path, "layout", store, extra=_size_mode())
    prefix = store.fresh_prefix()
    urls = [f"{prefix}/{name}" for name in (
        "plain.bin", "sp ace/é ü/(v2).pt", "a:b/c%20d", "q?x=1", "y" * 300 + ".bin", "a//b/./c",
    )]
    settings = load_settings(conf)
    cache = CacheContext(settings.cache_dir, size_mode=settings.size_cache)
    assert [str(cache.path_for(url)) for url in urls] == _sdk(_SDK_PATH, conf, tmp_path / "home", *urls)


def test_file_fetched_by_the_sdk_is_found_by_clearmlfs_without_a_download(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, proxied: Store, tmp_path: Path
) -> None:
    conf, cache_dir = stores.conf_for(tmp_path, "sdk-first", proxied, extra=_size_mode())
    url = f"{proxied.fresh_prefix()}/data/train.npz"
    data = stores.random_bytes(300 * KB, seed=1)
    key = _put(seaweedfs, proxied, url, data)
    [got] = _sdk(_SDK_GET, conf, tmp_path / "home", url)
    assert Path(got) == cache_dir / "storage" / url.replace("://", "/").replace(":", ".", 1)
    assert seaweedfs_proxy.count("GET", key) >= 1, "the SDK did not download through the proxy"
    seaweedfs_proxy.reset()
    StorageManager.configure(conf)
    assert StorageManager.get_local_copy(url) == got
    assert seaweedfs_proxy.count("GET", key) == 0, f"clearmlfs downloaded again: {seaweedfs_proxy.requests}"
    assert Path(got).read_bytes() == data


def test_file_fetched_by_clearmlfs_is_found_by_the_sdk_without_a_download(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, proxied: Store, tmp_path: Path
) -> None:
    conf, cache_dir = stores.conf_for(tmp_path, "fs-first", proxied, extra=_size_mode())
    url = f"{proxied.fresh_prefix()}/weights (v2).pt"
    data = stores.random_bytes(300 * KB, seed=2)
    key = _put(seaweedfs, proxied, url, data)
    StorageManager.configure(conf)
    ours = StorageManager.get_local_copy(url)
    assert ours is not None and Path(ours).is_relative_to(cache_dir / "storage") and Path(ours).read_bytes() == data
    seaweedfs_proxy.reset()
    assert _sdk(_SDK_GET, conf, tmp_path / "home", url) == [ours]
    assert seaweedfs_proxy.count("GET", key) == 0, f"the SDK downloaded again: {seaweedfs_proxy.requests}"


def _archive(name: str) -> bytes:
    out = io.BytesIO()
    if name.endswith(".zip"):
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("inner/a.txt", "a")
    else:
        with tarfile.open(fileobj=out, mode="w:gz") as tf:
            info = tarfile.TarInfo("inner/a.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"a"))
    return out.getvalue()


def test_archive_is_extracted_next_to_its_copy_into_the_folder_the_sdk_uses(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    """In this mode the SDK extracts to ``<md5(url)>.<name without suffix>_artifacts_archive_cache`` beside the
    copy, whatever `name` is given; an archive either extracted is reused by the other, not extracted again."""
    store = stores.seaweed_store(seaweedfs)
    conf, cache_dir = stores.conf_for(tmp_path, "archives", store, extra=_size_mode())
    prefix = store.fresh_prefix()
    sdk_first, ours_first = f"{prefix}/sdk first/model.zip", f"{prefix}/ours-first/data.tar.gz"
    for url in (sdk_first, ours_first):
        _put(seaweedfs, store, url, _archive(url))
    [theirs] = _sdk(_SDK_EXTRACT, conf, tmp_path / "home", sdk_first)
    copy = cache_dir / "storage" / sdk_first.replace("://", "/").replace(":", ".", 1)
    digest = hashlib.md5(sdk_first.encode()).hexdigest()
    assert theirs == str(copy.parent / f"{digest}.model_artifacts_archive_cache")
    (Path(theirs) / "left-by-the-sdk").write_text("kept")
    StorageManager.configure(conf)
    assert StorageManager.get_local_copy(sdk_first, name="a-name") == theirs
    assert (Path(theirs) / "left-by-the-sdk").is_file() and (Path(theirs) / "inner/a.txt").read_text() == "a"
    ours = StorageManager.get_local_copy(ours_first, name="a-name")
    assert ours is not None and (Path(ours) / "inner/a.txt").read_text() == "a"
    (Path(ours) / "left-by-clearmlfs").write_text("kept")
    assert _sdk(_SDK_EXTRACT, conf, tmp_path / "home", ours_first) == [ours]
    assert (Path(ours) / "left-by-clearmlfs").is_file()
    assert Path(ours).name == f"{hashlib.md5(ours_first.encode()).hexdigest()}.data_artifacts_archive_cache"


# -- eviction by bytes -----------------------------------------------------------------------------------------
def _populate(sw: servers.SeaweedFS, store: Store, tmp_path: Path, names: str) -> tuple[list[str], Path, Path]:
    """Objects of 300 kB, fetched by the SDK into a cache without limits, each last used a minute before the
    next, and a 1-byte object `e` not fetched: (urls, that cache, a copy of it with the same access times)."""
    conf, cache = stores.conf_for(tmp_path, "fill", store, extra=_size_mode())
    prefix = store.fresh_prefix()
    urls = [f"{prefix}/{name}.bin" for name in names]
    for i, url in enumerate(urls):
        _put(sw, store, url, stores.random_bytes(300 * KB, seed=10 + i))
    # (1 byte: whether the SDK's cleanup, which runs beside its download, counts it or not changes nothing)
    _put(sw, store, f"{prefix}/e.bin", b"e")
    paths = _sdk(_SDK_GET, conf, tmp_path / "home", *urls)
    twin = tmp_path / "twin-cache"
    shutil.copytree(cache, twin)
    for i, path in enumerate(paths):
        for root in (cache, twin):
            _age(root / Path(path).relative_to(cache), 60.0 * (len(paths) - i))
    return urls, cache, twin


def test_clearmlfs_evicts_what_the_sdk_evicts_oldest_first_down_to_the_margin(
    seaweedfs: servers.SeaweedFS, tmp_path: Path
) -> None:
    store = stores.seaweed_store(seaweedfs)
    urls, sdk_cache, our_cache = _populate(seaweedfs, store, tmp_path, "abcd")  # 1.2 MB
    new = f"{urls[0].rsplit('/', 1)[0]}/e.bin"
    limits = _size_mode(max_used="1MB", margin="10%")  # over 1 MB: evict down to 900 kB
    sdk_conf = stores.write_conf(tmp_path / "sdk.conf", sdk_cache, store, extra=limits)
    our_conf = stores.write_conf(tmp_path / "ours.conf", our_cache, store, extra=limits)
    _sdk(_SDK_GET, sdk_conf, tmp_path / "home", new)
    StorageManager.configure(our_conf)
    assert StorageManager.get_local_copy(new) is not None
    kept = _files(our_cache)
    assert kept == _files(sdk_cache), "clearmlfs and the SDK evicted different files"
    assert {name.rsplit("/", 1)[-1] for name in kept} == {"c.bin", "d.bin", "e.bin"}  # a, b: the oldest


def test_pinned_copy_is_evicted_by_neither_clearmlfs_nor_the_sdk(seaweedfs: servers.SeaweedFS, tmp_path: Path) -> None:
    store = stores.seaweed_store(seaweedfs)
    urls, cache_dir, _ = _populate(seaweedfs, store, tmp_path, "abcd")
    limits = _size_mode(max_used="1MB", margin="10%", threshold=2.0)
    conf = stores.write_conf(tmp_path / "limited.conf", cache_dir, store, extra=limits)
    settings = load_settings(conf)
    cache = CacheContext(settings.cache_dir, size_mode=settings.size_cache)
    oldest = cache.path_for(urls[0])
    with cache.pin(oldest):
        _age(oldest, 600)  # pinned long ago: this process keeps its access time recent for the SDK
        assert poll(lambda: time.time() - oldest.stat().st_atime < 2.0, 10.0), "the pinned copy was not touched"
        new = f"{urls[0].rsplit('/', 1)[0]}/e.bin"
        _sdk(_SDK_GET, conf, tmp_path / "home", new)  # its cleanup evicts b and c, and stops at a: used now
        assert oldest.is_file(), "the SDK evicted a copy clearmlfs has pinned"
        assert not cache.path_for(urls[1]).exists() and not cache.path_for(urls[2]).exists()
        _age(oldest, 600)
        for path in (cache.path_for(url) for url in (urls[3], new)):
            _age(path, 300)
        smaller = CacheContext(settings.cache_dir, size_mode=replace(settings.size_cache, max_used_bytes=500 * KB))
        evicted = smaller.clean()  # a, d (and 1-byte e): over 500 kB, down to 450 kB
        assert oldest not in evicted and oldest.is_file(), "clearmlfs evicted a pinned copy"
        assert evicted == [cache.path_for(urls[3])], "not the oldest unpinned copy alone"
    _age(oldest, 600)
    assert smaller.clean() == [], "under its limits"
    tiny = CacheContext(settings.cache_dir, size_mode=replace(settings.size_cache, max_used_bytes=1))
    assert tiny.clean() == [oldest, cache.path_for(new)], "unpinned, the oldest copy goes first"


# -- the mount -------------------------------------------------------------------------------------------------
def test_file_read_through_the_mount_lands_in_the_sdks_layout_and_the_sdk_finds_it(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, proxied: Store, tmp_path: Path
) -> None:
    conf, cache_dir = stores.conf_for(tmp_path, "mount", proxied, extra=_size_mode())
    url = f"{proxied.fresh_prefix()}/model/weights.bin"
    data = stores.random_bytes(3 * 1024 * 1024 + 17, seed=3)
    key = _put(seaweedfs, proxied, url, data)
    expected = cache_dir / "storage" / url.replace("://", "/").replace(":", ".", 1)
    with mounted(conf, tmp_path / "mnt") as mnt:
        assert (mnt / url_to_mount_path(url)).read_bytes() == data
        assert poll(lambda: expected.is_file() and expected.stat().st_size == len(data), 10.0), (
            f"no complete copy at {expected}: {sorted(_files(cache_dir))}"
        )
    seaweedfs_proxy.reset()
    assert _sdk(_SDK_GET, conf, tmp_path / "home", url) == [str(expected)]
    assert seaweedfs_proxy.count("GET", key) == 0, f"the SDK downloaded again: {seaweedfs_proxy.requests}"


def test_file_written_through_the_mount_is_found_by_the_sdk_without_a_download(
    seaweedfs: servers.SeaweedFS, seaweedfs_proxy: Proxy, proxied: Store, tmp_path: Path
) -> None:
    conf, cache_dir = stores.conf_for(tmp_path, "write", proxied, extra=_size_mode())
    url = f"{proxied.fresh_prefix()}/new/folder/written.bin"
    data = stores.random_bytes(200 * KB, seed=4)
    with mounted(conf, tmp_path / "mnt") as mnt:
        target = mnt / url_to_mount_path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    key = url[len(proxied.root) + 1 :]
    assert seaweedfs.client().get_object(Bucket=seaweedfs.bucket, Key=key)["Body"].read() == data
    seaweedfs_proxy.reset()
    [got] = _sdk(_SDK_GET, conf, tmp_path / "home", url)
    assert got == str(cache_dir / "storage" / url.replace("://", "/").replace(":", ".", 1))
    assert Path(got).read_bytes() == data
    assert seaweedfs_proxy.count("GET", key) == 0, f"the SDK downloaded again: {seaweedfs_proxy.requests}"
