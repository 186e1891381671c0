"""The inode table: inode ↔ path, kinds of node, cached attributes and their age.

An inode number belongs to one mount path for the life of the mount (rename moves
the number with the file), so `ls -i` and tools that remember inodes stay right.

A folder's listing is its live children (`children`: name → inode) and, once the kernel forgot some of them,
those files kept compactly (`gone`: name → a copy of its node without path and URL, out of the index). A walk
after the kernel's caches were dropped is answered from them, without listing again; `KEPT_MAX` of them at
most, and only while their folder's listing answers (`list_ttl`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyfuse3

from ..errors import NotFound

KEPT_MAX = 200_000  # files the kernel forgot that listings keep (~400 bytes each, their ETags included)


class Kind(enum.Enum):
    ROOT = "root"  # the mount root: s3, gs, azure, file
    SCHEME = "scheme"  # s3/, gs/, azure/
    HOST = "host"  # s3/HOST:PORT/ or azure/ACCOUNT.blob.core.windows.net/
    BUCKET = "bucket"  # a bucket or container: its root prefix
    DIR = "dir"  # a key prefix
    FILE = "file"  # an object
    LOCAL = "local"  # file/...: a local path, passed straight through


@dataclass(slots=True)  # (no per-instance dict: a walk of 100,000 objects holds as many nodes)
class Node:
    inode: int
    parent: int
    path: str  # relative to the mount root, e.g. "s3/bucket/a"
    kind: Kind
    url: str = ""  # ClearML URL for storage nodes; absolute local path for LOCAL nodes
    size: int = 0
    mtime: float = field(default_factory=time.time)  # the server's Last-Modified (or the cache file's)
    etag: str = ""
    stored_mtime_ns: int | None = None  # the mtime its metadata stores, shown instead of `mtime`
    mode: int | None = None  # its permission bits, as created, chmod'ed or stored in its metadata (None: 0o644)
    attrs_known: bool = True  # False while only a listing told of it (S3's show no metadata)
    kernel_etag: str = ""  # version of the content the kernel may hold in its page cache
    kernel_size: int = -1  # the size the kernel was last told (it bounds reads from its page cache)
    checked: float = 0.0  # time.monotonic() when size/mtime/etag came from the server
    cached_etag: str = ""  # the version this mount last saw complete and clean in the cache
    children: dict[str, int] | None = None  # name → inode, from the last listing (its live nodes)
    gone: dict[str, Node] | None = None  # the files of that listing the kernel forgot (see the module's doc)
    listed: float = 0.0  # time.monotonic() of that listing
    big: bool = False  # too many entries to list for a lookup
    lookups: int = 0

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def mtime_ns(self) -> int:
        return self.stored_mtime_ns if self.stored_mtime_ns is not None else int(self.mtime * 1e9)

    @property
    def is_dir(self) -> bool:
        return self.kind is not Kind.FILE

    def child_path(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def child_url(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"


class InodeTable:
    def __init__(self, list_ttl: float = 10.0) -> None:
        root = Node(pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE, "", Kind.ROOT, lookups=1)
        self._nodes: dict[int, Node] = {root.inode: root}
        self._by_path: dict[str, int] = {"": root.inode}
        self._next = pyfuse3.ROOT_INODE + 1
        self.list_ttl = list_ttl  # a folder's forgotten files are kept while its listing is younger
        self._kept = 0  # files kept in `gone` of all folders
        self._keeping: dict[int, None] = {}  # folders (inodes) holding some, the earliest to keep first

    def __getitem__(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"stale inode {inode}") from None

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def at(self, path: str) -> Node | None:
        inode = self._by_path.get(path)
        return None if inode is None else self._nodes[inode]

    def add(self, parent: Node, name: str, kind: Kind, url: str) -> Node:
        """The node for `parent/name`, created on first sight; an existing one keeps its inode (a file the kernel
        forgot comes back from its folder's listing, with its inode and attributes)."""
        path = parent.child_path(name)
        node = self.at(path)
        if node is None:
            node = self._revive(parent, name) if kind is Kind.FILE else None
        if node is None:
            self._unkeep(parent, name)
            node = Node(self._next, parent.inode, path, kind, url)
            self._next += 1
            self._nodes[node.inode] = node
            self._by_path[path] = node.inode
        elif node.kind is not kind:
            node.kind, node.url, node.checked = kind, url, 0.0
            self.set_listing(node, None)
        node.parent = parent.inode  # (the parent may be a new node of the same path, its old one forgotten)
        return node

    def child(self, folder: Node, name: str) -> Node | None:
        """`name` in `folder`'s listing (None if it is not there, or there is none)."""
        inode = None if folder.children is None else folder.children.get(name)
        if inode is not None:
            return self.get(inode)
        if folder.gone is None or name not in folder.gone:
            return None
        return self.add(folder, name, Kind.FILE, folder.child_url(name))

    def listed(self, folder: Node) -> Iterator[Node]:
        """Every node of `folder`'s listing, those the kernel forgot brought back."""
        for name in list(folder.gone or ()):
            self._revive(folder, name)
        for inode in list((folder.children or {}).values()):
            node = self.get(inode)
            if node is not None:
                yield node

    @staticmethod
    def names(folder: Node) -> list[str]:
        """The names in `folder`'s listing, live or forgotten."""
        return [*(folder.children or ()), *(folder.gone or ())]

    @staticmethod
    def size(folder: Node) -> int:
        """How many names `folder`'s listing holds."""
        return len(folder.children or ()) + len(folder.gone or ())

    def kept(self, folder: Node, name: str) -> Node | None:
        """The forgotten file `name` of `folder`'s listing, as kept (a new listing updates it in place)."""
        return None if folder.gone is None else folder.gone.get(name)

    def set_listing(self, folder: Node, children: dict[str, int] | None, gone: dict[str, Node] | None = None) -> None:
        """`folder`'s listing, made now, is `children` (live nodes) and `gone` (forgotten files, kept as they
        were); with None, it has none."""
        self._kept += len(gone or ()) - len(folder.gone or ())
        folder.children, folder.gone = children, gone or None
        folder.listed = 0.0 if children is None else time.monotonic()
        if folder.gone:
            self._keeping[folder.inode] = None
        else:
            self._keeping.pop(folder.inode, None)
        self._expire()  # (here too: memory follows the kernel again once listings age, forgotten or not)

    def remove(self, node: Node) -> None:
        """Forget the path (the object is gone); the inode stays valid until the kernel forgets it."""
        if self._by_path.get(node.path) == node.inode:
            del self._by_path[node.path]
        parent = self._nodes.get(node.parent)
        if parent is not None and parent.children is not None:
            parent.children.pop(node.name, None)

    def move(self, node: Node, new_parent: Node, new_name: str, new_url: str) -> None:
        self.remove(node)
        old = self.at(new_parent.child_path(new_name))
        if old is not None:
            self.remove(old)
        self._unkeep(new_parent, new_name)
        node.parent, node.path, node.url = new_parent.inode, new_parent.child_path(new_name), new_url
        self._by_path[node.path] = node.inode
        if new_parent.children is not None:
            new_parent.children[new_name] = node.inode

    def move_tree(self, node: Node, new_parent: Node, new_name: str, new_url: str) -> None:
        """`move` a folder, and every node known under it along with it (inodes stay)."""
        old_path, old_url = node.path, node.url
        below = [n for n in self._nodes.values() if n.path.startswith(old_path + "/")]
        self.move(node, new_parent, new_name, new_url)
        for child in below:
            if self._by_path.get(child.path) == child.inode:
                del self._by_path[child.path]
            child.path = node.path + child.path[len(old_path):]
            child.url = new_url + child.url[len(old_url):]
            self._by_path[child.path] = child.inode

    def forget(self, inode: int, count: int, keep: Callable[[Node], bool] = lambda node: False) -> None:
        """The kernel dropped `count` references to `inode`. A node it holds none of leaves the table, so that
        memory follows the kernel's caches: a removed one always, a file unless `keep` says (not uploaded
        yet), though its folder's listing keeps it compactly while that listing answers. Folders stay: they
        are few, and their listings answer their children's lookups."""
        node = self._nodes.get(inode)
        if node is None:
            return
        node.lookups -= count
        if node.lookups > 0:
            return
        if self._by_path.get(node.path) != inode:
            del self._nodes[inode]  # removed from the namespace and unknown to the kernel now
        elif node.kind is Kind.FILE and not keep(node):
            del self._nodes[inode], self._by_path[node.path]
            parent = self._nodes.get(node.parent)
            if parent is not None and parent.children is not None and parent.children.get(node.name) == inode:
                self._keep(parent, node)

    def _keep(self, folder: Node, node: Node) -> None:
        """`folder`'s listing keeps the forgotten `node`, as a copy without its path and URL (a request about it
        may still be under way: the node itself stays whole); a listing too old to answer, or one over the
        bound, is let go instead: it is listed again when needed."""
        assert folder.children is not None
        del folder.children[node.name]
        self._expire()
        if time.monotonic() - folder.listed >= self.list_ttl or self._kept >= KEPT_MAX:
            self.set_listing(folder, None)
            return
        if folder.gone is None:
            folder.gone = {}
            self._keeping[folder.inode] = None
        # (the kernel dropped its pages along with the inode: nothing of them is kept)
        folder.gone[node.name] = dataclasses.replace(node, path="", url="", kernel_etag="", kernel_size=-1)
        self._kept += 1

    def _expire(self) -> None:
        """Let go of the forgotten files of the listings kept longest once too old to answer (`list_ttl`)."""
        while self._keeping:
            inode = next(iter(self._keeping))
            folder = self._nodes.get(inode)
            if folder is not None and time.monotonic() - folder.listed < self.list_ttl:
                return
            del self._keeping[inode]
            if folder is not None and folder.gone is not None:
                self._kept -= len(folder.gone)
                folder.children, folder.gone, folder.listed = None, None, 0.0

    def _revive(self, parent: Node, name: str) -> Node | None:
        """The file `name` of `parent`'s listing back in the index (no node has its path meanwhile: a new one
        would have taken its place in the listing)."""
        node = None if parent.gone is None else parent.gone.pop(name, None)
        if node is None:
            return None
        self._kept -= 1
        if not parent.gone:
            parent.gone = None
            self._keeping.pop(parent.inode, None)
        node.path, node.url = parent.child_path(name), parent.child_url(name)
        self._nodes[node.inode] = node
        self._by_path[node.path] = node.inode
        if parent.children is not None:
            parent.children[name] = node.inode
        return node

    def _unkeep(self, folder: Node, name: str) -> None:
        """A new node takes `name` in `folder`: a forgotten file of that name is no longer it."""
        if folder.gone is not None and folder.gone.pop(name, None) is not None:
            self._kept -= 1

    def revive(self, node: Node) -> Node:
        """`node` back in the table, for a reply that hands the kernel a reference to it (readdir from a
        snapshot taken before the node was forgotten)."""
        if self._nodes.get(node.inode) is node:
            return node  # (as it mostly is: one dict look-up per entry of a walk)
        parent = self._nodes.get(node.parent)
        kept = None if parent is None or parent.gone is None else parent.gone.get(node.name)
        if parent is not None and kept is not None and kept.inode == node.inode:  # (kept by its listing since)
            return self.add(parent, node.name, Kind.FILE, parent.child_url(node.name))
        self._nodes.setdefault(node.inode, node)
        self._by_path.setdefault(node.path, node.inode)
        return node

    def __len__(self) -> int:
        return len(self._nodes)
