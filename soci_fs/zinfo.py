"""Checkpoints ("zinfo"): the gzip checkpoint blob, the TarZinfo flatbuffer and span arithmetic.

This module owns the value types of the zTOC engine (``Checkpoint``, ``GzipZinfo``, ``TarZinfo``,
``IndexResult``), their byte formats (formats.md §7 and §9), the span arithmetic of formats.md §6, the
uncompressed-layer indexer ``index_tar`` and the choice of the gzip engine: ``index_gzip`` and
``extract_span`` come from the compiled ``soci_fs._ext._zinfo`` or from its pure-Python twin
``soci_fs.zinfo_py`` (``SOCI_PUREPYTHON=1`` forces the twin); ``IMPLEMENTATION`` says which one was loaded.

It does no I/O of its own (input comes from ``read`` callables) and knows nothing about zTOC flatbuffers,
registries or caches; random access over a whole layer lives in ``soci_fs.spanread``.
"""

from __future__ import annotations

import hashlib
import queue
import struct
import threading
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from soci_fs import _select
from soci_fs.errors import FormatError, InvalidArgument

__all__ = [
    "CHECKPOINT_SIZE",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "TARZINFO_VERSION",
    "WINSIZE",
    "Checkpoint",
    "GzipZinfo",
    "IndexResult",
    "TarZinfo",
    "extract_span",
    "index_gzip",
    "index_tar",
]

WINSIZE = 32768
HEADER_SIZE = 12  # int32 N + int64 span_size
CHECKPOINT_SIZE = 8 + 8 + 1 + WINSIZE  # int64 in + int64 out + uint8 bits + window
TARZINFO_VERSION = 2
V1_FIRST_IN_OFFSET = 10  # checkpoint 0 implied by a v1 blob: right after a 10-byte gzip header

