"""Chooses between a compiled extension (``soci_fs._ext``) and its pure-Python twin.

``SOCI_PUREPYTHON=1`` forces the twin everywhere; otherwise the compiled module is used when importable.
Every selector in the package goes through :func:`load`, so the choice is made in one place.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def pure_python_forced() -> bool:
    """True when the environment asks for the pure-Python twins."""
    return os.environ.get("SOCI_PUREPYTHON", "") not in ("", "0")


def load(compiled: str, twin: str) -> ModuleType:
    """Import ``compiled`` (e.g. ``soci_fs._ext._zinfo``) unless forced or missing, else ``twin``."""
    if not pure_python_forced():
        try:
            return importlib.import_module(compiled)
        except ImportError:
            pass
    return importlib.import_module(twin)
