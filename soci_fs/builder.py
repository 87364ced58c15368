"""Builds the zTOC of one layer blob in a single streaming pass.

The checkpoint indexer (``soci_fs.zinfo``) inflates the blob and hands every piece of uncompressed output to
the tar scanner (``soci_fs.tarscan``), so the layer is read once and never held in memory. This module only
composes the two and fills in the ``Ztoc`` value; it does no file or network I/O of its own beyond the
``read`` callable it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, Literal

from soci_fs import zinfo
from soci_fs.errors import FormatError, InvalidArgument
from soci_fs.tarscan import TarScanner
from soci_fs.ztoc import VERSION as ZTOC_VERSION
from soci_fs.ztoc import CompressionInfo, Ztoc

GZIP = 1
UNCOMPRESSED = 2

DEFAULT_SPAN_SIZE = 1 << 22
DEFAULT_BUILD_TOOL = "AWS SOCI CLI v0.2"

Compression = Literal["gzip", "tar"]


def build_ztoc(
    read: Callable[[int], bytes],
    *,
    span_size: int = DEFAULT_SPAN_SIZE,
    compression: Compression = "gzip",
    build_tool: str = DEFAULT_BUILD_TOOL,
) -> Ztoc:
    """Build the zTOC of a layer blob read through ``read(n)`` (returns ``b""`` at the end).

    Args:
        read: reads up to ``n`` bytes of the layer blob, in order.
        span_size: uncompressed bytes between checkpoints (gzip) or the fixed span length (tar).
        compression: ``"gzip"`` for gzip layers, ``"tar"`` for uncompressed (and "unknown") layers.
        build_tool: the build tool identifier recorded in the zTOC.

    Raises:
        InvalidArgument: span size not positive, unknown compression.
        FormatError: corrupt gzip stream, invalid or truncated tar, unsupported tar entry.
    """
    if span_size <= 0:
        raise InvalidArgument(f"span size must be positive, got {span_size}")
    scanner = TarScanner()
    if compression == "gzip":
        result = zinfo.index_gzip(read, span_size, scanner.feed)
        algorithm = GZIP
    elif compression == "tar":
        result = zinfo.index_tar(read, span_size, scanner.feed)
        algorithm = UNCOMPRESSED
    else:
        raise InvalidArgument(f"unknown layer compression {compression!r} (expected gzip or tar)")
    scan = scanner.finish()
    if scan.archive_size > result.uncompressed_size:
        raise FormatError(
            f"tar archive size {scan.archive_size} exceeds the decompressed size {result.uncompressed_size}"
        )
    return Ztoc(
        version=ZTOC_VERSION,
        build_tool_identifier=build_tool,
        compressed_archive_size=result.compressed_size,
        uncompressed_archive_size=scan.archive_size,
        files=scan.entries,
        compression=CompressionInfo(
            algorithm=algorithm,
            max_span_id=len(result.span_digests) - 1,
            span_digests=result.span_digests,
            checkpoints=result.checkpoints_blob,
        ),
    )


def build_ztoc_from_file(
    f: BinaryIO,
    *,
    span_size: int = DEFAULT_SPAN_SIZE,
    compression: Compression = "gzip",
    build_tool: str = DEFAULT_BUILD_TOOL,
) -> Ztoc:
    """:func:`build_ztoc` over an open binary file."""
    return build_ztoc(f.read, span_size=span_size, compression=compression, build_tool=build_tool)
