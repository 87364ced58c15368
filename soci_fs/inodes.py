"""The inode tree of one layer, built from its zTOC entries (pure: values in, values out).

Owns:

* :class:`Node` -- one inode: attributes as FUSE will show them (``mode`` with type bits, ``uid``, ``gid``,
  ``size``, ``mtime_ns``, ``nlink``, ``rdev``), the symlink target, the PAX ``SCHILY.xattr.*`` xattrs and the
  file locator (``offset`` of the data in the uncompressed tar) and ``entry``, the index of the zTOC entry
  that describes it in :attr:`InodeTree.entries` (the read path verifies that entry's tar header). The tree
  keeps those entries packed (:class:`~soci_fs.ztoc.EntryTable`), not the ``FileMetadata`` objects it was
  built from, so a served layer does not need its parsed zTOC any more.
* :class:`InodeTree` -- the tree of one layer (spec filesystem.md §2 and §4): names cleaned like Go's
  ``path.Clean`` (``./a/b/`` -> ``a/b``; ``./`` is the root); parent directories that were never listed are
  implied (``dir|0755``, uid/gid 0, zero mtime); later entries override earlier ones as tar extraction
  would; hardlinks share the node of their (earlier) target and raise its ``nlink``; a directory's ``nlink``
  is ``2 +`` its subdirectories. Node ids are local to the layer, dense, starting at 1 (the root), so
  ``node(id)`` is a list index.
* The overlay presentation of whiteouts (§4): ``.wh.<x>`` is never shown under its own name; ``<x>`` is
  shown as a ``0/0`` character device (no permission bits, size 0, uid/gid 0, nlink 1, the marker's mtime)
  unless a real child ``<x>`` exists; ``.wh..wh..opq`` is never shown and makes its directory answer the
  opaque xattr(s) with ``y`` (``trusted.overlay.opaque`` by default; ``user.overlay.opaque`` for overlay's
  ``userxattr`` mode; both if asked), listed before the node's own xattrs.

Deliberate differences from upstream's quirks (spec §2): a directory entry that re-describes an existing
directory replaces all its attributes (upstream keeps the old value of every field that is zero/empty in the
later entry), directory link counts are exact (upstream over-counts re-described directories), every xattr
is kept (upstream drops empty values), an entry named ``./`` only updates the root, and a name that is
replaced loses one link on the node it pointed to (as ``tar -x`` would unlink it).

Will not: import FUSE, know errno numbers or FUSE inode numbers (operations.py maps local ids), read file
data, or check tar headers (the read path does).
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from soci_fs.errors import FormatError, NotFound
from soci_fs.ztoc import ZERO_TIME, EntryTable, parse_mod_time

if TYPE_CHECKING:
    from soci_fs.ztoc import FileMetadata, Ztoc

__all__ = [
    "OPAQUE_MARKER",
    "OPAQUE_TRUSTED",
    "OPAQUE_USER",
    "ROOT_ID",
    "WHITEOUT_PREFIX",
    "InodeTree",
    "Node",
    "linux_rdev",
]

ROOT_ID = 1
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_TRUSTED = b"trusted.overlay.opaque"
OPAQUE_USER = b"user.overlay.opaque"
_OPAQUE_VALUE = b"y"

_ENC = "utf-8"
_ESC = "surrogateescape"
_PERM_MASK = 0o7777  # permission bits plus setuid, setgid, sticky
_TYPE_BITS = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}
_XATTR_PREFIX = "SCHILY.xattr."
_IMPLIED_DIR_MODE = stat.S_IFDIR | 0o755
_S_IFMT = 0o170000


def linux_rdev(major: int, minor: int) -> int:
    """Linux ``makedev(major, minor)`` truncated to the 32 bits FUSE carries (spec §3)."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & 0xFFF00) << 12)


def _clean(name: str) -> str:
    """Go ``strings.TrimPrefix(path.Clean("/" + name), "/")``: ``./a//b/`` -> ``a/b``, ``./`` -> ``""``."""
    n = name[2:] if name.startswith("./") else name
    if (
        n
        and n[0] != "/"
        and n[-1] != "/"
        and "//" not in n
        and ("." not in n or ("/." not in n and n[0] != "."))
    ):
        return n  # the common case: clean once a leading "./" is gone (no component starts with ".")
    return posixpath.normpath("/" + name.lstrip("/")).lstrip("/")