_HEADER = struct.Struct("<iq")
_CP_HEAD = struct.Struct("<qqB")
_ZERO_WINDOW = bytes(WINSIZE)
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A point where inflate can restart: a deflate block boundary (or the end of a gzip header).

    Attributes:
        in_offset: compressed offset of the first full byte after the boundary.
        out_offset: uncompressed offset of the boundary.
        bits: 0..7 bits of the byte at ``in_offset - 1`` that belong to the next block.
        window: the 32 KiB of output before ``out_offset``, zero-padded on the left.
    """

    in_offset: int
    out_offset: int
    bits: int
    window: bytes


@dataclass(frozen=True)
class IndexResult:
    """What one indexing pass over a layer blob produced.

    Attributes:
        checkpoints_blob: gzip: the zinfo blob v2; tar: the TarZinfo flatbuffer.
        span_digests: ``"sha256:<hex>"`` over each span's compressed bytes, in span order.
        compressed_size: bytes read from the blob.
        uncompressed_size: bytes of output produced (the whole stream).
    """

    checkpoints_blob: bytes
    span_digests: tuple[str, ...]
    compressed_size: int
    uncompressed_size: int


class SpanHasher:
    """sha256 of each span's compressed bytes, computed off the inflate thread.

    The indexers (compiled and twin) hand it views of immutable input chunks in stream order. Small inputs
    are hashed inline; once more than ``BATCH`` bytes are pending, a single worker thread takes over (in
    order), so hashing overlaps with inflate on another core. At most ``MAX_JOBS`` batches are in flight,
    which bounds the memory held to about ``MAX_JOBS * BATCH`` bytes. ``close()`` always stops the worker.
    """

    BATCH = 1 << 20
    MAX_JOBS = 8

    def __init__(self) -> None:
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._hasher: Any = None
        self._digests: list[str] = []
        self._queue: queue.SimpleQueue[tuple[int, list[memoryview]] | None] | None = None
        self._slots = threading.BoundedSemaphore(self.MAX_JOBS)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # Job kinds.
    _UPDATE, _FINISH, _START = 0, 1, 2

    def _run(self, kind: int, views: list[memoryview]) -> None:
        if kind == self._START:
            self._hasher = hashlib.sha256()
        for v in views:
            self._hasher.update(v)
        if kind == self._FINISH:
            self._digests.append("sha256:" + self._hasher.hexdigest())
            self._hasher = None

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._error is None:
                    self._run(*job)
            except BaseException as exc:  # handed to the indexing thread by close()
                self._error = exc
            finally:
                self._slots.release()

    def _submit(self, kind: int) -> None:
        views, self._pending, self._pending_bytes = self._pending, [], 0
        if self._queue is None:
            self._run(kind, views)
            return
        self._slots.acquire()
        self._queue.put((kind, views))

    def start_span(self) -> None:
        """Begin the next span (the previous one must be finished)."""
        self._submit(self._START)

    def update(self, view: memoryview) -> None:
        """Add compressed bytes to the running span (``view`` must stay unchanged until ``close``)."""
        self._pending.append(view)
        self._pending_bytes += len(view)
        if self._pending_bytes >= self.BATCH:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._worker, name="soci-span-hash", daemon=True)
                self._thread.start()
            self._submit(self._UPDATE)

    def finish_span(self) -> None:
        """Finish the running span and record its digest."""
        self._submit(self._FINISH)

    def close(self) -> tuple[str, ...]:
        """Wait for the worker, stop it, and return the digests finished so far."""
        if self._queue is not None:
            self._queue.put(None)
            assert self._thread is not None
            self._thread.join()
            self._queue = None
        self._pending = []
        if self._error is not None:
            raise self._error
        return tuple(self._digests)


def _span_index_error(span: int, max_span_id: int) -> InvalidArgument:
    return InvalidArgument(f"span {span} out of range (max span id {max_span_id})")


@dataclass(frozen=True)
class GzipZinfo:
    """The checkpoints of a gzip layer (formats.md §7), one per span.

    Attributes:
        span_size: the span size the index was built with.
        checkpoints: one checkpoint per span, in stream order.
        blob_version: 1 (legacy: checkpoint 0 implied, not stored) or 2 (every checkpoint stored).
    """

    span_size: int
    checkpoints: tuple[Checkpoint, ...]
    blob_version: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "_outs", [cp.out_offset for cp in self.checkpoints])

    @classmethod
    def parse(cls, blob: bytes | bytearray | memoryview) -> GzipZinfo:
        """Parse a zinfo blob; v1 or v2 is decided by its length.

        Raises:
            FormatError: the length fits neither version, or a field is out of range (the message names it).
        """
        data = bytes(blob)
        if len(data) < HEADER_SIZE:
            raise FormatError(
                f"gzip zinfo blob too short: {len(data)} bytes, the header alone is {HEADER_SIZE}"
            )
        count, span_size = _HEADER.unpack_from(data, 0)
        if count < 1:
            raise FormatError(f"gzip zinfo blob: checkpoint count {count} must be at least 1")
        if span_size <= 0:
            raise FormatError(f"gzip zinfo blob: span size {span_size} must be positive")
        body = len(data) - HEADER_SIZE
        # The length bounds the count, so an absurd count is rejected before anything is allocated.
        if body == count * CHECKPOINT_SIZE:
            version, stored = 2, count
        elif body == (count - 1) * CHECKPOINT_SIZE:
            version, stored = 1, count - 1
        else:
            raise FormatError(
                f"gzip zinfo blob length {len(data)} fits neither version for {count} checkpoints "
                f"(v2 would be {HEADER_SIZE + count * CHECKPOINT_SIZE}, "
                f"v1 {HEADER_SIZE + (count - 1) * CHECKPOINT_SIZE})"
            )
        checkpoints: list[Checkpoint] = []
        if version == 1:
            checkpoints.append(Checkpoint(V1_FIRST_IN_OFFSET, 0, 0, _ZERO_WINDOW))
        pos = HEADER_SIZE
        for _ in range(stored):
            in_offset, out_offset, bits = _CP_HEAD.unpack_from(data, pos)
            start = pos + _CP_HEAD.size
            checkpoints.append(Checkpoint(in_offset, out_offset, bits, data[start : start + WINSIZE]))
            pos += CHECKPOINT_SIZE
        _check_checkpoints(checkpoints)
        return cls(span_size=span_size, checkpoints=tuple(checkpoints), blob_version=version)

    def serialize(self) -> bytes:
        """The blob, in this value's ``blob_version`` layout (v1 leaves checkpoint 0 out)."""
        if self.blob_version not in (1, 2):
            raise InvalidArgument(f"gzip zinfo blob version must be 1 or 2, got {self.blob_version}")
        stored = self.checkpoints if self.blob_version == 2 else self.checkpoints[1:]
        parts = [_HEADER.pack(len(self.checkpoints), self.span_size)]
        for cp in stored:
            if len(cp.window) != WINSIZE:
                raise InvalidArgument(f"checkpoint window must be {WINSIZE} bytes, got {len(cp.window)}")
            parts.append(_CP_HEAD.pack(cp.in_offset, cp.out_offset, cp.bits))
            parts.append(cp.window)
        return b"".join(parts)

    @property
    def max_span_id(self) -> int:
        """Number of spans minus one."""
        return len(self.checkpoints) - 1

    def span_of(self, uncompressed_offset: int) -> int:
        """The largest span whose checkpoint's ``out_offset`` is ``<= uncompressed_offset`` (0 if none)."""
        return max(bisect_right(self._outs, uncompressed_offset) - 1, 0)  # type: ignore[attr-defined]

    def compressed_range(self, span: int, blob_size: int) -> tuple[int, int]:
        """``[cs, ce)`` of span ``span`` in a blob of ``blob_size`` bytes (formats.md §6)."""
        if not 0 <= span <= self.max_span_id:
            raise _span_index_error(span, self.max_span_id)
        cp = self.checkpoints[span]
        start = cp.in_offset - (1 if cp.bits else 0)
        end = blob_size if span == self.max_span_id else self.checkpoints[span + 1].in_offset
        return start, end

    def uncompressed_range(self, span: int, uncompressed_size: int) -> tuple[int, int]:
        """``[us, ue)`` of span ``span``; the last span ends at ``uncompressed_size``."""
        if not 0 <= span <= self.max_span_id:
            raise _span_index_error(span, self.max_span_id)
        start = self.checkpoints[span].out_offset
        end = uncompressed_size if span == self.max_span_id else self.checkpoints[span + 1].out_offset
        return start, end


