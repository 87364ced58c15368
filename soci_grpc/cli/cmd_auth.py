"""`soci auth`: placeholder until the registry/credentials work lands (it replaces this module)."""

from __future__ import annotations

import argparse

from soci_fs.errors import FailedPrecondition


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("auth", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise FailedPrecondition("'soci auth' is not built yet")
