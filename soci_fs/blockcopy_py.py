"""Pure-Python twin of ``ext/_blockcopy.pyx``: gather byte ranges of cached span buffers into one reply.

Owns one operation, :func:`gather`: copy a sequence of contiguous buffers one after another into a writable
buffer. The block cache uses it to build a read reply that spans several spans. It raises exactly what the
compiled module raises (``TypeError`` for a non-buffer, ``BufferError`` for a non-contiguous piece or a
read-only destination, ``ValueError`` when the pieces do not fit), so callers never see which one ran.

Will not: allocate the destination, interpret the bytes, or touch files. Import it through
``soci_fs.cache`` (which picks the compiled module unless ``SOCI_PUREPYTHON=1``), not directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["gather"]


def _bytes_view(obj: Any, *, writable: bool) -> memoryview:
    view = memoryview(obj)
    if not view.c_contiguous:
        raise BufferError("gather needs C-contiguous buffers")
    if writable and view.readonly:
        raise BufferError("gather needs a writable destination")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def gather(pieces: Sequence[Any], out: Any, offset: int = 0) -> int:
    """Copy ``pieces`` back to back into ``out`` starting at ``offset``; return the offset after the last.

    Raises:
        TypeError: a piece or ``out`` does not support the buffer protocol.
        BufferError: a piece is not contiguous, or ``out`` is read-only or not contiguous.
        ValueError: ``offset`` is negative or the pieces do not fit in ``out``.
    """
    dest = _bytes_view(out, writable=True)
    views = [_bytes_view(p, writable=False) for p in pieces]
    total = sum(v.nbytes for v in views)
    if offset < 0 or offset + total > dest.nbytes:
        raise ValueError(f"gather: {total} bytes at offset {offset} do not fit a {dest.nbytes}-byte buffer")
    pos = offset
    for v in views:
        n = v.nbytes
        dest[pos : pos + n] = v
        pos += n
    return pos