def _check_checkpoints(checkpoints: list[Checkpoint]) -> None:
    prev_in = prev_out = 0
    for i, cp in enumerate(checkpoints):
        if not 0 <= cp.bits <= 7:
            raise FormatError(f"gzip zinfo checkpoint {i}: bits {cp.bits} not in 0..7")
        if cp.in_offset < (1 if cp.bits else 0) or cp.out_offset < 0:
            raise FormatError(
                f"gzip zinfo checkpoint {i}: negative offset (in {cp.in_offset}, out {cp.out_offset})"
            )
        if cp.in_offset < prev_in or cp.out_offset < prev_out:
            raise FormatError(
                f"gzip zinfo checkpoint {i}: offsets go backwards "
                f"(in {prev_in} -> {cp.in_offset}, out {prev_out} -> {cp.out_offset})"
            )
        prev_in, prev_out = cp.in_offset, cp.out_offset


@dataclass(frozen=True)
class TarZinfo:
    """Fixed-size spans of an uncompressed layer (formats.md §9).

    Attributes:
        span_size: bytes per span (the last span may be shorter).
        size: the blob length.
    """

    span_size: int
    size: int

    def __post_init__(self) -> None:
        if not 0 < self.span_size <= _INT64_MAX or not 0 <= self.size <= _INT64_MAX:
            raise InvalidArgument(f"TarZinfo needs 0 < span_size and 0 <= size (int64), got {self}")

    def serialize(self) -> bytes:
        """The TarZinfo flatbuffer, byte-identical to the stock flatbuffers builder's output.

        The builder sequence is ``StartObject(3)``, int32 slot 0 = 2, int64 slot 1 = span_size, int64
        slot 2 = size, ``EndObject``, ``Finish``; scalars equal to the default 0 are left out.
        """
        return _tarzinfo_flatbuffer(TARZINFO_VERSION, self.span_size, self.size)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TarZinfo:
        """Read a TarZinfo flatbuffer with bounds checks on every offset.

        Raises:
            FormatError: not a valid TarZinfo table, an unsupported version, or a non-positive span size.
        """
        buf = bytes(data)
        version, span_size, size = _read_tarzinfo_fields(buf)
        if version != TARZINFO_VERSION:
            raise FormatError(f"TarZinfo: unsupported version {version} (expected {TARZINFO_VERSION})")
        if span_size <= 0:
            raise FormatError(f"TarZinfo: span size {span_size} must be positive")
        if size < 0:
            raise FormatError(f"TarZinfo: blob size {size} must not be negative")
        return cls(span_size=span_size, size=size)

    @property
    def max_span_id(self) -> int:
        """``size // span_size``, minus one when the size is a multiple of the span size."""
        res = self.size // self.span_size
        if self.size % self.span_size == 0:
            res -= 1
        return res

    def span_of(self, uncompressed_offset: int) -> int:
        """``uncompressed_offset // span_size``."""
        return uncompressed_offset // self.span_size

    def compressed_range(self, span: int, blob_size: int) -> tuple[int, int]:
        """``[i·S, (i+1)·S)``; the last span ends at ``blob_size``."""
        if not 0 <= span <= self.max_span_id:
            raise _span_index_error(span, self.max_span_id)
        end = blob_size if span == self.max_span_id else (span + 1) * self.span_size
        return span * self.span_size, end

    def uncompressed_range(self, span: int, uncompressed_size: int) -> tuple[int, int]:
        """``[i·S, (i+1)·S)``; the last span ends at ``uncompressed_size``."""
        return self.compressed_range(span, uncompressed_size)