class Node:
    """One inode of a layer.

    Only what every kind of inode has is stored per node; the rest lives on the kinds that need it and reads
    as a class default elsewhere: ``children``, ``whiteouts``, ``listing`` (``None``) and ``opaque``
    (``False``) are set on directories only, ``target`` (``b""``) on symlinks only, ``rdev`` (``0``) on
    character and block devices only. ``children is not None`` is what makes a node a directory.
    """

    __slots__ = (
        "entry",
        "gid",
        "id",
        "mode",
        "mtime_ns",
        "name",
        "nlink",
        "offset",
        "parent",
        "size",
        "uid",
        "xattrs",
    )

    children: dict[bytes, Node] | None = None  # directories: real children, never a .wh.* name
    whiteouts: dict[bytes, Node] | None = None  # directories: "<x>" -> whiteout node, from ".wh.<x>"
    listing: list[tuple[bytes, Node]] | None = None  # directories: presented, sorted; built on first use
    opaque = False  # directories: ".wh..wh..opq" was listed in it
    target = b""  # symlinks: the link target
    rdev = 0  # character and block devices: linux_rdev(major, minor)

    def __init__(self, node_id: int, mode: int, parent: int, name: bytes) -> None:
        self.id = node_id
        self.mode = mode
        self.uid = 0
        self.gid = 0
        self.size = 0
        self.mtime_ns = 0
        self.nlink = 1
        self.xattrs: dict[bytes, bytes] | None = None
        self.offset = 0  # data offset in the uncompressed tar (regular files)
        self.entry = -1  # index of the zTOC entry that last described the node (-1: implied / whiteout)
        self.parent = parent  # id of the directory the node was first attached to (for messages)
        self.name = name

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def __repr__(self) -> str:
        return f"Node(id={self.id}, mode={self.mode:o}, name={self.name!r})"


class _Dir(Node):
    """A directory node (``whiteouts`` stays ``None`` until a ``.wh.<x>`` names something in it)."""

    __slots__ = ("children", "listing", "opaque", "whiteouts")

    def __init__(self, node_id: int, mode: int, parent: int, name: bytes) -> None:
        super().__init__(node_id, mode, parent, name)
        self.children: dict[bytes, Node] = {}
        self.whiteouts: dict[bytes, Node] | None = None
        self.listing: list[tuple[bytes, Node]] | None = None
        self.opaque = False


class _Symlink(Node):
    """A symlink node: the only kind with a ``target`` of its own."""

    __slots__ = ("target",)

    def __init__(self, node_id: int, mode: int, parent: int, name: bytes) -> None:
        super().__init__(node_id, mode, parent, name)
        self.target = b""


class _Device(Node):
    """A character or block device node: the only kind with an ``rdev`` of its own (whiteouts are 0/0
    devices and use the class default)."""

    __slots__ = ("rdev",)

    def __init__(self, node_id: int, mode: int, parent: int, name: bytes) -> None:
        super().__init__(node_id, mode, parent, name)
        self.rdev = 0


_KIND_CLASS: dict[int, type[Node]] = {
    stat.S_IFDIR: _Dir,
    stat.S_IFLNK: _Symlink,
    stat.S_IFCHR: _Device,
    stat.S_IFBLK: _Device,
}


