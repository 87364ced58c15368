"""The FUSE request handlers for many layers in one session; the only place that knows errno.

Owns:

* :class:`LayerData` -- the read interface of one layer: ``await read(offset, length)`` returns exactly
  ``length`` bytes of the layer's uncompressed tar stream (``bytes`` or a ``memoryview``). The span manager
  implements it; :class:`SpansLayerData` (``spanread.LayerSpans`` in worker threads, fetching through any
  ``fetch(start, end)``, e.g. :class:`LocalBlob`) and :class:`BufferLayerData` (an in-memory or mmapped
  uncompressed tar; the block-cache stand-in) are the adapters available today.
  A ``LayerData`` may also offer ``fetched_size() -> int`` (bytes of the layer blob fetched so far, as
  ``RemoteLayer`` does) and ``blob_size`` (the blob's length); both are optional (duck-typed): the state
  file reports a layer without them as fully fetched. The in-memory adapters report their whole size.
* :class:`InodeMap` -- FUSE inode numbers: ``1`` is the root, a layer mounted in slot ``s`` owns
  ``s << 32 | local id`` (local ids from :mod:`soci_fs.inodes`, root = 1; the two highest local ids are the
  layer's state directory and state file). Slots are never reused in a session, so a stale inode of a
  removed layer can never name a node of a newer layer.
* :class:`LayerOperations` -- ``pyfuse3.Operations``: the root directory lists one subdirectory per
  layer (named by the mounter); lookup (negative answers inside a layer are cached, since layers are
  immutable), getattr, readlink, opendir/readdir (readdirplus, resumed by index), open (read-only,
  ``keep_cache``), read, getxattr/listxattr, statfs (overlayfs needs it), release/releasedir, forget.
* Tar header verification (spec §5 step 1): before the first read through an open handle of a layer added
  with ``verify=True``, the file's tar header is read and checked against its zTOC entry
  (:mod:`soci_fs.verify`); a mismatch fails the read with EIO and an ERROR log naming the layer, the file and
  the field (never file content). A failed check is tried again by the next read.
* The state directory (spec §6): a lookup-only ``.soci-snapshotter`` directory in every layer root (not
  listed by readdir of the root; mode 0500, uid/gid 0, nlink 1, zero times) holding one file
  ``<layer digest>.json`` (mode 0400, uid/gid 0; direct I/O, attributes never cached) whose content is
  made on every read and stat: compact JSON ``{"error", "digest", "size", "fetchedSize",
  "fetchedPercent"}`` + ``\n`` (``error`` omitted while empty). Every handler failure in a layer (anything
  the guard turns into an errno) stores its message there; the last one wins.
* Layers whose zTOC descriptor says ``com.amazon.soci.disable-xattrs=true`` (``xattrs=False``) answer
  getxattr with ENODATA and listxattr with an empty list. Not ENOSYS, as upstream's per-layer mount does:
  the kernel remembers ENOSYS per FUSE connection (``fc->no_getxattr`` / ``no_listxattr``) and from then on
  answers EOPNOTSUPP itself for every inode of the connection, and this one connection serves every layer,
  so one such layer would hide the opaque-directory xattrs of all the others from overlayfs (checked on
  Linux 6.18: after one ENOSYS, getxattr of another layer's opaque directory fails with EOPNOTSUPP without
  reaching us). For overlayfs and for callers, ENODATA / no names mean the same as upstream's "no xattr
  support": nothing is there.
* The errno table :data:`ERRNO` and the handler guard: only ``FUSEError`` leaves a handler; a
  ``SociError`` maps through the table; anything else is logged with the layer and path and answers EIO,
  so the session never dies of a handler error.

Will not: mount or unmount (mount.py), fetch, cache or verify spans (spans.py, cache.py), or build the tree
(inodes.py). Handlers do not block the trio loop: blocking reads go through ``trio.to_thread.run_sync``
with a ``CapacityLimiter``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pyfuse3
import trio

from soci_fs import gojson
from soci_fs.errors import (
    AlreadyExists,
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    SociError,
    Unauthenticated,
    Unavailable,
)
from soci_fs.inodes import InodeTree, Node
from soci_fs.spanread import LayerSpans
from soci_fs.verify import LayerVerifier
from soci_fs.ztoc import EntryTable

__all__ = [
    "ERRNO",
    "BufferLayerData",
    "InodeMap",
    "Layer",
    "LayerData",
    "LayerOperations",
    "LocalBlob",
    "SpansLayerData",
    "errno_of",
]

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
SLOT_SHIFT = 32
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
BLOCK_SIZE = 4096
NAME_MAX = 255
STATE_DIR_NAME = b".soci-snapshotter"
STATE_DIR_ID = LOCAL_MASK  # local ids of the state directory and file: above every tree node
STATE_FILE_ID = LOCAL_MASK - 1
MAX_TREE_ID = LOCAL_MASK - 2

#: The one errno table of the FUSE boundary; the first matching class wins (subclasses first).
ERRNO: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, errno.ENOENT),
    (AlreadyExists, errno.EEXIST),
    (InvalidArgument, errno.EINVAL),
    (FailedPrecondition, errno.EBUSY),
    (Unauthenticated, errno.EACCES),
    (Unavailable, errno.EIO),
    (FormatError, errno.EIO),
    (SociError, errno.EIO),
)


def errno_of(exc: BaseException) -> int:
    """The errno a handler answers for ``exc`` (EIO for anything unexpected)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    for cls, num in ERRNO:
        if isinstance(exc, cls):
            return num
    return errno.EIO


