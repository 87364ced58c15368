"""Type stub of the compiled checkpoint engine (``ext/_zinfo.pyx``); the twin is ``soci_fs.zinfo_py``."""

from __future__ import annotations

from collections.abc import Callable

from soci_fs.zinfo import Checkpoint, IndexResult

IN_CHUNK: int
GZIP_AUTO_WBITS: int
RAW_WBITS: int

def index_gzip(
    read: Callable[[int], bytes],
    span_size: int,
    sink: Callable[[memoryview], None] | None = None,
) -> IndexResult: ...
def extract_span(
    compressed: bytes | memoryview, checkpoint: Checkpoint, start: int, length: int
) -> bytes: ...
