"""Type stub of the compiled gather (``ext/_blockcopy.pyx``); the twin is ``soci_fs.blockcopy_py``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

def gather(pieces: Sequence[Any], out: Any, offset: int = 0) -> int: ...