# ----------------------------------------------------------------------------------------- layer data


class LayerData(Protocol):
    """Random access to one layer's uncompressed tar stream."""

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        """Exactly ``length`` bytes at ``offset`` of the uncompressed tar.

        Raises:
            SociError: the bytes cannot be had (``Unavailable``, ``FormatError``, ...).
        """
        ...


class LocalBlob:
    """``fetch(start, end)`` over a local blob file (``os.pread``; safe from several threads)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def __call__(self, start: int, end: int) -> bytes:
        return os.pread(self._fd, end - start, start)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SpansLayerData:
    """:class:`LayerData` over ``spanread.LayerSpans``: every read fetches, verifies and inflates its spans
    in a worker thread (no cache: the span manager replaces this adapter)."""

    def __init__(self, spans: LayerSpans, limiter: trio.CapacityLimiter | None = None) -> None:
        self.spans = spans
        self.limiter = limiter

    async def read(self, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(self.spans.read, offset, length, limiter=self.limiter)

    @property
    def blob_size(self) -> int:
        return self.spans.compressed_size

    def fetched_size(self) -> int:
        """Every read fetches what it needs from a blob that is at hand: reported as fully fetched."""
        return self.spans.compressed_size


class BufferLayerData:
    """:class:`LayerData` over the whole uncompressed tar in memory (``bytes``, ``bytearray`` or ``mmap``);
    answers with memoryview slices, no copy."""

    def __init__(self, buffer: Any) -> None:
        self._view = memoryview(buffer).cast("B")

    async def read(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > len(self._view):
            raise InvalidArgument(f"read [{offset}, {offset + length}) beyond {len(self._view)} bytes")
        return self._view[offset : offset + length]

    @property
    def blob_size(self) -> int:
        return len(self._view)

    def fetched_size(self) -> int:
        """All of it is in memory."""
        return len(self._view)


def _blob_size(data: Any) -> int:
    """The blob length a ``LayerData`` knows: ``blob_size``, else a ``RemoteLayer``'s zTOC size, else 0."""
    size = getattr(data, "blob_size", None)
    if size is None:
        size = getattr(getattr(data, "layer", None), "compressed_size", None)
    return int(size) if isinstance(size, int) else 0


# ------------------------------------------------------------------------------------------ layers


