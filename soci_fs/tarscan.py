"""Incremental tar scanner: uncompressed tar bytes in, zTOC :class:`~soci_fs.ztoc.FileMetadata` out.

Reads tar headers with the semantics of Go's ``archive/tar`` reader, which upstream's zTOC builder uses
(formats spec 5.2 and 6): V7, USTAR, STAR, GNU long names and links, PAX records (every record kept in
``pax``), base-256 numbers, the legacy NUL typeflag, header checksums and the end-of-archive rules. Data
regions are skipped by arithmetic, so memory stays bounded whatever the layer size.

This module only chooses the implementation: the compiled ``soci_fs._ext._tarscan`` (``ext/_tarscan.pyx``)
or its pure-Python twin :mod:`soci_fs.tarscan_py` (``SOCI_PUREPYTHON=1`` forces the twin). Both expose
:class:`TarScanner` (``feed(data)`` in any chunking, ``finish() -> TarScanResult``), return the same
:class:`TarScanResult` type with equal contents and raise :class:`~soci_fs.errors.FormatError` with the
same messages. ``IMPLEMENTATION`` says which one was loaded.

Will not: decompress, read file contents, accept entry types the zTOC cannot describe ("unsupported input
tar entry"), or resolve links.
"""

from __future__ import annotations

from soci_fs import _select
from soci_fs.tarscan_py import TarScanResult

__all__ = ["IMPLEMENTATION", "TarScanResult", "TarScanner"]

_engine = _select.load("soci_fs._ext._tarscan", "soci_fs.tarscan_py")
IMPLEMENTATION = "pure" if _engine.__name__ == "soci_fs.tarscan_py" else "compiled"
TarScanner = _engine.TarScanner
