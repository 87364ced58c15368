"""``soci rebuild-db``: make the artifacts DB agree with the local content store again.

Entries whose blob is gone are dropped; v1 indexes with a subject found among the blobs are added with their
zTOCs (the platform is read from the subject manifest's config when both are in the store). See
:func:`soci_fs.store.rebuild_db`.

Will not: read containerd's content store (not supported yet).
"""

from __future__ import annotations

import argparse

from soci_fs.store import rebuild_db
from soci_grpc.cli import cmd_base


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rebuild-db",
        parents=parents,
        help="rebuild the artifacts database",
        description="Drop artifacts-DB entries whose blobs are gone and add the v1 SOCI indexes (and their "
        "zTOCs) found in the content store.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = cmd_base.open_store(args)
    try:
        rebuild_db(store)
    finally:
        store.close()
    return 0
