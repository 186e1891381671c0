"""The ClearML SDK's size-aware cache (``sdk.storage.cache.disk_space_file_size_strategy``): where it keeps the
copy of a URL, how it reads its settings, and which copies its cleaner removes.

When clearml.conf turns the mode on, the SDK keeps a URL's copy at a path made of the URL itself,
``<base>/storage/<scheme>/<host>/<bucket>/<key>``, and evicts files, oldest access time first, while the cache
holds more than ``max_used_bytes`` or its disk has less than ``min_free_bytes`` free, down to a margin below
those limits; it stops at the first file accessed within ``cleanup_seconds_threshold`` of the scan. clearmlfs
follows the same rules (`CacheContext` in this mode) so that both keep sharing one cache.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

SDK_FOLDER = "storage"  # <cache base>/storage: the SDK's CacheConfigs.cache_base_dir in this mode
STATE_CONTEXT = "storage"  # our state folder for it, <base>/clearmlfs/storage: one for every cache context
SESSION_FILE = ".session.json"  # the SDK's, at the top of the folder: never evicted
SECTION = "storage.cache.disk_space_file_size_strategy"
LEGACY_SECTIONS = ("storage.cache.size", "storage.cache.secondary")
DEFAULT_MIN_FREE = "10GB"
DEFAULT_MARGIN = 0.05
DEFAULT_CLEANUP_SECONDS = 20.0
_SAFE = "/\\=[]!~()#@$&%'+,;+ "  # what the SDK's _limit_folder_name leaves unquoted
_UNITS = {"b": 0, "byte": 0, "kb": 1, "kilobyte": 1, "mb": 2, "megabyte": 2, "gb": 3, "gigabyte": 3,
          "tb": 4, "terabyte": 4, "pb": 5, "petabyte": 5}
_BINARY = {"kib": 1, "kibibyte": 1, "mib": 2, "mebibyte": 2, "gib": 3, "gibibyte": 3, "tib": 4, "tebibyte": 4,
           "pib": 5, "pebibyte": 5}


# -- settings, read as the SDK reads them (clearml/storage/helper.py, size.py, utilities/config.py) ------------
def parse_sdk_size(value: Any) -> int:
    """A size as the SDK reads it: a number is bytes; text is decimal unless its unit says binary ("10GB" is
    10**10, "1GiB" 2**30); a bare "G" is refused, as by the SDK."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]+)?", str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (such as 500MB, 10GB or 2GiB)")
    label = (match.group(2) or "b").lower()
    if len(label) > 1 and label.endswith("s"):
        label = label[:-1]
    if label in _BINARY:
        return int(float(match.group(1)) * 1024 ** _BINARY[label])
    if label not in _UNITS:
        raise ValueError(f"{value!r}: unit {match.group(2)!r} is ambiguous or unknown (say MB or MiB, GB or GiB)")
    return int(float(match.group(1)) * 1000 ** _UNITS[label])


def parse_sdk_percentage(value: Any) -> float:
    """A fraction as the SDK reads one: "5%" and 5 are 0.05, and so is 0.05 (a number below 1)."""
    text = str(value).strip()
    number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    return number if text.endswith("%") or number < 1 else number / 100


def lookup(sdk: Any, dotted: str, missing: Any = None) -> Any:
    """`dotted` in the plain `sdk` tree; `missing` if any part is absent (a None value is present)."""
    node = sdk
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def mode_on(sdk: Any) -> bool:
    """Whether the SDK routes downloads through this cache: `enabled`, or else a non-empty legacy section."""
    enabled = lookup(sdk, f"{SECTION}.enabled")
    if enabled is not None:
        if isinstance(enabled, str):  # the SDK takes any text, "false" too, as true
            raise ValueError(f"sdk.{SECTION}.enabled must be true or false unquoted, not {enabled!r}")
        return bool(enabled)
    return any(bool(lookup(sdk, section)) for section in LEGACY_SECTIONS)


def setting(sdk: Any, *keys: str, default: Any = None) -> Any:
    """`keys` under the strategy section, else at the legacy place directly under storage.cache (the SDK's
    _resolved_disk_config_key); `default` when absent or null."""
    marker = object()
    value = lookup(sdk, ".".join((SECTION, *keys)), marker)
    if value is marker:
        value = lookup(sdk, ".".join(("storage.cache", *keys)))
    return default if value is None else value


def setting_keys(sdk: Any) -> dict[str, str]:
    """The key (``sdk.…``) each setting of this mode is read from (by `mode_on`, `setting`): where clearml.conf
    sets it, else where it belongs. "mode" is the key that turns the mode on or off."""
    legacy = next((section for section in LEGACY_SECTIONS if lookup(sdk, section)), None)
    mode = legacy if legacy and lookup(sdk, f"{SECTION}.enabled") is None else f"{SECTION}.enabled"
    keys = {"mode": mode, "cleanup_seconds_threshold": "storage.cache.cleanup_seconds_threshold"}
    keys |= {name: _read_from(sdk, "size", name) for name in ("max_used_bytes", "min_free_bytes",
                                                              "cleanup_margin_percent")}
    return {name: f"sdk.{key}" for name, key in keys.items()}