@dataclass(eq=False)
class Layer:
    """A layer mounted in the session: its name (the root subdirectory), slot, tree and data.

    ``digest`` names the state file, ``size`` is the blob length it reports, ``verifier`` is set when reads
    verify tar headers, ``xattrs`` is false for layers marked ``disable-xattrs``, and ``error`` is the last
    handler failure (the state file's ``error``).
    """

    name: bytes
    slot: int
    tree: InodeTree
    data: LayerData
    blocks: int = 0  # 4 KiB blocks of its regular files (statfs)
    digest: str = ""
    size: int = 0
    verifier: LayerVerifier | None = None
    xattrs: bool = True
    error: str = ""

    @property
    def state_file_name(self) -> bytes:
        return os.fsencode(self.digest) + b".json"

    def state(self) -> bytes:
        """The state file's content, made now (spec §6)."""
        fn = getattr(self.data, "fetched_size", None)
        fetched = int(fn()) if callable(fn) else self.size
        percent = 100.0 if self.size <= 0 else 100.0 * fetched / self.size
        members: list[tuple[str, Any]] = [("error", self.error)] if self.error else []
        members += [
            ("digest", self.digest),
            ("size", self.size),
            ("fetchedSize", fetched),
            ("fetchedPercent", float(percent)),
        ]
        return gojson.dumps(gojson.Struct(*members)) + b"\n"

    def inode(self, node: Node) -> int:
        return (self.slot << SLOT_SHIFT) | node.id

    def describe(self, node: Node | None) -> str:
        name = self.name.decode("utf-8", "backslashreplace")
        return f"layer {name!r}" + (f" path {self.tree.path(node)!r}" if node is not None else "")