class InodeTree:
    """The inode tree of one layer. Build it with :meth:`from_ztoc` or :meth:`from_entries`.

    Args of the builders:
        opaque_keys: the xattr name(s) an opaque directory answers (``OPAQUE_TRUSTED`` by default,
            ``OPAQUE_USER`` for overlay's ``userxattr`` mode, or both).

    Raises (builders):
        FormatError: a hardlink whose target was not listed earlier or is a directory.
    """

    def __init__(self, opaque_keys: tuple[bytes, ...] = (OPAQUE_TRUSTED,)) -> None:
        self.opaque_keys = tuple(opaque_keys)
        self.root: Node = _Dir(ROOT_ID, _IMPLIED_DIR_MODE, ROOT_ID, b"")
        self.root.nlink = 2
        self._nodes: list[Node | None] = [None, self.root]
        self._by_path: dict[str, Node] = {"": self.root}
        self._mtimes: dict[str, int] = {}
        self._ints: dict[int, int] = {}  # while building: one int object per distinct mode/uid/gid value
        self.entries = EntryTable()  # the entries the tree was built from, packed (Node.entry indexes it)

    # ------------------------------------------------------------------------------------- building

    @classmethod
    def from_ztoc(cls, z: Ztoc, *, opaque_keys: tuple[bytes, ...] = (OPAQUE_TRUSTED,)) -> InodeTree:
        """The tree of a layer from its zTOC."""
        return cls.from_entries(z.files, opaque_keys=opaque_keys)

    @classmethod
    def from_entries(
        cls, entries: Iterable[FileMetadata], *, opaque_keys: tuple[bytes, ...] = (OPAQUE_TRUSTED,)
    ) -> InodeTree:
        """The tree of a layer from its entries in tar order."""
        tree = cls(opaque_keys)
        items = entries if isinstance(entries, tuple | list) else tuple(entries)
        tree.entries = EntryTable(items)
        for i, e in enumerate(items):
            try:
                tree._add(e, i)
            except FormatError as exc:
                raise FormatError(f"toc entry {i} ({e.name!r}): {exc}") from exc
        tree._finish()
        return tree

    def _new(self, mode: int, parent: Node, name: bytes) -> Node:
        """A new node of the kind ``mode``'s type bits say."""
        node = _KIND_CLASS.get(mode & _S_IFMT, Node)(len(self._nodes), mode, parent.id, name)
        self._nodes.append(node)
        return node

    def _mtime_ns(self, text: str) -> int:
        ns = self._mtimes.get(text)
        if ns is None:
            sec, nsec = parse_mod_time(text)
            ns = 0 if (sec, nsec) == ZERO_TIME else sec * 1_000_000_000 + nsec
            self._mtimes[text] = ns
        return ns

    def _set_attrs(self, node: Node, e: FileMetadata, type_bits: int, index: int) -> None:
        node.entry = index
        intern = self._ints.setdefault  # one int object per distinct value: modes and owners repeat a lot
        mode = type_bits | (e.mode & _PERM_MASK)
        node.mode = intern(mode, mode)
        node.uid = intern(e.uid, e.uid)
        node.gid = intern(e.gid, e.gid)
        node.mtime_ns = self._mtime_ns(e.mod_time)
        if e.pax:
            xattrs = {
                k[len(_XATTR_PREFIX) :].encode(_ENC, _ESC): v for k, v in e.pax if k.startswith(_XATTR_PREFIX)
            }
            node.xattrs = xattrs or None
        else:
            node.xattrs = None
        # A node keeps its kind: non-directory entries always get a new node, directories stay directories.
        if type_bits == stat.S_IFLNK:
            node.target = e.linkname.encode(_ENC, _ESC)
            node.size = len(node.target)
        else:
            node.size = e.uncompressed_size
        node.offset = e.uncompressed_offset
        if type_bits == stat.S_IFCHR or type_bits == stat.S_IFBLK:
            node.rdev = linux_rdev(e.devmajor, e.devminor)

    def _dir(self, path: str) -> Node:
        """The directory at ``path``, creating it (and its parents) implicitly when missing."""
        node = self._by_path.get(path)
        if node is not None and node.children is not None:
            return node
        parent_path, _, base = path.rpartition("/")
        parent = self._dir(parent_path)
        node = self._new(_IMPLIED_DIR_MODE, parent, base.encode(_ENC, _ESC))
        self._attach(parent, path, node.name, node)
        return node

    def _attach(self, parent: Node, path: str, name: bytes, node: Node) -> None:
        children = parent.children
        assert children is not None
        old = children.get(name)
        if old is not None and old is not node:
            if old.children is not None:
                # A directory replaced by something else: forget the paths below it.
                prefix = path + "/"
                for p in [p for p in self._by_path if p.startswith(prefix)]:
                    del self._by_path[p]
            else:
                old.nlink -= 1
        children[name] = node
        self._by_path[path] = node

    def _add(self, e: FileMetadata, index: int) -> None:
        path = _clean(e.name)
        kind = e.type
        if path == "":
            if kind == "dir":
                self._set_attrs(self.root, e, stat.S_IFDIR, index)
            return
        parent_path, _, base = path.rpartition("/")
        parent = self._dir(parent_path)
        name = base.encode(_ENC, _ESC)
        if name.startswith(WHITEOUT_PREFIX):
            self._add_marker(parent, name, e)
            return
        if kind == "hardlink":
            target = self._by_path.get(_clean(e.linkname))
            if target is None:
                raise FormatError(f"hardlink target {e.linkname!r} was not listed before the link")
            if target.children is not None:
                raise FormatError(f"hardlink target {e.linkname!r} is a directory")
            if parent.children.get(name) is not target:  # type: ignore[union-attr]
                target.nlink += 1
                self._attach(parent, path, name, target)
            return
        type_bits = _TYPE_BITS.get(kind, stat.S_IFREG)
        if type_bits == stat.S_IFDIR:
            node = self._by_path.get(path)
            if node is None or node.children is None:
                node = self._new(stat.S_IFDIR, parent, name)
                self._attach(parent, path, name, node)
            self._set_attrs(node, e, stat.S_IFDIR, index)
            return
        node = self._new(type_bits, parent, name)
        self._set_attrs(node, e, type_bits, index)
        self._attach(parent, path, name, node)

    def _add_marker(self, parent: Node, name: bytes, e: FileMetadata) -> None:
        if name == OPAQUE_MARKER:
            parent.opaque = True
            return
        hidden = name[len(WHITEOUT_PREFIX) :]
        if not hidden:
            return  # ".wh." alone names nothing
        node = self._new(stat.S_IFCHR, parent, hidden)
        node.mtime_ns = self._mtime_ns(e.mod_time)
        if parent.whiteouts is None:
            parent.whiteouts = {}
        parent.whiteouts[hidden] = node

    def _finish(self) -> None:
        for node in self._nodes:
            if node is not None and node.children is not None:
                node.nlink = 2 + sum(1 for c in node.children.values() if c.children is not None)
        self._by_path.clear()
        self._mtimes.clear()
        self._ints.clear()

    # ------------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Number of nodes (including unreachable ones replaced by later entries)."""
        return len(self._nodes) - 1

    @property
    def max_id(self) -> int:
        return len(self._nodes) - 1

    def node(self, node_id: int) -> Node:
        """The node with local id ``node_id``.

        Raises:
            NotFound: no such id in this layer.
        """
        if 0 < node_id < len(self._nodes):
            return self._nodes[node_id]  # type: ignore[return-value]
        raise NotFound(f"inode {node_id} in a layer of {len(self._nodes) - 1} inodes")

    def lookup(self, directory: Node, name: bytes) -> Node | None:
        """The child ``name`` of ``directory`` as presented (whiteouts as ``0/0`` devices), or None."""
        children = directory.children
        if children is None or name.startswith(WHITEOUT_PREFIX):
            return None
        child = children.get(name)
        if child is not None:
            return child
        if name == b"." or name == b"..":
            return directory if name == b"." else self.node(directory.parent)
        whiteouts = directory.whiteouts
        return whiteouts.get(name) if whiteouts else None

    def listing(self, directory: Node) -> list[tuple[bytes, Node]]:
        """The presented entries of ``directory``, sorted by name bytes (cached on the node)."""
        listing = directory.listing
        if listing is None:
            entries = dict(directory.whiteouts or {})
            entries.update(directory.children or {})
            for name in [n for n in entries if n.startswith(WHITEOUT_PREFIX)]:
                del entries[name]  # a directory implied by a path through a ".wh.*" name
            listing = sorted(entries.items(), key=lambda item: item[0])
            directory.listing = listing
        return listing

    def xattr_names(self, node: Node) -> list[bytes]:
        """Names of the xattrs ``node`` answers: the opaque key(s) first, then its own."""
        names = list(self.opaque_keys) if node.opaque else []
        if node.xattrs:
            names.extend(n for n in node.xattrs if n not in names)
        return names

    def getxattr(self, node: Node, name: bytes) -> bytes | None:
        """The value of xattr ``name`` of ``node``, or None when it has none of that name."""
        if node.opaque and name in self.opaque_keys:
            return _OPAQUE_VALUE
        if node.xattrs:
            return node.xattrs.get(name)
        return None

    def path(self, node: Node) -> str:
        """The path of ``node`` (by its first name) relative to the layer root, for messages."""
        parts: list[bytes] = []
        n = node
        for _ in range(4096):
            if n.id == ROOT_ID:
                break
            parts.append(n.name)
            n = self.node(n.parent)
        return "/" + b"/".join(reversed(parts)).decode(_ENC, "backslashreplace")

    def walk(self, directory: Node | None = None, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
        """Every presented ``(path, node)`` below ``directory`` (default the root), depth first, sorted."""
        directory = directory or self.root
        for name, child in self.listing(directory):
            path = prefix + name
            yield path, child
            if child.children is not None:
                yield from self.walk(child, path + b"/")
