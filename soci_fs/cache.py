"""The block cache: decompressed span data, keyed (layer digest, span id), in memory and on disk.

Owns:

* a bounded **memory tier**: an LRU of whole decompressed spans (``bytes``) up to ``max_memory_bytes``;
* a bounded **disk tier** under ``<root>/cache/<digest with ':' as '-'>/<span id>``, one file per span,
  LRU-evicted beyond ``max_disk_bytes``. Each file is ``header | crc table | data``: the header is
  ``b"SOCIBLK1"``, the data length (u64 LE) and the checksum block size (u32 LE); the table holds the crc32
  of every ``CRC_BLOCK`` bytes of data (u32 LE each), so a partial read checks only the blocks it touches;
* atomic writes (a ``.tmp-*`` file in the layer directory, then ``os.replace``), so a reader sees a whole
  old file or a whole new one; leftovers of a crash are removed when the cache is opened;
* restart: opening a cache indexes what is on disk (LRU order by file mtime), so a fully fetched layer is
  served with no network at all. A file torn by a crash fails its checksum and is refetched;
* corruption detection: each checksum block is verified the first time this process reads it (or on
  every read with ``verify_every_read``); a bad block drops the whole span file, logs a WARNING and reports a
  miss, and the span manager refetches the span;
* :func:`gather`, the hot copy of several cached pieces into one reply buffer (``ext/_blockcopy.pyx``, GIL
  released around the copies, or its twin ``soci_fs.blockcopy_py`` with ``SOCI_PUREPYTHON=1``).

Config keys (``[directory_cache]`` style, read by :meth:`CacheConfig.from_section`):

==========================  ==========================  ============================================
key                         default                     meaning
==========================  ==========================  ============================================
``max_memory_bytes``        134217728 (128 MiB)         memory tier bound; 0 turns the tier off
``max_disk_bytes``          0 (= unlimited)             disk tier bound (files incl. headers); as
                                                        upstream, no size eviction unless set
``verify_every_read``       false                       re-check checksums on every disk read
==========================  ==========================  ============================================

Thread safety: every method may be called from any thread; one lock guards the indexes and is never held
across file reads or checksum work. An evicted file that a reader has already opened stays readable (POSIX
unlink semantics); a reader that loses the race reports a miss.

Will not: fetch, verify span digests or inflate (that is ``soci_fs.spans``), know about trio, or share
files between processes (one daemon owns a root).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soci_fs import _select
from soci_fs.errors import InvalidArgument

__all__ = [
    "CRC_BLOCK",
    "IMPLEMENTATION",
    "MAGIC",
    "BlockCache",
    "CacheConfig",
    "gather",
]

log = logging.getLogger(__name__)

_engine = _select.load("soci_fs._ext._blockcopy", "soci_fs.blockcopy_py")
IMPLEMENTATION = "pure" if _engine.__name__ == "soci_fs.blockcopy_py" else "compiled"
gather = _engine.gather
"""``gather(pieces, out, offset=0) -> int``: copy buffers back to back into ``out`` (see blockcopy_py)."""

MAGIC = b"SOCIBLK1"
CRC_BLOCK = 64 * 1024
_HEAD = struct.Struct("<8sQI")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]+$")

MIB = 1 << 20


@dataclass(frozen=True)
class CacheConfig:
    """Bounds of the block cache (see the module docstring for the keys)."""

    max_memory_bytes: int = 128 * MIB
    max_disk_bytes: int = 0
    verify_every_read: bool = False

    def __post_init__(self) -> None:
        if self.max_memory_bytes < 0 or self.max_disk_bytes < 0:
            raise InvalidArgument(
                f"cache bounds must not be negative (max_memory_bytes {self.max_memory_bytes}, "
                f"max_disk_bytes {self.max_disk_bytes})"
            )

    @classmethod
    def from_section(cls, section: Any) -> CacheConfig:
        """From a ``[directory_cache]`` table (object or mapping); absent keys take the defaults."""
        get = section.get if isinstance(section, dict) else (lambda k, d: getattr(section, k, d))
        return cls(
            max_memory_bytes=int(get("max_memory_bytes", cls.max_memory_bytes)),
            max_disk_bytes=int(get("max_disk_bytes", cls.max_disk_bytes)),
            verify_every_read=bool(get("verify_every_read", cls.verify_every_read)),
        )


class _Entry:
    """One span file in the disk index. ``crcs``/``length`` are loaded from the header on first read."""

    __slots__ = ("crcs", "length", "size", "verified")

    def __init__(self, size: int) -> None:
        self.size = size
        self.length = -1
        self.crcs: tuple[int, ...] = ()
        self.verified = bytearray()


class _Corrupt(Exception):
    pass


def layer_dir_name(layer: str) -> str:
    """Directory name of a layer digest (``sha256:ab..`` -> ``sha256-ab..``).

    Raises:
        InvalidArgument: ``layer`` is not a digest.
    """
    if not _DIGEST.match(layer):
        raise InvalidArgument(f"block cache key {layer!r} is not a digest")
    return layer.replace(":", "-", 1)


def _layer_of_dir(name: str) -> str | None:
    alg, sep, rest = name.partition("-")
    digest = f"{alg}:{rest}"
    return digest if sep and _DIGEST.match(digest) else None


def encode_header(data: bytes | memoryview) -> bytes:
    """The header and crc table of a span file holding ``data``."""
    view = memoryview(data)
    n = len(view)
    crcs = [zlib.crc32(view[i : i + CRC_BLOCK]) for i in range(0, n, CRC_BLOCK)]
    return _HEAD.pack(MAGIC, n, CRC_BLOCK) + struct.pack(f"<{len(crcs)}I", *crcs)


class BlockCache:
    """Decompressed spans in a bounded memory LRU and a bounded on-disk LRU.

    Args:
        root: the cache root; files live under ``<root>/cache``. ``None``: memory tier only.
        config: the bounds.
    """

    def __init__(self, root: str | os.PathLike[str] | None, config: CacheConfig | None = None) -> None:
        self.config = config or CacheConfig()
        self.root = Path(root) / "cache" if root is not None else None
        self._lock = threading.Lock()
        self._mem: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._mem_bytes = 0
        self._disk: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._disk_bytes = 0
        self._by_layer: dict[str, set[int]] = {}
        self._stats = dict.fromkeys(
            (
                "memory_hits",
                "disk_hits",
                "misses",
                "puts",
                "memory_evictions",
                "disk_evictions",
                "corrupt",
                "write_errors",
            ),
            0,
        )
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._scan()

    # ---- opening

    def _scan(self) -> None:
        assert self.root is not None
        found: list[tuple[float, str, int, int]] = []
        for layer_dir in self.root.iterdir():
            layer = _layer_of_dir(layer_dir.name)
            if layer is None or not layer_dir.is_dir():
                continue
            for f in layer_dir.iterdir():
                if f.name.startswith(".tmp-"):
                    f.unlink(missing_ok=True)
                    continue
                if not f.name.isdigit():
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime, layer, int(f.name), st.st_size))
        found.sort()
        with self._lock:
            for _, layer, span, size in found:
                self._add_disk_locked((layer, span), size)
            self._evict_disk_locked()
        if found:
            log.info("block cache %s: %d cached spans, %d bytes", self.root, len(found), self._disk_bytes)

    # ---- queries

    def _path(self, layer: str, span: int) -> Path:
        assert self.root is not None
        return self.root / layer_dir_name(layer) / str(span)

    def contains(self, layer: str, span: int) -> bool:
        """Whether either tier holds the span (no I/O; a disk entry may still turn out corrupt)."""
        key = (layer, span)
        with self._lock:
            return key in self._mem or key in self._disk

    def cached_spans(self, layer: str) -> frozenset[int]:
        """Span ids of ``layer`` held by either tier."""
        with self._lock:
            disk = self._by_layer.get(layer, set())
            mem = {s for (lay, s) in self._mem if lay == layer}
        return frozenset(disk | mem)

    def get_memory(self, layer: str, span: int) -> bytes | None:
        """The whole span from the memory tier, or ``None``. Never blocks on I/O: safe on the event loop."""
        key = (layer, span)
        with self._lock:
            data = self._mem.get(key)
            if data is not None:
                self._mem.move_to_end(key)
                self._stats["memory_hits"] += 1
        return data

    def read(self, layer: str, span: int, start: int, length: int) -> bytes | memoryview | None:
        """``length`` bytes at ``start`` inside the span, from memory or disk; ``None`` on a miss.

        A corrupt or truncated file is removed, logged at WARNING and reported as a miss. Blocking (disk).
        """
        if start < 0 or length < 0:
            raise InvalidArgument(f"block cache read: bad range start={start} length={length}")
        data = self.get_memory(layer, span)
        if data is not None:
            if start + length > len(data):
                raise InvalidArgument(
                    f"span {span}: [{start}, {start + length}) beyond its {len(data)} bytes"
                )
            return memoryview(data)[start : start + length]
        key = (layer, span)
        with self._lock:
            entry = self._disk.get(key)
            if entry is None:
                self._stats["misses"] += 1
                return None
            self._disk.move_to_end(key)
        path = self._path(layer, span)
        try:
            out = self._read_file(path, entry, span, start, length)
        except FileNotFoundError:
            with self._lock:
                if self._disk.get(key) is entry:
                    self._forget_locked(key)
                self._stats["misses"] += 1
            return None
        except _Corrupt as exc:
            log.warning(
                "block cache: %s span %d file %s is corrupt (%s); dropping it", layer, span, path, exc
            )
            with self._lock:
                self._stats["corrupt"] += 1
                self._stats["misses"] += 1
                if self._disk.get(key) is entry:
                    self._forget_locked(key)
                    path.unlink(missing_ok=True)
            return None
        with self._lock:
            self._stats["disk_hits"] += 1
        return out

    def _read_file(self, path: Path, entry: _Entry, span: int, start: int, length: int) -> memoryview:
        fd = os.open(path, os.O_RDONLY)
        try:
            if entry.length < 0:
                self._load_header(fd, entry)
            n = entry.length
            if start + length > n:
                raise InvalidArgument(f"span {span}: [{start}, {start + length}) beyond its {n} bytes")
            data_off = _HEAD.size + 4 * len(entry.crcs)
            b0 = start // CRC_BLOCK
            b1 = (start + length + CRC_BLOCK - 1) // CRC_BLOCK if length else b0
            lo = b0 * CRC_BLOCK
            hi = min(b1 * CRC_BLOCK, n)
            buf = bytearray(hi - lo)
            got = os.preadv(fd, [buf], data_off + lo) if buf else 0
            if got != len(buf):
                raise _Corrupt(f"short read: {got} of {len(buf)} bytes at {data_off + lo}")
        finally:
            os.close(fd)
        view = memoryview(buf)
        every = self.config.verify_every_read
        verified = entry.verified
        for b in range(b0, b1):
            if every or not verified[b]:
                piece = view[(b - b0) * CRC_BLOCK : (b - b0 + 1) * CRC_BLOCK]
                got_crc = zlib.crc32(piece)
                if got_crc != entry.crcs[b]:
                    raise _Corrupt(f"block {b}: crc32 {got_crc:08x}, stored {entry.crcs[b]:08x}")
                verified[b] = 1
        return view[start - lo : start - lo + length]

    @staticmethod
    def _load_header(fd: int, entry: _Entry) -> None:
        head = os.pread(fd, _HEAD.size, 0)
        if len(head) != _HEAD.size:
            raise _Corrupt("header cut short")
        magic, n, block = _HEAD.unpack(head)
        if magic != MAGIC or block != CRC_BLOCK:
            raise _Corrupt(f"bad header (magic {magic!r}, block size {block})")
        count = (n + CRC_BLOCK - 1) // CRC_BLOCK
        table = os.pread(fd, 4 * count, _HEAD.size)
        if len(table) != 4 * count:
            raise _Corrupt("crc table cut short")
        expect = _HEAD.size + 4 * count + n
        if os.fstat(fd).st_size != expect:
            raise _Corrupt(f"file is {os.fstat(fd).st_size} bytes, header says {expect}")
        entry.crcs = struct.unpack(f"<{count}I", table)
        entry.verified = bytearray(count)
        entry.length = n

    # ---- updates

    def put(self, layer: str, span: int, data: bytes) -> None:
        """Store a whole decompressed span in both tiers. Blocking (disk write, checksums).

        A failed disk write is logged at WARNING and the span stays in memory only.
        """
        key = (layer, span)
        layer_dir_name(layer)  # validate before touching anything
        with self._lock:
            self._stats["puts"] += 1
            self._put_memory_locked(key, data)
        if self.root is None:
            return
        final = self._path(layer, span)
        tmp = final.with_name(f".tmp-{span}-{secrets.token_hex(6)}")
        try:
            head = encode_header(data)
            final.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(data)
            size = len(head) + len(data)
            with self._lock:
                os.replace(tmp, final)
                old = self._disk.get(key)
                if old is not None:
                    self._forget_locked(key)
                self._add_disk_locked(key, size)
                self._evict_disk_locked()
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            with self._lock:
                self._stats["write_errors"] += 1
            log.warning(
                "block cache: cannot write %s span %d to %s (%s); memory only", layer, span, final, exc
            )
            return

    def discard(self, layer: str, span: int) -> None:
        """Forget one span in both tiers and delete its file."""
        key = (layer, span)
        with self._lock:
            data = self._mem.pop(key, None)
            if data is not None:
                self._mem_bytes -= len(data)
            if key in self._disk:
                self._forget_locked(key)
                if self.root is not None:
                    self._path(layer, span).unlink(missing_ok=True)

    def drop_layer(self, layer: str) -> None:
        """Forget every span of ``layer`` and delete its directory."""
        with self._lock:
            for key in [k for k in self._mem if k[0] == layer]:
                self._mem_bytes -= len(self._mem.pop(key))
            for span in list(self._by_layer.get(layer, ())):
                self._forget_locked((layer, span))
            if self.root is not None:
                d = self.root / layer_dir_name(layer)
                for f in d.glob("*") if d.is_dir() else ():
                    f.unlink(missing_ok=True)
                try:
                    d.rmdir()
                except OSError:
                    pass

    def statistics(self) -> dict[str, int]:
        """Counters plus the current sizes of both tiers."""
        with self._lock:
            out = dict(self._stats)
            out.update(
                memory_bytes=self._mem_bytes,
                memory_spans=len(self._mem),
                disk_bytes=self._disk_bytes,
                disk_spans=len(self._disk),
            )
        return out

    # ---- internals (call with the lock held)

    def _put_memory_locked(self, key: tuple[str, int], data: bytes) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._mem_bytes -= len(old)
        limit = self.config.max_memory_bytes
        if len(data) > limit:
            return
        self._mem[key] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > limit:
            _, victim = self._mem.popitem(last=False)
            self._mem_bytes -= len(victim)
            self._stats["memory_evictions"] += 1

    def _add_disk_locked(self, key: tuple[str, int], size: int) -> None:
        self._disk[key] = _Entry(size)
        self._disk_bytes += size
        self._by_layer.setdefault(key[0], set()).add(key[1])

    def _forget_locked(self, key: tuple[str, int]) -> None:
        entry = self._disk.pop(key)
        self._disk_bytes -= entry.size
        spans = self._by_layer.get(key[0])
        if spans is not None:
            spans.discard(key[1])
            if not spans:
                del self._by_layer[key[0]]

    def _evict_disk_locked(self) -> None:
        # Unlinking under the lock keeps a concurrent put of the same key from losing its new file.
        limit = self.config.max_disk_bytes
        while limit > 0 and self._disk_bytes > limit and self._disk:
            key = next(iter(self._disk))
            self._forget_locked(key)
            self._path(*key).unlink(missing_ok=True)
            self._stats["disk_evictions"] += 1