def _tarzinfo_flatbuffer(version: int, span_size: int, size: int) -> bytes:
    """Lay out the three-scalar table the way the flatbuffers builder does: back to front, each scalar
    aligned to its size, a trimmed vtable, and ``Finish`` padding to the largest alignment seen."""
    out = bytearray()  # the buffer's tail; index 0 is the most recently prepended byte
    minalign = 1

    def prep(width: int, extra: int) -> None:
        nonlocal minalign
        minalign = max(minalign, width)
        out[0:0] = bytes(-(len(out) + extra) % width)

    def prepend(fmt: str, value: int) -> None:
        prep(struct.calcsize(fmt), 0)
        out[0:0] = struct.pack(fmt, value)

    object_end = len(out)
    slots = [0, 0, 0]
    for slot, (fmt, value) in enumerate((("<i", version), ("<q", span_size), ("<q", size))):
        if value != 0:
            prepend(fmt, value)
            slots[slot] = len(out)
    prepend("<i", 0)  # placeholder for the table's vtable offset
    object_offset = len(out)
    while slots and slots[-1] == 0:
        slots.pop()
    for pos in reversed(slots):
        prepend("<H", object_offset - pos if pos else 0)
    prepend("<H", object_offset - object_end)
    prepend("<H", (len(slots) + 2) * 2)
    struct.pack_into("<i", out, len(out) - object_offset, len(out) - object_offset)
    prep(minalign, 4)
    prepend("<I", len(out) - object_offset + 4)
    return bytes(out)


