"""Type stub of the compiled tar scanner (``ext/_tarscan.pyx``); the twin is ``soci_fs.tarscan_py``."""

from __future__ import annotations

from soci_fs.tarscan_py import TarScanResult

__all__ = ["TarScanResult", "TarScanner"]

class TarScanner:
    def __init__(self) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    def finish(self) -> TarScanResult: ...

def format_mod_time(seconds: int, nanoseconds: int = 0) -> str: ...