def _read_from(sdk: Any, *keys: str) -> str:
    """Where `setting(sdk, *keys)` reads: the strategy section's key if present, else the legacy one if set."""
    marker = object()
    strategy, legacy = ".".join((SECTION, *keys)), ".".join(("storage.cache", *keys))
    if lookup(sdk, strategy, marker) is marker and lookup(sdk, legacy, marker) is not marker:
        return legacy
    return strategy


def secondary_dir(sdk: Any) -> str:
    """The SDK's secondary cache folder, if one is configured ("" if not)."""
    return str(
        os.environ.get("CLEARML_SECONDARY_CACHE_DIR")
        or lookup(sdk, f"{SECTION}.secondary.default_base_dir")
        or lookup(sdk, "storage.cache.secondary.default_base_dir")
        or ""
    )


# -- layout ---------------------------------------------------------------------------------------------------
def relative_path(url: str) -> str:
    """Where the SDK keeps `url`'s copy, relative to ``<base>/storage`` (its _get_cache_path and _safe_os_join:
    ``<scheme>/<host with ':' as '.'>/<path>``, http as https, a query hashed into the name, each part quoted and
    shortened to 255 characters). ValueError for a key that would climb out of the folder."""
    scheme, _, rest = url.partition("://")
    if not _:
        scheme, rest = "", url
    netloc, _, rest = rest.partition("/")
    path, _, query = rest.partition("#")[0].partition("?")
    if query:
        parts = path.split("/")
        parts[-1] = f"{hashlib.md5(query.encode(), usedforsecurity=False).hexdigest()}.{parts[-1]}"
        filename = "/".join(parts if parts[0] else parts[1:])
    else:
        filename = str(Path(path.lstrip("/")))
    scheme = "https" if scheme == "http" else scheme
    relative = os.path.join(*(_limit(p) for p in (scheme, netloc.replace(":", "."), filename)))
    if relative.startswith("/") or ".." in relative.split("/"):
        raise ValueError(f"{url!r} has no place in the SDK's size-aware cache (its key climbs out of it)")
    return relative


def _limit(part: str) -> str:
    part = quote(part, safe=_SAFE) if part else part
    if len(part) <= 255:
        return part
    return "/".join(
        f if len(f) <= 255 else f"{hashlib.md5(f.encode(), usedforsecurity=False).hexdigest()}.{f[-200:]}"
        for f in part.split("/")
    )


def state_key(relative: str, max_name_length: int = 255) -> str:
    """One flat name for the copy at `relative`, for its records in our state folder: ``<md5>.<file name>``."""
    digest = hashlib.md5(relative.encode(), usedforsecurity=False).hexdigest()
    name = f"{digest}.{relative.rsplit('/', 1)[-1]}"
    return name[: max_name_length - 40]  # room for our suffixes (.json, .fetch, lock numbers)


# -- eviction -------------------------------------------------------------------------------------------------
def files(folder: Path, skip: Callable[[str], bool]) -> Iterator[tuple[float, str, int]]:
    """(access time, path, size) of each file under `folder` the SDK's cleaner counts, but those `skip`ped."""
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            if dirpath == str(folder) and name == SESSION_FILE:
                continue
            path = os.path.join(dirpath, name)
            if skip(path):
                continue
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            yield st.st_atime, path, st.st_size


def plan(
    found: list[tuple[float, str, int]], used: int, free: Callable[[], int], max_used: int, min_free: int,
    margin: float, threshold: float, evict: Callable[[str], bool],
) -> list[str]:
    """The SDK's _do_clean_cache over `found`: oldest access first, while `used` is at least `max_used` less the
    margin or `free()` at most `min_free` plus the margin, stopping at the first file accessed within
    `threshold` seconds. `evict(path)` removes one (False: in use, skipped and not counted)."""
    margin = min(0.99, max(0.0, margin))
    used_target = max_used * (1 - margin)
    free_target = min_free * (1 + margin)
    heap = list(found)
    heapq.heapify(heap)
    started = time.time()
    evicted = []
    while heap and ((max_used > 0 and used >= used_target) or (min_free > 0 and free() <= free_target)):
        stamp, path, size = heapq.heappop(heap)
        if started - stamp < threshold:
            break  # everything left was used just now: the SDK leaves it too
        if evict(path):
            used -= size
            evicted.append(path)
    return evicted


def over_limits(used: int, free: int, max_used: int, min_free: int) -> bool:
    """Whether the SDK would start a cleanup: at or above `max_used`, or at most `min_free` free."""
    return (max_used > 0 and used >= max_used) or (min_free > 0 and free <= min_free)
