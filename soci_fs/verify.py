"""Tar header verification on the read path (spec filesystem.md §5 step 1, formats.md §5.2).

Before the first read through an open file handle, the bytes ``[header offset, data offset)`` of the file's
tar entry are read through the layer's ``LayerData``, parsed as one tar entry by the tar scanner (Go
``archive/tar`` semantics, PAX and GNU extensions included), and compared with the zTOC's
:class:`~soci_fs.ztoc.FileMetadata`: size, mtime (the same instant), linkname, mode (with the entry type),
uid, gid, devmajor, devminor, the ``SCHILY.xattr.*`` records and the raw name. The header bytes must make
exactly one entry whose data starts right after them ("the parser consumes exactly that many bytes").

Owns:

* :func:`header_offsets` -- the derived header offset of every entry: entries sorted by data offset, the
  first header at 0, each next one at the previous entry's ``offset + size`` rounded up to 512;
* :func:`check_header` -- one entry's header bytes against its metadata (pure);
* :class:`LayerVerifier` -- per layer: the offsets (computed once, on the first verification) and
  ``await verify(data, index)``;
* :class:`VerificationError` -- a ``FormatError`` (the FUSE side answers EIO) naming the field that differs.
  Messages carry metadata values of numeric fields only, never file content, names or xattr values.

How the scanner is made to "consume exactly that many bytes": it is fed the header bytes and then the data
region it will skip (zeros, ``size`` rounded up to 512, fed from one shared zero buffer without copying), so
that ``finish`` accepts the stream; the entry's ``uncompressed_offset`` (the stream position right after its
headers) must then equal the number of header bytes, and it must be the only entry.

Will not: edit or subclass the tar scanner, decide when to verify (operations.py does it once per handle,
unless ``disable_verification``), or read file data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from soci_fs.errors import FormatError
from soci_fs.tarscan import TarScanner
from soci_fs.ztoc import parse_mod_time

if TYPE_CHECKING:
    from soci_fs.ztoc import FileMetadata

__all__ = ["LayerVerifier", "VerificationError", "check_header", "header_offsets"]

BLOCK = 512
_ZEROS = memoryview(bytes(1 << 20))


class VerificationError(FormatError):
    """The tar header of an entry does not match its zTOC metadata.

    Attributes:
        field: the first field that differs (``size``, ``mtime``, ``linkname``, ``type``, ``mode``, ``uid``,
            ``gid``, ``devmajor``, ``devminor``, ``xattrs``, ``name``) or ``header`` when the bytes do not
            parse as exactly one entry.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def header_offsets(entries: Sequence[FileMetadata]) -> list[int]:
    """The derived tar header offset of every entry, by entry index (formats.md §5.2).

    Raises:
        FormatError: a derived header offset lies beyond its entry's data offset ("invalid toc entry").
    """
    out = [0] * len(entries)
    pos = 0
    for i in sorted(range(len(entries)), key=lambda k: entries[k].uncompressed_offset):
        e = entries[i]
        if pos > e.uncompressed_offset:
            raise FormatError(
                f"invalid toc entry {i}: derived header offset {pos} is beyond its data offset "
                f"{e.uncompressed_offset}"
            )
        out[i] = pos
        end = e.uncompressed_offset + e.uncompressed_size
        pos = end + (-end % BLOCK)
    return out


def _parse_one(raw: bytes | memoryview, size: int) -> FileMetadata:
    if len(raw) < BLOCK or len(raw) % BLOCK:
        raise VerificationError("header", f"{len(raw)} header bytes are not whole 512-byte tar blocks")
    scanner = TarScanner()
    scanner.feed(raw)
    todo = size + (-size % BLOCK) if size > 0 else 0
    while todo > 0:
        n = min(todo, len(_ZEROS))
        scanner.feed(_ZEROS[:n])
        todo -= n
    try:
        result = scanner.finish()
    except FormatError as exc:
        raise VerificationError(
            "size", f"the tar header describes more data than the zTOC's {size} bytes ({exc})"
        ) from None
    if len(result.entries) != 1:
        raise VerificationError("header", f"the header bytes make {len(result.entries)} tar entries, not 1")
    entry = result.entries[0]
    if entry.uncompressed_offset != len(raw):
        raise VerificationError(
            "header",
            f"the tar headers take {entry.uncompressed_offset} bytes, the zTOC says {len(raw)}",
        )
    return entry


def _same_instant(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return parse_mod_time(a) == parse_mod_time(b)
    except FormatError:
        return False


def check_header(raw: bytes | memoryview, md: FileMetadata) -> None:
    """Check the header bytes ``raw`` of one entry against its zTOC metadata ``md``.

    Raises:
        VerificationError: the bytes are not exactly one entry, or a field differs (the first one found,
            in the order of the spec).
    """
    try:
        got = _parse_one(raw, md.uncompressed_size)
    except VerificationError:
        raise
    except FormatError as exc:
        raise VerificationError("header", f"the header bytes do not parse: {exc}") from None

    def differ(field: str, ours: Any = None, theirs: Any = None) -> VerificationError:
        detail = f": {ours!r} in the tar header, {theirs!r} in the zTOC" if ours is not None else ""
        return VerificationError(field, f"tar header field {field} differs from the zTOC{detail}")

    if got.uncompressed_size != md.uncompressed_size:
        raise differ("size", got.uncompressed_size, md.uncompressed_size)
    if not _same_instant(got.mod_time, md.mod_time):
        raise differ("mtime", got.mod_time, md.mod_time)
    if got.linkname != md.linkname:
        raise differ("linkname")
    if got.type != md.type:
        raise differ("type", got.type, md.type)
    if got.mode != md.mode:
        raise differ("mode", oct(got.mode), oct(md.mode))
    if got.uid != md.uid:
        raise differ("uid", got.uid, md.uid)
    if got.gid != md.gid:
        raise differ("gid", got.gid, md.gid)
    if got.devmajor != md.devmajor:
        raise differ("devmajor", got.devmajor, md.devmajor)
    if got.devminor != md.devminor:
        raise differ("devminor", got.devminor, md.devminor)
    if got.xattrs != md.xattrs:
        raise differ("xattrs")
    if got.name != md.name:
        raise differ("name")


class LayerVerifier:
    """Header verification for the entries of one layer (the header offsets are derived once).

    Args:
        entries: the layer's zTOC entries, in zTOC order (node entry indexes point into it).
    """

    def __init__(self, entries: Sequence[FileMetadata]) -> None:
        self.entries = entries
        self._offsets: list[int] | None = None

    def header_range(self, index: int) -> tuple[int, int]:
        """``[header offset, data offset)`` of entry ``index``.

        Raises:
            FormatError: the zTOC's offsets are inconsistent (see :func:`header_offsets`).
        """
        if self._offsets is None:
            self._offsets = header_offsets(self.entries)
        return self._offsets[index], self.entries[index].uncompressed_offset

    async def verify(self, data: Any, index: int) -> None:
        """Read entry ``index``'s header through ``data`` (a ``LayerData``) and check it.

        Raises:
            VerificationError: see :func:`check_header`.
            SociError: the header bytes cannot be read (from ``data``).
        """
        start, end = self.header_range(index)
        raw = await data.read(start, end - start)
        if len(raw) != end - start:
            raise VerificationError("header", f"read {len(raw)} of the {end - start} header bytes")
        check_header(raw, self.entries[index])