def _read_tarzinfo_fields(buf: bytes) -> tuple[int, int, int]:
    """Read (version, span_size, size) from a TarZinfo flatbuffer, checking every offset."""

    def need(pos: int, width: int, what: str) -> None:
        if pos < 0 or pos + width > len(buf):
            raise FormatError(
                f"TarZinfo flatbuffer: {what} at {pos} (+{width}) is outside the {len(buf)} bytes"
            )

    need(0, 4, "root offset")
    table = struct.unpack_from("<I", buf, 0)[0]
    need(table, 4, "table")
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    need(vtable, 4, "vtable header")
    vt_size, obj_size = struct.unpack_from("<HH", buf, vtable)
    if vt_size < 4 or vt_size % 2:
        raise FormatError(f"TarZinfo flatbuffer: vtable size {vt_size} is invalid")
    need(vtable, vt_size, "vtable")
    need(table, obj_size, "table body")

    def field(slot: int, fmt: str) -> int:
        entry = 4 + 2 * slot
        if entry + 2 > vt_size:
            return 0
        off = struct.unpack_from("<H", buf, vtable + entry)[0]
        if off == 0:
            return 0
        width = struct.calcsize(fmt)
        if off < 4 or off + width > obj_size:
            raise FormatError(f"TarZinfo flatbuffer: field {slot} at table offset {off} is outside the table")
        need(table + off, width, f"field {slot}")
        return struct.unpack_from(fmt, buf, table + off)[0]

    return field(0, "<i"), field(1, "<q"), field(2, "<q")


def index_tar(
    read: Callable[[int], bytes],
    span_size: int,
    sink: Callable[[memoryview], None] | None = None,
) -> IndexResult:
    """Index an uncompressed layer: span digests over fixed slices and the TarZinfo flatbuffer.

    Args:
        read: reads up to ``n`` bytes of the blob, in order; ``b""`` at the end.
        span_size: bytes per span.
        sink: receives every piece of the blob, in order (the view is valid only during the call).

    Raises:
        InvalidArgument: span size not positive.
    """
    if isinstance(span_size, bool) or not isinstance(span_size, int) or not 0 < span_size <= _INT64_MAX:
        raise InvalidArgument(f"span size must be a positive integer, got {span_size!r}")
    digests: list[str] = []
    hasher = hashlib.sha256()
    in_span = 0
    total = 0
    while True:
        data = read(1 << 20)
        if not data:
            break
        view = memoryview(data).cast("B")
        total += len(view)
        if sink is not None:
            sink(view)
        while view:
            take = min(span_size - in_span, len(view))
            hasher.update(view[:take])
            in_span += take
            view = view[take:]
            if in_span == span_size:
                digests.append("sha256:" + hasher.hexdigest())
                hasher = hashlib.sha256()
                in_span = 0
    if in_span:
        digests.append("sha256:" + hasher.hexdigest())
    return IndexResult(
        checkpoints_blob=TarZinfo(span_size=span_size, size=total).serialize(),
        span_digests=tuple(digests),
        compressed_size=total,
        uncompressed_size=total,
    )


_engine = _select.load("soci_fs._ext._zinfo", "soci_fs.zinfo_py")
IMPLEMENTATION = "pure" if _engine.__name__ == "soci_fs.zinfo_py" else "compiled"

index_gzip: Callable[..., IndexResult] = _engine.index_gzip
"""``index_gzip(read, span_size, sink=None) -> IndexResult``: one streaming pass over a gzip blob.

Calls ``read(n)`` until it returns ``b""``; records a checkpoint after the gzip header and then at each
deflate block boundary more than ``span_size`` uncompressed bytes after the previous one (formats.md §7);
hashes each span's compressed bytes; hands every piece of output to ``sink`` (valid only during the call).
Concatenated members continue with the totals carried over. Raises ``FormatError`` (naming the compressed
offset) on corrupt or truncated input and ``InvalidArgument`` for a non-positive span size.
"""

extract_span: Callable[[bytes | memoryview, Checkpoint, int, int], bytes] = _engine.extract_span
"""``extract_span(compressed, checkpoint, start, length) -> bytes``: inflate one span from its own bytes.

``compressed`` is the span's ``[cs, ce)``; the result is exactly ``length`` bytes starting ``start`` bytes
after ``checkpoint.out_offset``, or ``FormatError`` (formats.md §8, strict).
"""