class InodeMap:
    """FUSE inode <-> (layer, local id). Slots start at 1 and are never reused."""

    def __init__(self) -> None:
        self._next_slot = 1
        self.by_slot: dict[int, Layer] = {}
        self.by_name: dict[bytes, Layer] = {}

    def add(self, name: bytes, tree: InodeTree, data: LayerData) -> Layer:
        if name in self.by_name:
            raise AlreadyExists(f"layer directory {name!r} is mounted already")
        if tree.max_id > MAX_TREE_ID:
            raise InvalidArgument(f"layer {name!r} has {tree.max_id} inodes, more than fit in 32 bits")
        layer = Layer(name, self._next_slot, tree, data)
        layer.blocks = sum(
            -(-n.size // BLOCK_SIZE) for n in (tree.node(i) for i in range(1, tree.max_id + 1)) if n.is_reg
        )
        self._next_slot += 1
        self.by_slot[layer.slot] = layer
        self.by_name[name] = layer
        return layer

    def remove(self, name: bytes) -> Layer:
        layer = self.by_name.pop(name, None)
        if layer is None:
            raise NotFound(f"layer directory {name!r}")
        del self.by_slot[layer.slot]
        return layer

    def layer_of(self, inode: int) -> tuple[Layer, int]:
        """The layer and local id of a FUSE inode other than the root.

        Raises:
            NotFound: the inode belongs to no mounted layer (e.g. its layer was removed).
        """
        layer = self.by_slot.get(inode >> SLOT_SHIFT)
        if layer is None:
            raise NotFound(f"inode {inode:#x}: no mounted layer")
        return layer, inode & LOCAL_MASK

    def resolve(self, inode: int) -> tuple[Layer, Node]:
        """The layer and node of a FUSE inode other than the root.

        Raises:
            NotFound: the inode belongs to no mounted layer (e.g. its layer was removed).
        """
        layer = self.by_slot.get(inode >> SLOT_SHIFT)
        if layer is None:
            raise NotFound(f"inode {inode:#x}: no mounted layer")
        return layer, layer.tree.node(inode & LOCAL_MASK)


class _TableVerifier(LayerVerifier):
    """:class:`~soci_fs.verify.LayerVerifier` over a tree's packed :class:`~soci_fs.ztoc.EntryTable`: the
    header offsets come from the table's arrays, so only the entry being verified is decoded."""

    def __init__(self, entries: EntryTable) -> None:
        super().__init__(entries)
        self.table = entries

    def header_range(self, index: int) -> tuple[int, int]:
        return self.table.header_range(index)


# ------------------------------------------------------------------------------------- the handlers


@dataclass(eq=False, slots=True)
class _Handle:
    layer: Layer | None  # None: the session root
    node: Node | None  # None: the session root, the state directory or the state file
    listing: Sequence[tuple[bytes, Any]] = ()
    verified: bool = False  # the tar header of the open file was checked
    state: bool = False  # the handle is the state directory or state file


def _record(self: LayerOperations, by: str, key: Any, op: str, exc: BaseException) -> None:
    """Store a handler failure in its layer's state file (the last one wins)."""
    layer: Layer | None = None
    node: Node | None = None
    if by == "inode" and isinstance(key, int) and key != ROOT_INODE:
        layer = self.layers.by_slot.get(key >> SLOT_SHIFT)
        local = key & LOCAL_MASK
        if layer is not None and local <= layer.tree.max_id:
            node = layer.tree.node(local)
    elif by == "fh" and isinstance(key, int):
        h = self._handles.get(key)
        if h is not None:
            layer, node = h.layer, h.node
    if layer is not None:
        where = f" {layer.tree.path(node)}" if node is not None else ""
        layer.error = f"{op}{where}: {str(exc) or type(exc).__name__}"


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _guard(by: str) -> Callable[[_F], _F]:
    """Wrap a handler: only FUSEError escapes. ``by`` says how the first argument names the object
    (``"inode"``, ``"fh"`` or ``"none"``) so failures are logged with the layer and path."""

    def deco(fn: _F) -> _F:
        op = fn.__name__

        @functools.wraps(fn)
        async def wrapper(self: LayerOperations, *args: Any) -> Any:
            observer = self.observer
            if observer is None:
                return await _answer(self, args)
            t0 = time.perf_counter()
            try:
                result = await _answer(self, args)
            except pyfuse3.FUSEError as exc:
                _observe(observer, op, time.perf_counter() - t0, exc.errno)
                raise
            _observe(observer, op, time.perf_counter() - t0, 0)
            return result

        async def _answer(self: LayerOperations, args: tuple[Any, ...]) -> Any:
            try:
                return await fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except Exception as exc:
                num = errno_of(exc)
                where = self._describe(by, args[0] if args else None)
                try:
                    _record(self, by, args[0] if args else None, op, exc)
                except Exception:  # pragma: no cover - bookkeeping must not change the answer
                    log.debug("cannot record the failure of %s", op, exc_info=True)
                if not isinstance(exc, SociError):
                    log.error("fuse %s failed unexpectedly on %s", op, where, exc_info=True)
                elif num == errno.EIO:
                    log.error("fuse %s failed on %s: %s", op, where, exc)
                else:
                    log.debug("fuse %s on %s: %s", op, where, exc)
                raise pyfuse3.FUSEError(num) from None

        return wrapper  # type: ignore[return-value]

    return deco


def _observe(observer: Callable[[str, float, int], None], op: str, seconds: float, num: int) -> None:
    try:
        observer(op, seconds, num)
    except Exception:  # metrics must not change the answer
        log.debug("FUSE observer failed for %s", op, exc_info=True)


async def _erofs_async(self: Any, *_args: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class LayerOperations(pyfuse3.Operations):
    """pyfuse3 handlers for many read-only layers under one root.

    Args:
        entry_timeout: seconds the kernel may keep a name -> inode answer (layers are immutable; removal
            invalidates the layer's root entry explicitly).
        attr_timeout: seconds the kernel may keep attributes.
        negative_timeout: seconds the kernel may remember that a name is absent in a layer directory
            (0: do not cache misses). Misses at the session root are never cached.
    """

    enable_writeback_cache = False
    enable_acl = False
    supports_dot_lookup = False

    def __init__(
        self,
        *,
        entry_timeout: float = 3600.0,
        attr_timeout: float = 3600.0,
        negative_timeout: float = 3600.0,
    ) -> None:
        super().__init__()
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.negative_timeout = negative_timeout
        self.layers = InodeMap()
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._root_mtime_ns = time.time_ns()
        self.observer: Callable[[str, float, int], None] | None = None  # (operation, seconds, errno)

    # ---- layer bookkeeping (called by mount.Session on the trio loop)

    def add_layer(
        self,
        name: bytes,
        tree: InodeTree,
        data: LayerData,
        *,
        digest: str = "",
        size: int | None = None,
        verify: bool = False,
        xattrs: bool = True,
    ) -> Layer:
        """Register a layer under the root directory ``name``.

        Args:
            digest: the layer blob digest (names the state file; default: ``data.digest`` or ``name``).
            size: the blob length the state file reports (default: what ``data`` knows, else 0).
            verify: check the tar header of a file before the first read through each open handle.
            xattrs: false answers every xattr request of the layer with "none" (``disable-xattrs``).
        """
        _check_name(name)
        layer = self.layers.add(name, tree, data)
        layer.digest = digest or str(getattr(data, "digest", "") or "") or os.fsdecode(name)
        layer.size = _blob_size(data) if size is None else size
        layer.verifier = _TableVerifier(tree.entries) if verify else None
        layer.xattrs = xattrs
        return layer

    def remove_layer(self, name: bytes) -> Layer:
        """Unregister a layer; its inodes answer ENOENT from now on."""
        return self.layers.remove(name)

    # ---- helpers

    def _describe(self, by: str, key: Any) -> str:
        try:
            if by == "inode" and isinstance(key, int):
                if key == ROOT_INODE:
                    return "the session root"
                layer, local = self.layers.layer_of(key)
                if local > MAX_TREE_ID:
                    return layer.describe(None) + " state directory"
                return layer.describe(layer.tree.node(local))
            if by == "fh" and isinstance(key, int):
                h = self._handles.get(key)
                if h is not None and h.layer is not None:
                    return h.layer.describe(h.node)
                return f"handle {key}"
        except Exception:
            pass
        return f"{by} {key!r}"

    def _attr(self, layer: Layer, node: Node) -> pyfuse3.EntryAttributes:
        """The attributes of ``node``, made on each call (under a microsecond): the kernel keeps them for
        ``attr_timeout``, so a per-inode cache here would mostly hold memory (about 240 bytes an inode)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = (layer.slot << SLOT_SHIFT) | node.id
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink or 1
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = -(-node.size // BLOCK_SIZE) * 8
        a.st_mtime_ns = node.mtime_ns
        a.st_atime_ns = node.mtime_ns
        a.st_ctime_ns = node.mtime_ns
        return a

    def _state_attr(self, layer: Layer, local: int) -> pyfuse3.EntryAttributes:
        """Attributes of the state directory or (made now, never cached by the kernel) the state file."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = (layer.slot << SLOT_SHIFT) | local
        a.entry_timeout = self.entry_timeout
        a.st_nlink = 1
        a.st_blksize = BLOCK_SIZE
        if local == STATE_DIR_ID:
            a.attr_timeout = self.attr_timeout
            a.st_mode = stat.S_IFDIR | 0o500
        else:
            a.attr_timeout = 0
            a.st_mode = stat.S_IFREG | 0o400
            a.st_size = len(layer.state())
            a.st_blocks = -(-a.st_size // BLOCK_SIZE) * 8
        return a

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT_INODE
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = 1.0  # nlink follows the number of layers
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self.layers.by_name)
        a.st_blksize = BLOCK_SIZE
        a.st_mtime_ns = a.st_atime_ns = a.st_ctime_ns = self._root_mtime_ns
        return a

    def _new_fh(self, handle: _Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    # ---- metadata

    @_guard("inode")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            layer = self.layers.by_name.get(name)
            if layer is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(layer, layer.tree.root)
        layer, local = self.layers.layer_of(parent_inode)
        if local > MAX_TREE_ID:
            if local == STATE_DIR_ID and name == layer.state_file_name:
                return self._state_attr(layer, STATE_FILE_ID)
            if local == STATE_DIR_ID:
                raise pyfuse3.FUSEError(errno.ENOENT)
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        parent = layer.tree.node(local)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if local == layer.tree.root.id and name == STATE_DIR_NAME:
            return self._state_attr(layer, STATE_DIR_ID)
        node = layer.tree.lookup(parent, name)
        if node is None:
            if self.negative_timeout <= 0:
                raise pyfuse3.FUSEError(errno.ENOENT)
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = self.negative_timeout
            return miss
        return self._attr(layer, node)

    @_guard("inode")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attr()
        layer, local = self.layers.layer_of(inode)
        if local > MAX_TREE_ID:
            return self._state_attr(layer, local)
        return self._attr(layer, layer.tree.node(local))

    @_guard("inode")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        layer, local = self.layers.layer_of(inode)
        if local > MAX_TREE_ID:
            raise pyfuse3.FUSEError(errno.EINVAL)
        node = layer.tree.node(local)
        if not node.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @_guard("inode")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == ROOT_INODE:
            listing = sorted((name, layer) for name, layer in self.layers.by_name.items())
            return self._new_fh(_Handle(None, None, listing))
        layer, local = self.layers.layer_of(inode)
        if local == STATE_DIR_ID:
            return self._new_fh(_Handle(layer, None, [(layer.state_file_name, STATE_FILE_ID)], state=True))
        if local > MAX_TREE_ID:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node = layer.tree.node(local)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._new_fh(_Handle(layer, node, layer.tree.listing(node)))

    @_guard("fh")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        listing = h.listing
        layer = h.layer
        reply = pyfuse3.readdir_reply
        for i in range(start_id, len(listing)):
            name, obj = listing[i]
            if layer is None:
                attr = self._attr(obj, obj.tree.root)
            elif h.state:
                attr = self._state_attr(layer, obj)
            else:
                attr = self._attr(layer, obj)
            if not reply(token, name, attr, i + 1):
                break

    @_guard("fh")
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_guard("inode")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        layer, local = self.layers.layer_of(inode)
        if local > MAX_TREE_ID or not layer.xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)  # not ENOSYS: see the module docstring
        value = layer.tree.getxattr(layer.tree.node(local), name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_guard("inode")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if inode == ROOT_INODE:
            return []
        layer, local = self.layers.layer_of(inode)
        if local > MAX_TREE_ID or not layer.xattrs:
            return []
        return layer.tree.xattr_names(layer.tree.node(local))

    @_guard("none")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        s.f_blocks = sum(layer.blocks for layer in self.layers.by_slot.values())
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = 1 + sum(layer.tree.max_id for layer in self.layers.by_slot.values())
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = NAME_MAX
        return s

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inode numbers are computed, not allocated: nothing to free. (No guard needed: cannot fail.)
        return None

    # ---- data

    @_guard("inode")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        layer, local = self.layers.layer_of(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        if local == STATE_FILE_ID:
            # made anew on every read: no page cache, and reads are answered whatever the cached size says
            fi = pyfuse3.FileInfo(fh=self._new_fh(_Handle(layer, None, state=True)), keep_cache=False)
            fi.direct_io = True
            return fi
        if local > MAX_TREE_ID:
            raise pyfuse3.FUSEError(errno.EISDIR)
        node = layer.tree.node(local)
        if node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not node.is_reg:
            raise pyfuse3.FUSEError(errno.EIO)
        return pyfuse3.FileInfo(fh=self._new_fh(_Handle(layer, node)), keep_cache=True)

    @_guard("fh")
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        h = self._handles.get(fh)
        if h is None or h.layer is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        layer = h.layer
        if h.state:
            return layer.state()[off : off + max(size, 0)]
        node = h.node
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if not h.verified and layer.verifier is not None and node.entry >= 0:
            await layer.verifier.verify(layer.data, node.entry)
            h.verified = True
        if off >= node.size or size <= 0:
            return b""
        n = min(size, node.size - off)
        data = await layer.data.read(node.offset + off, n)
        if len(data) != n:
            raise Unavailable(f"unexpected copied data size for on-demand fetch: {len(data)} of {n} bytes")
        return data

    @_guard("fh")
    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_guard("inode")
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only reached without default_permissions; writes are refused, the rest is allowed.
        return not mode & os.W_OK

    # ---- everything that would modify the tree

    setattr = _erofs_async
    mknod = _erofs_async
    mkdir = _erofs_async
    unlink = _erofs_async
    rmdir = _erofs_async
    symlink = _erofs_async
    rename = _erofs_async
    link = _erofs_async
    create = _erofs_async
    write = _erofs_async
    setxattr = _erofs_async
    removexattr = _erofs_async


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > NAME_MAX:
        raise InvalidArgument(f"layer directory name {name!r} is not a single path component")
