"""Type stub of the compiled zTOC writer (``ext/_ztocwrite.pyx``).

Its twin is ``soci_fs.ztoc.serialize_python``.
"""

from __future__ import annotations

from soci_fs.ztoc import Ztoc

__all__ = ["serialize_or_none"]

def serialize_or_none(z: Ztoc) -> bytes | None: ...
