"""Random access to a layer's uncompressed tar through its span index.

``LayerSpans`` owns the read path of one layer: which spans a byte range needs (formats.md §6), fetching a
span's compressed bytes through a caller-supplied ``fetch(start, end)``, verifying the span digest on every
fetch, and inflating (gzip, via ``soci_fs.zinfo.extract_span``) or slicing (uncompressed tar) the span. It
also checks the gzip header ``[0, cs_0)`` when a layer is opened.

It does no I/O except through ``fetch``, starts no threads and keeps no cache: the FUSE layer wraps it with
its own span cache, concurrency control and error mapping.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from soci_fs import zinfo
from soci_fs.errors import FormatError, InvalidArgument
from soci_fs.zinfo import GzipZinfo, TarZinfo

__all__ = ["GZIP", "UNCOMPRESSED", "Fetch", "LayerSpans", "check_gzip_header"]

GZIP = 1
UNCOMPRESSED = 2

Fetch = Callable[[int, int], bytes]
"""``fetch(start, end) -> bytes``: the compressed bytes ``[start, end)`` of the layer blob."""

_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16
_FRESERVED = 0xE0


def check_gzip_header(data: bytes) -> None:
    """Check that ``data`` is exactly one gzip member header (RFC 1952), optional fields included.

    Raises:
        FormatError: bad magic or method, reserved flags, a field cut short, a wrong header CRC, or bytes
            left over after the header.
    """
    if len(data) < 10:
        raise FormatError(f"gzip header cut short: {len(data)} bytes, at least 10 needed")
    if data[0] != 0x1F or data[1] != 0x8B:
        raise FormatError(f"not a gzip header: magic {data[:2].hex()} (expected 1f8b)")
    if data[2] != 8:
        raise FormatError(f"gzip header: compression method {data[2]} is not deflate (8)")
    flags = data[3]
    if flags & _FRESERVED:
        raise FormatError(f"gzip header: reserved flag bits set (flags {flags:#04x})")
    pos = 10
    if flags & _FEXTRA:
        if pos + 2 > len(data):
            raise FormatError("gzip header cut short in the extra field length")
        pos += 2 + struct.unpack_from("<H", data, pos)[0]
        if pos > len(data):
            raise FormatError("gzip header cut short in the extra field")
    for flag, what in ((_FNAME, "file name"), (_FCOMMENT, "comment")):
        if flags & flag:
            end = data.find(b"\0", pos)
            if end < 0:
                raise FormatError(f"gzip header cut short in the {what}")
            pos = end + 1
    if flags & _FHCRC:
        if pos + 2 > len(data):
            raise FormatError("gzip header cut short in the header CRC")
        want = struct.unpack_from("<H", data, pos)[0]
        got = zlib.crc32(data[:pos]) & 0xFFFF
        if want != got:
            raise FormatError(f"gzip header CRC mismatch: stored {want:#06x}, computed {got:#06x}")
        pos += 2
    if pos != len(data):
        raise FormatError(f"gzip header is {pos} bytes but the first span starts at offset {len(data)}")


MAX_TAR_PADDING = 1 << 20  # how far past the archive size the last checkpoint may lie (record padding)


class LayerSpans:
    """The spans of one layer blob and the reads over its uncompressed tar.

    Args:
        fetch: returns the compressed bytes ``[start, end)`` of the blob.
        index: the layer's checkpoints (``GzipZinfo``) or fixed spans (``TarZinfo``).
        span_digests: ``"sha256:<hex>"`` of each span's compressed bytes, in span order.
        compressed_size: the blob length (``compressed_archive_size``).
        uncompressed_size: ``uncompressed_archive_size``; the last span ends there.

    Raises:
        FormatError: the digests, sizes and checkpoints do not describe a consistent set of spans.
    """

    def __init__(
        self,
        fetch: Fetch,
        index: GzipZinfo | TarZinfo,
        span_digests: Sequence[str],
        compressed_size: int,
        uncompressed_size: int,
    ) -> None:
        self._fetch = fetch
        self.index = index
        self.span_digests = tuple(span_digests)
        self.compressed_size = compressed_size
        self.uncompressed_size = uncompressed_size
        self.is_gzip = isinstance(index, GzipZinfo)
        n = index.max_span_id + 1
        if len(self.span_digests) != n:
            raise FormatError(f"layer has {n} spans but {len(self.span_digests)} span digests")
        if compressed_size < 0 or uncompressed_size < 0:
            raise FormatError(
                f"layer sizes must not be negative "
                f"(compressed {compressed_size}, uncompressed {uncompressed_size})"
            )
        self._c_ranges: list[tuple[int, int]] = []
        self._u_ranges: list[tuple[int, int]] = []
        for i in range(n):
            cs, ce = index.compressed_range(i, compressed_size)
            us, ue = index.uncompressed_range(i, uncompressed_size)
            if (
                self.is_gzip
                and i == n - 1
                and uncompressed_size < us <= uncompressed_size + MAX_TAR_PADDING
                and (i == 0 or self._u_ranges[i - 1][0] <= uncompressed_size)
            ):
                # the last checkpoint lies in the tar's trailing padding (tarfile and GNU tar pad to
                # 10240-byte records; the archive size ends at the end-of-archive marker): an empty span
                ue = us
            if not 0 <= cs <= ce <= compressed_size:
                raise FormatError(
                    f"span {i}: compressed range [{cs}, {ce}) does not fit the {compressed_size}-byte blob"
                )
            if not 0 <= us <= ue:
                raise FormatError(f"span {i}: uncompressed range [{us}, {ue}) is empty or reversed")
            if not self.is_gzip and ue - us > ce - cs:
                raise FormatError(
                    f"span {i}: uncompressed range [{us}, {ue}) is longer than its bytes [{cs}, {ce})"
                )
            self._c_ranges.append((cs, ce))
            self._u_ranges.append((us, ue))

    @classmethod
    def from_ztoc(cls, z: Any, fetch: Fetch, *, check_header: bool = True) -> LayerSpans:
        """Open a layer from its zTOC (duck-typed: ``z.compression.algorithm``, ``.checkpoints``,
        ``.span_digests``, optionally ``.max_span_id``, ``z.compressed_archive_size``,
        ``z.uncompressed_archive_size``).

        For gzip layers the header ``[0, cs_0)`` is fetched and checked unless ``check_header`` is false.

        Raises:
            FormatError: unknown compression algorithm, bad checkpoints, inconsistent sizes, bad gzip header.
        """
        comp = z.compression
        algorithm = comp.algorithm
        index: GzipZinfo | TarZinfo
        if algorithm == GZIP:
            index = GzipZinfo.parse(comp.checkpoints)
        elif algorithm == UNCOMPRESSED:
            index = TarZinfo.parse(comp.checkpoints)
        else:
            raise FormatError(f"unexpected compression algorithm: compressionalgorithm({algorithm})")
        declared = getattr(comp, "max_span_id", None)
        if declared is not None and declared != index.max_span_id:
            raise FormatError(
                f"zTOC max_span_id {declared} does not match its checkpoints "
                f"(max span id {index.max_span_id})"
            )
        layer = cls(fetch, index, comp.span_digests, z.compressed_archive_size, z.uncompressed_archive_size)
        if check_header:
            layer.check_header()
        return layer

    @property
    def max_span_id(self) -> int:
        """Number of spans minus one."""
        return len(self.span_digests) - 1

    def check_header(self) -> None:
        """Fetch the bytes before span 0 and check that they are a gzip header (no-op for tar layers).

        Raises:
            FormatError: the bytes are not exactly one gzip header.
        """
        if not self.is_gzip or not self._c_ranges:
            return
        end = self._c_ranges[0][0]
        try:
            check_gzip_header(self._fetch(0, end))
        except FormatError as exc:
            raise FormatError(f"layer header [0, {end}): {exc}") from exc

    def span_of(self, offset: int) -> int:
        """The span holding uncompressed ``offset`` (clamped to the last span)."""
        return min(self.index.span_of(offset), self.max_span_id)

    def span_range(self, offset: int, size: int) -> tuple[int, int]:
        """First and last span of a file at ``offset`` of ``size`` bytes, with upstream's rule: the end is
        exclusive but still looked up, so a file ending exactly on a span boundary pulls in the next span."""
        return self.span_of(offset), self.span_of(offset + size)

    def compressed_range(self, span: int) -> tuple[int, int]:
        """``[cs, ce)`` of ``span`` in the blob."""
        self._check_span(span)
        return self._c_ranges[span]

    def uncompressed_range(self, span: int) -> tuple[int, int]:
        """``[us, ue)`` of ``span`` in the uncompressed tar."""
        self._check_span(span)
        return self._u_ranges[span]

    def fetch_span(self, span: int) -> bytes:
        """Fetch the compressed bytes of ``span`` and verify its digest.

        Raises:
            FormatError: the fetch returned the wrong length or the digest does not match.
        """
        cs, ce = self.compressed_range(span)
        data = self._fetch(cs, ce)
        if len(data) != ce - cs:
            raise FormatError(
                f"span {span}: fetch of [{cs}, {ce}) returned {len(data)} bytes, expected {ce - cs}"
            )
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        want = self.span_digests[span]
        if got != want:
            raise FormatError(f"span {span}: digest mismatch: expected {want}, got {got}")
        return data

    def decode_span(self, span: int, data: bytes, start: int = 0, length: int | None = None) -> bytes:
        """Uncompressed bytes ``[us + start, us + start + length)`` of ``span`` from its fetched bytes.

        ``length`` defaults to the rest of the span.

        Raises:
            InvalidArgument: the requested range is outside the span.
            FormatError: the bytes do not inflate to the span's data.
        """
        us, ue = self.uncompressed_range(span)
        if length is None:
            length = ue - us - start
        if start < 0 or length < 0 or start + length > ue - us:
            raise InvalidArgument(f"span {span}: [{start}, {start + length}) is outside its {ue - us} bytes")
        if not self.is_gzip:
            return bytes(data[start : start + length])
        return zinfo.extract_span(data, self.index.checkpoints[span], start, length)  # type: ignore[union-attr]

    def read_span(self, span: int) -> bytes:
        """The whole uncompressed span: fetch, verify, extract."""
        return self.decode_span(span, self.fetch_span(span))

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` uncompressed bytes at ``offset`` (may cross spans).

        Raises:
            InvalidArgument: the range is outside ``[0, uncompressed_size]``.
            FormatError: a span fails its digest or does not inflate.
        """
        if offset < 0 or length < 0 or offset + length > self.uncompressed_size:
            raise InvalidArgument(
                f"read [{offset}, {offset + length}) is outside the layer's {self.uncompressed_size} bytes"
            )
        if length == 0:
            return b""
        end = offset + length
        parts = []
        for span in range(self.span_of(offset), self.span_of(end - 1) + 1):
            us, ue = self._u_ranges[span]
            lo, hi = max(offset, us), min(end, ue)
            if hi > lo:
                parts.append(self.decode_span(span, self.fetch_span(span), lo - us, hi - lo))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _check_span(self, span: int) -> None:
        if not 0 <= span <= self.max_span_id:
            raise InvalidArgument(f"span {span} out of range (max span id {self.max_span_id})")
