"""The ``soci`` command line (placeholder until the CLI lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("soci: not built yet", file=sys.stderr)
    return 1
