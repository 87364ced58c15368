"""The ``soci-snapshotter-grpc`` entry point.

The daemon itself is the snapshotter-daemon work item; until it lands this entry point says so and exits
non-zero rather than pretending to serve.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("soci-snapshotter-grpc: the daemon is not part of this build yet", file=sys.stderr)
    return 1
