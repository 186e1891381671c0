"""What exists where: turning mount paths into buckets, prefixes and objects (and local paths).

The levels above a bucket come from clearml.conf (configured buckets, hosts,
accounts); a bucket that is not configured but reachable resolves on lookup.
Below a bucket, key prefixes (delimiter ``/``) are directories and keys are files.
A zero-byte ``prefix/`` marker object is how an empty directory persists.

A web server (a ClearML fileserver, http/ and https/) cannot list: a name there is a file if a HEAD finds
it, or a folder made (mkdir: nothing is sent, the fileserver makes folders as files are stored in them) or
seen through this mount; its readdir shows the names found or made there.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import logging
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from ..backends import Attrs, Backend, BackendPool, ObjectInfo, Prefix
from ..backends.http import UNSERVABLE, files_server_host
from ..cache import SERVED_OFFLINE, CacheContext
from ..config import Settings
from ..errors import (
    AlreadyExists,
    ClearmlfsError,
    ConfigError,
    CrossDevice,
    InvalidURL,
    NameTooLong,
    NotEmpty,
    NotFound,
    StorageError,
    Unsupported,
    unreachable,
)
from ..urls import HTTP_SCHEMES, parse_url
from .entries import Entry
from .inodes import InodeTable, Kind, Node
from .workers import Workers
from .writeback import WriteBack

log = logging.getLogger(__name__)

AZURE_SUFFIX = ".blob.core.windows.net"
EMPTY = Path("/dev/null")  # the body of a directory marker
LOOKUP_LIST_CAP = 5000  # a lookup lists its parent when the parent holds no more than this
LIST_PAGE = 1000  # entries one listing request returns (S3, GCS and Azure alike)
# Opens of a folder's files within `ttl` that make one listing page cost less than asking about each file:
# a page is one request, but parsing its 1,000 entries costs this process as much CPU as some 30 small GETs.
LIST_WORTH = 16
READING_OPENS = 8  # opens of a folder's files per `ttl` from which its lookups fetch small files (`with_attrs`)


NAME_MAX = 255  # bytes: longer names cannot be looked up through the kernel
DELETE_CHUNK = 100  # keys a folder rename deletes per call (the provider batches them as it can)
RENAME_CONCURRENCY = 16  # copies (then deletions) in flight while a folder is renamed
ATTRS_AHEAD = 256  # files after a stat'ed one whose stored attributes are asked for meanwhile (`ls -l`)
ATTRS_CONCURRENCY = 8  # of those HEADs at once (a fourth of the metadata threads)
KEY_MAX = 1024  # an object key's limit on S3 and GCS (UTF-8 bytes) and Azure (characters)
# What a bucket or container name can be, at its most permissive (old S3 regions: up to 255 characters, capitals
# and underscores): anything else, the dot-files shells and tools probe for among them, is not asked about.
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
WEB_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:\d{1,5})?")  # host[:port] under http/
# After a bucket's server failed to answer, what is cached of it is served without asking it again for this
# long: one stall costs a path walk one revalidation budget, not one per component.
OFFLINE_HOLD = 10.0
OFFLINE = object()  # `ask_or_cached`'s answer when the cached copy is to be served


T = TypeVar("T")


def valid_name(name: str) -> bool:
    """Names a directory entry can have; other keys (``a//b``, ``../x``, over 255 bytes) are not shown."""
    return (
        bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name
        and len(os.fsencode(name)) <= NAME_MAX
    )


def check_length(name: str) -> None:
    """ENAMETOOLONG for a name longer than a directory entry can be."""
    if len(os.fsencode(name)) > NAME_MAX:
        raise NameTooLong(f"{name[:40]}...: a name is at most {NAME_MAX} bytes")


def listable(url: str) -> bool:
    """Whether the storage of `url` can list what it holds (a web server cannot)."""
    return not url.startswith(tuple(f"{scheme}://" for scheme in HTTP_SCHEMES))


def valid_key_name(name: str) -> bool:
    """A name that can be part of an object key: object keys are UTF-8 text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return valid_name(name)


@dataclass
class OpenRate:
    """How many files of one folder were opened per `ttl` window, all of them and those of a cached copy too old
    to trust (which must ask): this window's counts and the one's before it (a rate must not drop to 0 as a
    window begins)."""

    start: float
    opens: int = 0
    revalidating: int = 0
    before: tuple[int, int] = (0, 0)

    def count(self, now: float, ttl: float, opens: int, revalidating: int) -> None:
        if now - self.start >= ttl:
            recent = now - self.start < 2 * ttl
            self.before = (self.opens, self.revalidating) if recent else (0, 0)
            self.start, self.opens, self.revalidating = now, 0, 0
        self.opens += opens
        self.revalidating += revalidating

    def lately(self) -> OpenRate:
        """The busier of the two windows, per count."""
        return OpenRate(self.start, max(self.opens, self.before[0]), max(self.revalidating, self.before[1]))


class Namespace:
    def __init__(
        self, settings: Settings, backends: BackendPool, cache: CacheContext, workers: Workers, writeback: WriteBack,
        ttl: float = 1.0, list_ttl: float = 10.0, rename_dir_limit: int = 10_000, stored_times: bool = True,
    ) -> None:
        self.settings, self.backends, self.cache, self.workers = settings, backends, cache, workers
        self.writeback = writeback
        self.entries = writeback.entries
        self.ttl = ttl  # object attributes (and so the ETag checked on open) are at most this old
        self.list_ttl = max(ttl, list_ttl)  # a listing answers readdir and positive lookups this long
        self.table = InodeTable(self.list_ttl)
        self.rename_dir_limit = rename_dir_limit  # objects a folder rename moves at most (EXDEV beyond)
        # Whether a file's stat shows what its metadata stores even where that costs a HEAD (S3 listings do
        # not show it); if not, the server's time stands in until a HEAD or GET made anyway tells.
        self.stored_times = stored_times
        self._heads: dict[str, trio.Event] = {}  # URL → its stored attributes' HEAD, while under way
        self._sorted: dict[int, tuple[float, list[str]]] = {}  # a folder's inode → (its listing's time, names)
        self._nursery: trio.Nursery | None = None
        self._listing: dict[int, trio.Event] = {}  # folders listed for a lookup right now: one listing each
        self._stat_walk = 0  # the folder whose files a client stats one by one (`stats_ahead`)
        # Learns a small file's stored attributes from a GET of it instead of a HEAD (`SmallFiles.attrs_by_get`):
        # True if the server was asked. Wired by the mount; None: always a HEAD.
        self.attrs_by_get: Callable[[Node], Awaitable[bool]] | None = None
        self._attrs_limiter = trio.CapacityLimiter(ATTRS_CONCURRENCY)
        self._unreachable: dict[str, float] = {}  # bucket root URL → time.monotonic() its server last failed
        self._relisting: dict[int, trio.Event] = {}  # folder inode → the listing revalidating its files, under way
        self._opens: dict[int, OpenRate] = {}  # folder inode → how fast its files are opened
        # Folder URL → the names found, made or written in it through this mount, on a storage that cannot list:
        # what stands in for its listing (readdir, and the folders a lookup cannot ask the server about).
        self._unlisted: dict[str, dict[str, Kind]] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def local_changes(self, node: Node) -> bool:
        """Whether `node` has local content the server does not have (the inode table keeps such nodes)."""
        return self.writeback.local_changes(node.url)

    def locate(self, node: Node) -> tuple[Backend, str]:
        parsed = parse_url(node.url)
        return self.backends.get(parsed), parsed.key

    def _fresh(self, stamp: float) -> bool:
        return time.monotonic() - stamp < self.ttl

    def fresh(self, node: Node) -> bool:
        """Whether `node`'s size/ETag came from the server less than `ttl` ago."""
        return self._fresh(node.checked)

    def set_object(self, node: Node, info: ObjectInfo, asked: float | None = None) -> None:
        """Record what the server says of `node`'s object: `info`, in answer to a question sent at `asked`
        (time.monotonic(); None for what our own upload made). An answer to a question sent before the node
        last changed is about an older version (a listing in flight while a flush uploaded, say: it would
        hand the kernel the old size, and an O_APPEND writer would write inside the file): dropped, as are
        answers about a file written here and not uploaded yet, whose cache file is the content."""
        if asked is not None and (asked < node.checked or self.entries.pending(node.url)):
            return
        if info.attrs_known or info.etag != node.etag:  # (a listing's silence says nothing of known metadata)
            node.stored_mtime_ns, node.mode = info.attrs.mtime_ns, _perms(info.attrs.mode)
            node.attrs_known = info.attrs_known
        node.size, node.mtime, node.etag, node.checked = info.size, info.mtime, info.etag, time.monotonic()

    @staticmethod
    def confirm(node: Node, etag: str, when: float) -> None:
        """The server showed `node`'s object at version `etag` at `when` (time.monotonic())."""
        if node.etag == etag and when > node.checked:
            node.checked = when

    # -- serving what is cached while the server cannot answer ---------------------------------------
    def _root(self, url: str) -> str:
        return parse_url(url).root

    def _offline_now(self, url: str) -> bool:
        return time.monotonic() - self._unreachable.get(self._root(url), -OFFLINE_HOLD) < OFFLINE_HOLD

    async def _asking(
        self, url: str, have_copy: bool, fn: Callable[..., T], *args: object, budget: float | None = None
    ) -> T | object:
        """`fn(*args)` in a thread, for `url`, of which something (`have_copy`) is cached and usable offline:
        then within the revalidation budget, and OFFLINE instead of the error if the server cannot answer.
        `budget`: another than the operation's otherwise."""
        usable = have_copy and self.settings.offline_reads
        if usable and self._offline_now(url):
            return OFFLINE
        try:
            result = await self.workers.metadata(
                fn, *args, budget=self.workers.timeouts.revalidate if usable else budget
            )
        except StorageError as exc:
            if unreachable(exc):
                self._unreachable[self._root(url)] = time.monotonic()
                if usable:
                    self._served_offline(url, exc)
                    return OFFLINE
            raise
        if self._unreachable:
            self._unreachable.pop(self._root(url), None)
        return result

    def _served_offline(self, url: str, exc: BaseException | None = None) -> None:
        if self.entries.first_warning(url):
            log.warning("%s: the server did not answer (%s): serving what is cached", url, exc or "offline")

    async def ask_or_cached(
        self, node: Node, fn: Callable[..., T], *args: object, budget: float | None = None
    ) -> T | object:
        """`fn(*args)`, a request that revalidates the object `node`; OFFLINE (the caller serves its cached copy)
        when the server cannot answer and a complete, clean copy of `node`'s version is in the cache."""
        have_copy = bool(node.etag) and node.cached_etag == node.etag
        unseen: StorageError | None = None  # the server's failure, when the copy was not known to this mount
        try:
            result = await self._asking(node.url, have_copy, fn, *args, budget=budget)
        except StorageError as exc:
            # A copy this mount has not seen (left by an earlier mount, the SDK, or a node the kernel forgot)
            # may be cached all the same: it was asked with the whole budget, and is served if it is there.
            if not (unreachable(exc) and self.settings.offline_reads and node.etag):
                raise
            result, unseen = OFFLINE, exc
        if result is OFFLINE:
            info = ObjectInfo(node.url, node.size, node.mtime, node.etag)
            if not await self.workers.metadata(self.cache.has_current, node.url, info):
                raise unseen or StorageError(f"{node.url}: the server did not answer, and no current copy is cached")
            if unseen is not None:
                self._served_offline(node.url, unseen)
            await self.workers.metadata(self.cache.count, SERVED_OFFLINE)
        return result

    # -- the configured levels ---------------------------------------------------------------------
    def _configured(self, node: Node) -> list[tuple[str, Kind, str]]:
        """(name, kind, url) of the entries clearml.conf puts under a ROOT/SCHEME/HOST node."""
        s = self.settings
        if node.kind is Kind.ROOT:
            schemes = [n for n, on in (("s3", _has_s3(s)), ("gs", _has_gs(s)), ("azure", bool(s.azure))) if on]
            schemes += sorted({parse_url(url).scheme for url in _files_servers(s)})
            return [(n, Kind.SCHEME, f"{n}://") for n in schemes] + [("file", Kind.LOCAL, "/")]
        if node.path in HTTP_SCHEMES:
            hosts = {parse_url(url).host for url in _files_servers(s) if url.startswith(f"{node.path}://")}
            return [(h, Kind.BUCKET, f"{node.path}://{h}") for h in sorted(hosts)]
        if node.path == "s3":
            buckets = {c.bucket.split("/")[0] for c in s.s3.credentials if c.bucket and not c.host}
            hosts = {c.host for c in s.s3.credentials if c.host}
            return [(b, Kind.BUCKET, f"s3://{b}") for b in sorted(buckets)] + [
                (h, Kind.HOST, f"s3://{h}") for h in sorted(hosts)
            ]
        if node.path == "gs":
            return [(b, Kind.BUCKET, f"gs://{b}") for b in sorted({c.bucket for c in s.gcs if c.bucket})]
        if node.path == "azure":
            accounts = sorted({c.account_name + AZURE_SUFFIX for c in s.azure})
            return [(a, Kind.HOST, f"azure://{a}") for a in accounts]
        if node.kind is Kind.HOST and node.url.startswith("s3://"):
            host = node.name
            names = {c.bucket.split("/")[0] for c in s.s3.credentials if c.host == host and c.bucket}
            return [(b, Kind.BUCKET, f"{node.url}/{b}") for b in sorted(names)]
        if node.kind is Kind.HOST:
            account = node.name.partition(".")[0]
            names = {c.container_name for c in s.azure if c.account_name == account and c.container_name}
            return [(b, Kind.BUCKET, f"{node.url}/{b}") for b in sorted(names)]
        return []

    async def _host_buckets(self, node: Node) -> list[tuple[str, Kind, str]]:
        """Buckets of an S3 host that clearml.conf configures host-wide (an entry without a bucket)."""
        if node.kind is not Kind.HOST or not node.url.startswith("s3://"):
            return []
        try:
            creds = self.settings.s3_for(parse_url(f"{node.url}/any"))
        except ConfigError:  # no entry for the host, and no default credentials
            return []
        if creds.bucket:
            return []
        try:
            names = await self.workers.metadata(self.backends.s3_bucket_names, creds)
        except StorageError:
            return []  # the host may not allow ListBuckets; configured buckets still show
        return [(b, Kind.BUCKET, f"{node.url}/{b}") for b in names]

    async def _resolve_unlisted(self, parent: Node, name: str) -> Node:
        """A bucket/host not in clearml.conf: a host is taken on trust, a bucket must answer a listing."""
        if parent.kind is Kind.ROOT and name in HTTP_SCHEMES:  # (any web server's files, listed or not)
            return self.table.add(parent, name, Kind.SCHEME, f"{name}://")
        if parent.kind is Kind.SCHEME and parent.path in HTTP_SCHEMES:
            if not WEB_HOST.fullmatch(name):
                raise NotFound(parent.child_path(name))
            return self.table.add(parent, name, Kind.BUCKET, f"{parent.url}{name}")
        if parent.kind is Kind.SCHEME and parent.path in ("s3", "azure"):
            is_host = name.endswith(AZURE_SUFFIX) if parent.path == "azure" else ":" in name
            if is_host:
                return self.table.add(parent, name, Kind.HOST, f"{parent.url}{name}")
        if parent.kind is Kind.ROOT or parent.path == "azure" or not BUCKET_NAME.fullmatch(name):
            raise NotFound(parent.child_path(name))  # (azure/ holds storage accounts only)
        known = self.table.at(parent.child_path(name))
        if known is not None and known.kind is Kind.BUCKET:
            return known  # verified once; buckets do not come and go under a mount
        url = f"{parent.url}{name}" if parent.kind is Kind.SCHEME else f"{parent.url}/{name}"
        if self._absent(url):
            raise NotFound(url)
        node = self.table.add(parent, name, Kind.BUCKET, url)
        try:
            # Listing it proves the bucket is there and answers the lookups that follow, in one request.
            node.big = not await self._list_objects(node, cap=LOOKUP_LIST_CAP)
        except StorageError as exc:
            self.table.remove(node)
            if isinstance(exc, NotFound):
                self.entries.note_absent(url)
            raise
        return node

    # -- lookup and listing ------------------------------------------------------------------------
    async def lookup(self, parent: Node, name: str) -> Node:
        if parent.kind is Kind.LOCAL:
            return await self._lookup_local(parent, name)
        check_length(name)
        if not valid_key_name(name):
            raise NotFound(name)
        if parent.kind in (Kind.ROOT, Kind.SCHEME, Kind.HOST):
            for entry_name, kind, url in self._configured(parent):
                if entry_name == name:
                    return self.table.add(parent, name, kind, url)
            return await self._resolve_unlisted(parent, name)
        if not listable(parent.url):
            return await self._lookup_unlisted(parent, name)
        if await self._listing_for_lookup(parent):
            child = self.table.child(parent, name)
            if child is not None:
                return await self.with_attrs(child)
            if self._fresh(parent.listed):  # a complete listing this recent: trust the miss
                raise NotFound(parent.child_url(name))
        return await self._lookup_object(parent, name)

    async def _lookup_unlisted(self, parent: Node, name: str) -> Node:
        """A name where nothing can be listed: a folder made or seen here, else a file if the server has it."""
        if self._known_names(parent).get(name) is Kind.DIR:
            return self.table.add(parent, name, Kind.DIR, parent.child_url(name))
        try:
            node = await self._lookup_object(parent, name)
        except NotFound:
            self._unlisted.get(parent.url, {}).pop(name, None)
            raise
        self._note_name(parent.url, name, node.kind)
        return node

    def _known_names(self, folder: Node) -> dict[str, Kind]:
        """What a folder that cannot be listed holds, as far as the mount knows: names found or made here, local
        writes, and the folders on the way to a fileserver that lives under a path (``https://host/files``)."""
        base = folder.url.rstrip("/") + "/"
        on_the_way = {
            server[len(base):].partition("/")[0]: Kind.DIR
            for server in _files_servers(self.settings) if server.startswith(base) and len(server) > len(base)
        }
        return {**on_the_way, **self._unlisted.get(folder.url, {}), **self._pending_children(folder)}

    def _note_name(self, folder: str, name: str, kind: Kind) -> None:
        """`folder/name` exists (on a storage that cannot list it): readdir shows it from now on."""
        self._unlisted.setdefault(folder.rstrip("/"), {})[name] = kind

    async def _list_unlisted(self, node: Node) -> list[Node]:
        """The names found or made in a folder that cannot be listed; a file's HEAD is asked again if the
        mount holds nothing of it (one deleted meanwhile is dropped)."""
        children = []
        for name, kind in sorted(self._known_names(node).items()):
            child = self.table.at(node.child_path(name))
            if child is None or child.kind is not kind:
                try:
                    child = await self._lookup_unlisted(node, name)
                except NotFound:
                    continue
            children.append(child)
        self.table.set_listing(node, {c.name: c.inode for c in children})
        return children

    async def _listing_for_lookup(self, parent: Node) -> bool:
        """Whether the parent's listing is held, listing it first (up to LOOKUP_LIST_CAP entries) when cheap.

        One listing answers the lookups of every sibling (`cat dir/*`, a data loader opening
        thousands of files) where per-name requests would cost two each. A prefix too big to list
        that way is looked up name by name.
        """
        while (under_way := self._listing.get(parent.inode)) is not None:  # (lookups of a folder run at once)
            await under_way.wait()
        if parent.children is not None and time.monotonic() - parent.listed < self.list_ttl:
            return True
        if parent.big:
            return False
        done = self._listing[parent.inode] = trio.Event()
        try:
            if not await self._list_objects(parent, cap=LOOKUP_LIST_CAP):
                parent.big = True
                return False
        finally:
            del self._listing[parent.inode]
            done.set()
        return parent.children is not None

    async def _lookup_object(self, parent: Node, name: str) -> Node:
        url = parent.child_url(name)
        if self._absent(url):
            raise NotFound(url)  # asked again right away (shells and editors do): answer from memory
        known = self.table.at(parent.child_path(name))
        try:
            if known is not None and self.settings.offline_reads and self._offline_now(url):
                self._served_offline(url)
                return known
            return await self._fetch_entry(parent, name, url)
        except NotFound:
            self.entries.note_absent(url)
            raise
        except StorageError as exc:
            if known is None or not unreachable(exc) or not self.settings.offline_reads:
                raise
            self._served_offline(url, exc)
            return known  # found before: its attributes stand until the server answers again

    def created(self, url: str) -> None:
        """Our own write made `url` exist: forget that it was missing."""
        self.entries.found(url)
        if not listable(url):
            folder, _, name = url.rpartition("/")
            self._note_name(folder, name, Kind.FILE)

    def _forget_name(self, url: str) -> None:
        folder, _, name = url.rpartition("/")
        self._unlisted.get(folder, {}).pop(name, None)

    def _absent(self, url: str) -> bool:
        """Whether `url` was found missing less than `ttl` ago."""
        since = self.entries.absent_since(url)
        return since is not None and self._fresh(since)

    async def _fetch_entry(self, parent: Node, name: str, url: str) -> Node:
        if self.entries.pending(url):
            return await self._pending_node(parent, name, url)
        backend, key = self.backends.get(parse_url(url)), parse_url(url).key
        asked = time.monotonic()
        if not listable(url):  # (no prefix to ask about: a HEAD says whether there is a file)
            return self._object_node(parent, name, url, await self.workers.metadata(backend.stat, key), asked)
        found: dict[str, object] = {}

        async def ask(what: str, fn: Callable[..., object], *args: object) -> None:
            try:
                found[what] = await self.workers.metadata(fn, *args)
            except StorageError as exc:
                found[what] = exc

        # Both questions at once (one round trip of latency), as mountpoint-s3 does.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "prefix", _first_entry, backend, key + "/")
            nursery.start_soon(ask, "object", backend.stat, key)
        if isinstance(found["prefix"], StorageError) and not isinstance(found["prefix"], NotFound):
            raise found["prefix"]
        # A prefix wins over an object of the same name (`a` and `a/b`): the directory stays reachable.
        if found["prefix"] is not None and not isinstance(found["prefix"], NotFound):
            return self.table.add(parent, name, Kind.DIR, url)
        info = found["object"]
        if isinstance(info, StorageError):
            raise info
        assert isinstance(info, ObjectInfo)
        return self._object_node(parent, name, url, info, asked)

    def _object_node(self, parent: Node, name: str, url: str, info: ObjectInfo, asked: float) -> Node:
        node = self.table.add(parent, name, Kind.FILE, url)
        self.set_object(node, info, asked)
        return node

    async def listdir(self, node: Node) -> list[Node]:
        if node.kind is Kind.LOCAL:
            return await self._list_local(node)
        if node.kind in (Kind.ROOT, Kind.SCHEME, Kind.HOST):
            entries = self._configured(node) + await self._host_buckets(node)
            unique = {name: (name, kind, url) for name, kind, url in entries}
            return [self.table.add(node, n, k, u) for n, k, u in unique.values()]
        if not listable(node.url):
            return await self._list_unlisted(node)
        if node.children is None or time.monotonic() - node.listed >= self.list_ttl:
            await self._list_objects(node)
        return list(self.table.listed(node))

    async def _list_objects(self, node: Node, cap: int | None = None) -> bool:
        """List `node`'s prefix into its children; False (and nothing kept) if it has more than `cap` entries.

        A listing already held is kept as it is when the server cannot answer (offline reads)."""
        backend, key = self.locate(node)
        prefix = f"{key}/" if key else ""
        limit = None if cap is None else cap + 1
        asked = time.monotonic()
        entries = await self._asking(
            node.url, node.children is not None, lambda: list(itertools.islice(backend.list(prefix, "/"), limit))
        )
        if entries is OFFLINE:
            return True
        assert isinstance(entries, list)
        if cap is not None and len(entries) > cap:
            return False
        children: dict[str, int] = {}
        kept: dict[str, Node] = {}  # files the kernel forgot stay forgotten: updated in place
        for entry in entries:
            name = entry.key[len(prefix) :].rstrip("/") if isinstance(entry, Prefix) else entry.key[len(prefix) :]
            if not valid_name(name) or (isinstance(entry, ObjectInfo) and (name in children or name in kept)):
                continue  # the marker itself, unshowable keys, or an object shadowed by a prefix
            if (self.entries.absent_since(node.child_url(name)) or 0.0) > asked:
                continue  # deleted here (or found missing) after the listing was asked
            kind = Kind.DIR if isinstance(entry, Prefix) else Kind.FILE
            forgotten = self.table.kept(node, name) if kind is Kind.FILE else None
            if forgotten is not None and self.table.at(node.child_path(name)) is None:
                self.set_object(forgotten, entry, asked)
                kept[name] = forgotten
                continue
            child = self.table.add(node, name, kind, node.child_url(name))
            if isinstance(entry, ObjectInfo):
                self.set_object(child, entry, asked)
            children[name] = child.inode
        for name, kind in self._pending_children(node).items():
            if name not in children and valid_key_name(name):
                child = self.table.add(node, name, kind, node.child_url(name))
                if kind is Kind.FILE:
                    await self._local_size(child)
                children[name] = child.inode
        children.update(self._newer_than(node, asked, children))
        for name, forgotten in (node.gone or {}).items():
            if forgotten.checked > asked and name not in kept and name not in children:
                kept[name] = forgotten  # (as `_newer_than`: uploaded here while the listing was in flight)
        self.table.set_listing(node, children, kept)
        return True

    def _newer_than(self, node: Node, asked: float, listed: dict[str, int]) -> dict[str, int]:
        """Children of `node` that a listing asked at `asked` cannot show (`listed`: what it shows): made or
        seen after it was asked (a file uploaded here while it was in flight), they are there all the same."""
        found = {}
        for name, inode in (node.children or {}).items():
            child = self.table.get(inode)
            if name not in listed and child is not None and child.checked > asked:
                found[name] = inode
        return found

    async def _pending_node(self, parent: Node, name: str, url: str) -> Node:
        node = self.table.add(parent, name, Kind.FILE, url)
        await self._local_size(node)
        return node

    async def _local_size(self, node: Node) -> None:
        try:
            st = await self.workers.metadata(os.stat, self.cache.path_for(node.url))
        except FileNotFoundError:
            return
        node.size, node.mtime, node.stored_mtime_ns, node.checked = (
            st.st_size, st.st_mtime, st.st_mtime_ns, time.monotonic())
        node.attrs_known = True

    def _pending_children(self, node: Node) -> dict[str, Kind]:
        """Names under `node` that exist only as local writes (files, or folders holding them)."""
        base = node.url.rstrip("/") + "/"
        found: dict[str, Kind] = {}
        for url in self.entries.pending_urls():
            if url.startswith(base):
                name, sep, _ = url[len(base) :].partition("/")
                found[name] = Kind.DIR if sep else found.get(name, Kind.FILE)
        return found

    def needs_attrs(self, node: Node) -> bool:
        return (node.kind is Kind.FILE and not node.attrs_known and self.stored_times
                and not self.entries.pending(node.url))

    async def with_attrs(self, node: Node, ahead: bool = False) -> Node:
        """`node`, with what its metadata stores asked of the server where only a listing told of it (a HEAD, or
        the answer to a GET of it under way). With `ahead` (a stat), or where a client stats one file after
        another (`ls -l`), the next files of its folder are asked about meanwhile, in the background."""
        if not self.needs_attrs(node):
            return node
        # In a folder whose files are being opened (a data loader's, even one that listed the folder first), a
        # lookup is most likely an open's: a GET answers it and the open that follows, one request instead of
        # two. Elsewhere (`mv`, `rm`, a lone `stat`, `ls -l`) a HEAD asks without fetching the content.
        by_get = self.attrs_by_get if self._opened_lately(node) else None
        walking = by_get is None and (ahead or node.parent == self._stat_walk)
        if walking:
            parent = self.table.get(node.parent)
            if parent is not None:
                self.stats_ahead(parent, node.name)
        entry = self.entries.get(node.url)
        waits = [self._heads.get(node.url), entry.fetching if entry is not None else None]
        for event in waits:
            if event is not None:
                await event.wait()
        if not self.needs_attrs(node) or self._offline_now(node.url):
            return node
        if by_get is not None and await by_get(node):
            return node
        try:
            await self._head(node)
        except StorageError as exc:
            if not unreachable(exc):
                raise
            # Times are not content: the listing's stand until the server answers again.
            log.debug("%s: stored times not known (%s)", node.url, exc)
        return node

    def _opened_lately(self, node: Node, opens: int = READING_OPENS) -> bool:
        """Whether `opens` files of `node`'s folder were opened per `ttl` lately."""
        folder = self.table.get(node.parent)
        return folder is not None and self._count_open(folder, opens=0).opens >= opens

    def listed_by_client(self, folder: Node) -> None:
        """A client listed `folder`: whether it stats its files next (`ls -l`) or opens them (a data loader), the
        opens from now on tell; meanwhile the first files' stored attributes are asked ahead."""
        self._opens.pop(folder.inode, None)
        self.stats_ahead(folder)

    def stats_ahead(self, folder: Node, after: str = "") -> None:
        """Ask, in the background, for the stored attributes of up to ATTRS_AHEAD files of `folder` after the
        name `after`, in name order, that are not known or asked yet: a client listing it (readdir) or
        stat'ing its files one by one (`ls -l`) asks for them next."""
        if self._nursery is None or folder.children is None or not self.stored_times or self._offline_now(folder.url):
            return  # (a stalled server would keep a thread for each HEAD well past its budget)
        self._stat_walk = folder.inode
        listed, names = self._sorted.get(folder.inode, (-1.0, []))
        if listed != folder.listed:
            names = sorted(self.table.names(folder))
            self._sorted = {folder.inode: (folder.listed, names)}  # (one folder's: `ls -lR` goes one by one)
        for name in itertools.islice(names, bisect.bisect_right(names, after), None):
            if len(self._heads) >= ATTRS_AHEAD:
                break
            forgotten = self.table.kept(folder, name)
            if forgotten is not None and not self.needs_attrs(forgotten):
                continue  # (known: no need to bring it back)
            sibling = self.table.child(folder, name)
            if sibling is not None and self.needs_attrs(sibling) and sibling.url not in self._heads:
                self._heads[sibling.url] = trio.Event()
                self._nursery.start_soon(self._attrs_of_sibling, sibling)

    async def _attrs_of_sibling(self, node: Node) -> None:
        try:
            async with self._attrs_limiter:
                # Not once its files are being opened (a data loader that listed its folder first, not `ls -l`):
                # their own requests answer for them.
                if self.needs_attrs(node) and not self._opened_lately(node, 1):
                    with contextlib.suppress(ClearmlfsError):  # its own stat asks again, and reports the error
                        await self._head(node)
        finally:
            self._heads.pop(node.url).set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Where the HEADs of files about to be stat'ed run (started with `nursery.start`)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def _head(self, node: Node) -> None:
        """`node`'s stored attributes, asked within the revalidation budget: a stat must not wait for them
        longer than an open waits to revalidate."""
        backend, key = self.locate(node)
        asked = time.monotonic()
        try:
            info = await self.ask_or_cached(node, backend.stat, key, budget=self.workers.timeouts.revalidate)
        except NotFound:
            # Deleted since the listing, unless it was written here since the HEAD was sent: that answer is
            # about the past (as `set_object` drops one), and the file exists.
            if asked < node.checked or self.entries.local_changes(node.url):
                return
            self.entries.note_absent(node.url)
            self.table.remove(node)
            raise
        if isinstance(info, ObjectInfo):
            self.set_object(node, info, asked)

    async def refresh(self, node: Node) -> Node:
        """Up-to-date size/ETag of an object (at most `ttl` old): close-to-open consistency."""
        if node.kind is Kind.FILE and self.entries.pending(node.url):
            await self._local_size(node)  # not on the server yet: the cache file is the content
            return node
        await self.revalidate_by_listing(node)
        if node.kind is Kind.FILE and not self.fresh(node):
            backend, key = self.locate(node)
            asked = time.monotonic()
            info = await self.ask_or_cached(node, backend.stat, key)
            if isinstance(info, ObjectInfo):
                self.set_object(node, info, asked)
        return node

    async def revalidate_by_listing(self, node: Node) -> None:
        """Make the file `node`'s attributes fresh by listing its folder once, where its files are opened fast
        enough that one listing costs less than asking about each (a folder read through in an epoch); one
        listing of a folder at a time, concurrent opens waiting for it. While they are still fresh, past half
        their `ttl`, the folder is listed again in the background, so that its readers need not wait. Otherwise,
        or if the listing does not show the file, nothing: the caller asks about the file itself."""
        folder = self.table.get(node.parent) if node.kind is Kind.FILE else None
        if folder is None or folder.children is None or self.ttl <= 0 or not listable(node.url):
            return
        # Only the opens that would have to ask count towards listing: in a first epoch each file's GET (at its
        # lookup, or moments before the open) answers for it, and the few files cached earlier (fetched ahead,
        # say) are cheaper to ask about than a big folder to list.
        age = time.monotonic() - node.checked
        asks = age >= self.ttl / 2 and not self.entries.pending(node.url)
        revalidating = self._count_open(folder, opens=1, revalidating=int(asks)).revalidating
        if not asks:
            return
        under_way = self._relisting.get(folder.inode)
        if under_way is None and revalidating > LIST_WORTH * (-(-self.table.size(folder) // LIST_PAGE) or 1):
            under_way = self._relisting[folder.inode] = trio.Event()
            if age < self.ttl and self._nursery is not None:
                self._nursery.start_soon(self._relist, folder, under_way)
            else:
                await self._relist(folder, under_way)
        elif under_way is not None and age >= self.ttl:
            await under_way.wait()

    async def _relist(self, folder: Node, done: trio.Event) -> None:
        try:
            await self._list_objects(folder)
        except (ClearmlfsError, OSError) as exc:  # a file's own request tries, and tells
            log.debug("%s: cannot list it to revalidate its files (%s)", folder.url, exc)
        finally:
            del self._relisting[folder.inode]
            done.set()

    def count_open(self, node: Node) -> None:
        """Count an open of the file `node` that has no cached copy to revalidate (`revalidate_by_listing` counts
        the others)."""
        folder = self.table.get(node.parent)
        if folder is not None and self.ttl > 0:
            self._count_open(folder, opens=1)

    def _count_open(self, folder: Node, opens: int = 0, revalidating: int = 0) -> OpenRate:
        """Count opens of files of `folder` (`revalidating` of them: of cached copies whose attributes are too old
        to trust, which must ask) and return how many of each there were per `ttl` lately."""
        now = time.monotonic()
        rate = self._opens.get(folder.inode)
        if rate is None:
            if not opens:
                return OpenRate(now)
            if len(self._opens) >= 1024:  # (folders read one after another: only the recent ones matter)
                self._opens.clear()
            rate = self._opens[folder.inode] = OpenRate(now)
        rate.count(now, self.ttl, opens, revalidating)
        return rate.lately()

    # -- local (direct access) ---------------------------------------------------------------------
    async def _lookup_local(self, parent: Node, name: str) -> Node:
        path = os.path.join(parent.url, name)
        st = await self.workers.metadata(os.stat, path)
        return self._local_node(parent, name, st)

    def _local_node(self, parent: Node, name: str, st: os.stat_result) -> Node:
        kind = Kind.LOCAL if stat.S_ISDIR(st.st_mode) else Kind.FILE
        node = self.table.add(parent, name, kind, os.path.join(parent.url, name))
        node.size, node.mtime, node.checked = st.st_size, st.st_mtime, time.monotonic()
        return node

    async def _list_local(self, node: Node) -> list[Node]:
        def scan() -> list[tuple[str, os.stat_result]]:
            found = []
            for entry in sorted(os.scandir(node.url), key=lambda e: e.name):
                with contextlib.suppress(OSError):  # a dangling link or a racing delete
                    found.append((entry.name, entry.stat()))
            return found

        return [self._local_node(node, n, st) for n, st in await self.workers.metadata(scan)]

    def is_local(self, node: Node) -> bool:
        return node.kind is Kind.LOCAL or (node.kind is Kind.FILE and node.path.startswith("file/"))

    # -- changes -----------------------------------------------------------------------------------
    def check_new_object(self, parent: Node, name: str, folder: bool = False) -> None:
        """Raise unless `parent/name` can be created as an object (`folder`: as a folder's marker object)."""
        if parent.kind not in (Kind.BUCKET, Kind.DIR):
            raise Unsupported(f"{parent.path or '/'} holds buckets, not objects")
        check_length(name)
        if not valid_key_name(name):
            raise InvalidURL(f"{name!r} cannot be part of an object key")
        if not listable(parent.url) and UNSERVABLE.search(name):
            raise InvalidURL(f"{name!r}: a fileserver cannot serve back a name with '?', '#', '%' or '\\' in it")
        key = parse_url(parent.child_url(name)).key + ("/" if folder else "")
        length = len(key) if parent.url.startswith("azure://") else len(key.encode("utf-8"))
        if length > KEY_MAX:
            raise NameTooLong(f"{parent.child_url(name)}: its key would be {length} long, over {KEY_MAX}")

    async def mkdir(self, parent: Node, name: str) -> Node:
        if self.is_local(parent):
            await self.workers.metadata(os.mkdir, os.path.join(parent.url, name))
            return await self._lookup_local(parent, name)
        self.check_new_object(parent, name, folder=True)
        url = parent.child_url(name)
        if listable(url):
            backend, key = self.backends.get(parse_url(url)), parse_url(url).key
            await self.workers.metadata(backend.upload, EMPTY, key + "/")
            self.created(url)
        else:  # a fileserver stores no folders: it makes them as files are stored in them
            self.entries.found(url)
            self._note_name(parent.url, name, Kind.DIR)
        node = self.table.add(parent, name, Kind.DIR, url)
        node.checked = time.monotonic()  # (a listing in flight cannot show it yet: `_newer_than`)
        if parent.children is not None:
            parent.children[name] = node.inode
        return node

    async def rmdir(self, parent: Node, name: str) -> None:
        node = await self.lookup(parent, name)
        if self.is_local(node):
            await self.workers.metadata(os.rmdir, node.url)
        else:
            if node.kind is Kind.FILE:
                raise NotADirectoryError(20, "Not a directory")
            if node.kind is not Kind.DIR:
                raise Unsupported(f"{node.path}: buckets are not removed through the mount")
            if listable(node.url):
                backend, key = self.locate(node)
                if any(await self.workers.metadata(_names_under, backend, key + "/", 2)):  # (its marker is '')
                    raise NotEmpty(f"{node.url} is not empty")
                await self.workers.metadata(backend.delete, key + "/")
                self.entries.note_absent(node.url)
            else:
                self._forget_folder(node)
        self.table.remove(node)

    def _forget_folder(self, node: Node) -> None:
        """Forget a folder of a storage that cannot list (nothing is sent: the fileserver keeps its folders). One
        that holds a name seen here is not empty; what else it holds on the server, the mount cannot know."""
        if self._unlisted.get(node.url) or self._pending_children(node):
            raise NotEmpty(f"{node.url} is not empty")
        self._unlisted.pop(node.url, None)
        self._forget_name(node.url)

    async def change_attrs(self, node: Node, mtime_ns: int | None, mode: int | None) -> None:
        """utimens/chmod of an object. A file with local changes keeps them for its upload; a clean one has
        them stored on the server now, its content staying where it is (`Backend.set_attrs`). Folders are
        prefixes: nothing stores their times or mode. A fileserver stores neither: nothing is changed there."""
        if node.kind is not Kind.FILE or mtime_ns is None and mode is None or not listable(node.url):
            return
        async with self.entries.lock(node.url) as entry:  # an upload of it under way ends first
            if entry.pending or entry.unlinked:
                if not entry.unlinked:
                    await self.writeback.set_local_attrs(node.url, mtime_ns, mode)
            else:
                backend, key = self.locate(node)
                stored = Attrs(mtime_ns, None if mode is None else stat.S_IFREG | mode)
                info = await self.workers.metadata(backend.set_attrs, key, stored)
                await self.workers.metadata(self.cache.same_content, node.url, node.etag, info.etag)
                for name in ("kernel_etag", "cached_etag"):  # (the same content, under a new ETag)
                    if getattr(node, name) == node.etag:
                        setattr(node, name, info.etag)
                self.set_object(node, info)
        node.stored_mtime_ns = node.stored_mtime_ns if mtime_ns is None else mtime_ns
        node.mode = node.mode if mode is None else mode

    async def unlink(self, parent: Node, name: str) -> Node:
        node = await self.lookup(parent, name)
        if node.is_dir:
            raise IsADirectoryError(21, "Is a directory")
        if self.is_local(node):
            await self.workers.metadata(os.unlink, node.url)
        else:
            entry = self.entries.get(node.url)
            if entry is not None and entry.handles:
                await self._unlink_open(entry)
            backend, key = self.locate(node)
            with contextlib.suppress(NotFound):  # (never uploaded)
                await self.workers.metadata(backend.delete, key)
            await self.writeback.discard(node.url)
            self.entries.note_absent(node.url)  # a listing in flight may still show it
            self._forget_name(node.url)
        self.table.remove(node)
        return node

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, replace: bool) -> None:
        node = await self.lookup(parent, name)
        if self.is_local(node) and self.is_local(new_parent):
            target = os.path.join(new_parent.url, new_name)
            if not replace and await self.workers.metadata(os.path.lexists, target):
                raise AlreadyExists(target)
            await self.workers.metadata(os.rename, node.url, target)
            self.entries.move(node.url, target)
            self.table.move(node, new_parent, new_name, target)
            return
        self.check_new_object(new_parent, new_name)
        new_url = new_parent.child_url(new_name)
        if node.kind not in (Kind.FILE, Kind.DIR) or parse_url(new_url).root != parse_url(node.url).root:
            raise CrossDevice(f"{node.path}: only files and folders rename in place, within one bucket")
        if node.kind is Kind.DIR:
            if not listable(node.url):
                raise Unsupported(f"{node.url}: a fileserver folder cannot be renamed: what it holds is not listed")
            await self._rename_dir(node, new_parent, new_name, replace)
            return
        backend, key = self.locate(node)
        new_key = parse_url(new_url).key
        if not replace:
            with contextlib.suppress(NotFound):
                await self.workers.metadata(backend.stat, new_key)
                raise AlreadyExists(new_url)
        info: ObjectInfo | None = None
        if self.entries.busy(node.url):
            await self._rename_open_write(node, new_url)  # uploaded by its handles' close
        elif self.entries.pending(node.url):
            info = await self._rename_local_write(node, new_url)
        else:
            info = await self.workers.transfer(backend.copy, key, new_key)
            await self._move_local(node.url, new_url, info.etag)
        with contextlib.suppress(NotFound):  # (never uploaded)
            await self.workers.metadata(backend.delete, key)
        self.entries.note_absent(node.url)
        self._forget_name(node.url)
        self.created(new_url)
        self.table.move(node, new_parent, new_name, new_url)
        if info is not None:
            self.set_object(node, info)

    # -- folder rename: a server-side copy of every object under it, then their deletion -------------------
    async def _rename_dir(self, node: Node, new_parent: Node, new_name: str, replace: bool) -> None:
        """Rename a folder: every object under it is copied to the new prefix, then deleted from the old one, as
        journaled in the cache (`finish_renames` completes or undoes it after a crash). More objects than
        `rename_dir_limit` is EXDEV, so that `mv` copies instead. Files under it that the mount holds (open,
        written, cached) move along, as a single file's rename moves them."""
        new_url = new_parent.child_url(new_name)
        backend, key = self.locate(node)
        old_prefix, new_prefix = f"{key}/", f"{parse_url(new_url).key}/"
        if new_prefix.startswith(old_prefix):
            raise InvalidURL(f"{node.url} cannot move into itself")
        await self._check_rename_target(backend, new_prefix, replace)
        base = node.url.rstrip("/") + "/"
        async with contextlib.AsyncExitStack() as held:
            # Their uploads under way end first, and none starts until they answer to their new names: the
            # listing below then shows every object of theirs, and a close uploads under the new name.
            local = sorted((e for e in self.entries if e.url.startswith(base) and not e.unlinked), key=_url)
            for entry in local:
                await held.enter_async_context(self.entries.hold(entry))
                if entry.stream is not None:  # (to the old name: the close uploads the file whole instead)
                    entry.stream.file.abort("renamed")
            names = await self.workers.metadata(_names_under, backend, old_prefix, self.rename_dir_limit + 1)
            if len(names) > self.rename_dir_limit:
                raise CrossDevice(f"{node.url} holds more than {self.rename_dir_limit} objects (rename_dir_limit)")
            journal = await self.workers.metadata(self.cache.begin_rename, node.url, new_url, names)
            await _move_objects(self.workers, backend, old_prefix, new_prefix, names, journal, self.cache)
            for entry in local:
                await self._move_local(entry.url, new_url + entry.url[len(node.url):])
        self.entries.note_absent(node.url)
        self.created(new_url)
        self.table.move_tree(node, new_parent, new_name, new_url)
        node.checked = time.monotonic()

    async def _check_rename_target(self, backend: Backend, new_prefix: str, replace: bool) -> None:
        """A folder may replace an empty folder only (ENOTEMPTY otherwise), never a file (ENOTDIR)."""
        with contextlib.suppress(NotFound):
            await self.workers.metadata(backend.stat, new_prefix.rstrip("/"))
            raise NotADirectoryError(errno.ENOTDIR, f"{new_prefix.rstrip('/')} is a file")
        there = await self.workers.metadata(_names_under, backend, new_prefix, 2)
        if [n for n in there if n]:
            raise NotEmpty(f"{new_prefix} is not empty")
        if there and not replace:
            raise AlreadyExists(new_prefix)

    async def finish_renames(self) -> None:
        """Complete, or undo, the folder renames an earlier mount was cut short in (started once, at mount)."""
        for journal, record in await self.workers.metadata(self.cache.unfinished_renames):
            try:
                old, new = parse_url(str(record["old"])), parse_url(str(record["new"]))
                backend = self.backends.get(old)
                names = [str(n) for n in record["names"]]
                if record["phase"] == "copy":  # not every object was copied: the old folder is still whole
                    await _delete_all(self.workers, backend, f"{new.key}/", names)
                    log.info("undid the rename of %s to %s cut short by an earlier mount", old.url, new.url)
                else:  # every object was copied: only deletions of the old ones were left
                    await _delete_all(self.workers, backend, f"{old.key}/", names)
                    log.info("finished the rename of %s to %s cut short by an earlier mount", old.url, new.url)
                await self.workers.metadata(journal.unlink)
            except (ClearmlfsError, OSError) as exc:
                log.warning("cannot finish the folder rename journaled in %s (%s); the next mount tries again",
                            journal, exc)

    async def _unlink_open(self, entry: Entry) -> None:
        """`entry`'s object loses its name while open, as a local file would: its handles read and write what
        they have; nothing of it is uploaded (a stream under way is aborted), and the name is free."""
        async with self.entries.lock(entry.url):  # an upload of it under way ends first
            if entry.stream is not None:
                entry.stream.file.abort("unlinked")
            self.entries.detach(entry)

    async def _rename_open_write(self, node: Node, new_url: str) -> None:
        """A file open with writes not uploaded moves in the cache: its handles go on writing, and their close
        uploads it under the new name (a stream to the old name is aborted: the close uploads the file whole)."""
        async with self.entries.lock(node.url) as entry:  # an upload of it under way ends first
            if entry.stream is not None:
                entry.stream.file.abort("renamed")
            await self._move_local(node.url, new_url)

    async def _move_local(self, url: str, new_url: str, etag: str = "") -> None:
        """What the mount holds of `url` (its cached copy and state, its entry) answers to `new_url` now."""
        await self.workers.metadata(self.cache.move, url, new_url, etag)
        self.entries.move(url, new_url)

    async def _rename_local_write(self, node: Node, new_url: str) -> ObjectInfo:
        """A file not uploaded yet moves in the cache and is uploaded under its new name."""
        await self._move_local(node.url, new_url)
        fd = await self.workers.metadata(os.open, self.cache.path_for(new_url), os.O_RDONLY)
        try:
            return await self.writeback.upload(self.entries.at(new_url), fd)
        finally:
            os.close(fd)


def _url(entry: Entry) -> str:
    return entry.url


def _perms(mode: int | None) -> int | None:
    """The permission bits a stored st_mode gives a file (a stored folder's or link's mode is not a file's)."""
    return None if mode is None or stat.S_IFMT(mode) not in (0, stat.S_IFREG) else stat.S_IMODE(mode)


def _copy_object(backend: Backend, key: str, new_key: str) -> None:
    """A server-side copy; a folder's marker is made anew instead: it is empty, and a server that keeps folders
    as folders (SeaweedFS) cannot copy one that holds objects."""
    if key.endswith("/"):
        backend.upload(EMPTY, new_key)
    else:
        backend.copy(key, new_key)


def _names_under(backend: Backend, prefix: str, limit: int) -> list[str]:
    """The keys under `prefix`, without it, at all depths (the folder's own marker is ''); at most `limit`."""
    return [e.key[len(prefix):] for e in itertools.islice(backend.list(prefix, None), limit)]


async def _move_objects(
    workers: Workers, backend: Backend, old_prefix: str, new_prefix: str, names: list[str], journal: Path,
    cache: CacheContext,
) -> None:
    """Copy every object, then delete the old ones. A failed copy undoes the copies (the rename fails, nothing
    moved); a failed deletion leaves the journal for the next mount to finish."""
    try:
        await _each(workers, _copy_object, [(backend, old_prefix + n, new_prefix + n) for n in names])
    except (ClearmlfsError, OSError):
        with contextlib.suppress(ClearmlfsError, OSError):
            await _delete_all(workers, backend, new_prefix, names)
            await workers.metadata(journal.unlink)
        raise
    await workers.metadata(cache.renamed_all, journal)
    log.info("renamed %s to %s: %d objects copied", old_prefix, new_prefix, len(names))
    await _delete_all(workers, backend, old_prefix, names)
    await workers.metadata(journal.unlink)


async def _delete_all(workers: Workers, backend: Backend, prefix: str, names: list[str]) -> None:
    """Delete `prefix` + each name, then the folders they were in, deepest first: servers that keep folders
    as entries of their own (SeaweedFS's filer) would list the emptied ones (a delete of a missing key is a
    no-op elsewhere)."""
    keys = [prefix + n for n in names]
    await _each(workers, backend.delete_many, [(keys[i:i + DELETE_CHUNK],) for i in range(0, len(keys), DELETE_CHUNK)])
    folders = {n[: i + 1] for n in names for i, ch in enumerate(n) if ch == "/"} | {""}
    for depth in sorted({f.count("/") for f in folders}, reverse=True):
        await workers.transfer(backend.delete_many, [prefix + f for f in folders if f.count("/") == depth])


async def _each(workers: Workers, fn: Callable[..., object], calls: list[tuple[object, ...]]) -> None:
    """`fn(*args)` for every args of `calls`, RENAME_CONCURRENCY at a time; the first failure is raised."""
    limiter = trio.CapacityLimiter(RENAME_CONCURRENCY)
    failures: list[BaseException] = []

    async def one(args: tuple[object, ...]) -> None:
        async with limiter:
            if failures:
                return
            try:
                await workers.transfer(fn, *args)
            except (ClearmlfsError, OSError) as exc:
                failures.append(exc)

    async with trio.open_nursery() as nursery:
        for args in calls:
            nursery.start_soon(one, args)
    if failures:
        raise failures[0]


def _first_entry(backend: Backend, prefix: str = "") -> ObjectInfo | Prefix | None:
    """One entry under `prefix` (None when empty): proves a bucket or a prefix exists."""
    for entry in backend.list(prefix, "/"):
        return entry
    return None


def _files_servers(s: Settings) -> list[str]:
    """The ClearML fileserver clearml.conf points at, if it names a ClearML server at all."""
    if not (s.api.files_server or s.api.api_server):
        return []
    try:
        url = files_server_host(s.api)
        return [url] if parse_url(url).scheme in HTTP_SCHEMES else []
    except ClearmlfsError:
        return []  # (not derivable: api.api_server is no ClearML server's usual address)


def _has_s3(s: Settings) -> bool:
    return bool(s.s3.credentials or s.s3.default.key or s.s3.default.use_credentials_chain)


def _has_gs(s: Settings) -> bool:
    return bool(s.gcs or s.gcs_default.project or s.gcs_default.credentials_json)
