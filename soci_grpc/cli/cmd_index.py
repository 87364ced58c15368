"""``soci index list|ls``, ``soci index info``, ``soci index rm|remove`` (cli-and-config.md §2).

Read-only subcommands work on the local store or, with ``--oci-layout PATH``, directly on a layout. Image
references (``--ref``) need containerd upstream; here they resolve as ref names inside ``--oci-layout`` or
as image manifest digests.

Will not: delete zTOC entries or blobs (``rebuild-db`` drops entries whose blobs are gone, as upstream).
"""

from __future__ import annotations

import argparse
import sys

from soci_fs import gojson
from soci_fs.errors import InvalidArgument, NotFound
from soci_fs.oci import PlatformMatcher, parse_platform
from soci_fs.store import TYPE_INDEX
from soci_grpc.cli import cmd_base

HEADER = ["DIGEST", "SIZE", "IMAGE REF", "PLATFORM", "MEDIA TYPE", "MANIFEST VERSION", "CREATED"]


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "index", parents=parents, help="manage SOCI indexes", description="Manage SOCI indexes."
    )
    isub = p.add_subparsers(dest="index_command", metavar="COMMAND")
    p.set_defaults(func=lambda args: _usage(p))

    ls = isub.add_parser(
        "list",
        aliases=["ls"],
        parents=parents,
        help="list SOCI indexes",
        description="List SOCI indexes, newest first.",
    )
    ls.add_argument(
        "--ref", help="only indexes of this image (ref name in --oci-layout, or a manifest digest)"
    )
    ls.add_argument("--quiet", "-q", action="store_true", help="only print digests")
    cmd_base.add_platform_flags(ls, all_platforms=False)
    cmd_base.add_layout_flag(ls)
    ls.set_defaults(func=run_list)

    info = isub.add_parser(
        "info",
        parents=parents,
        help="display an index",
        description="Print a SOCI index manifest, indented.",
    )
    info.add_argument("digest", metavar="DIGEST")
    cmd_base.add_layout_flag(info)
    info.set_defaults(func=run_info)

    rm = isub.add_parser(
        "remove",
        aliases=["rm"],
        parents=parents,
        help="remove indexes",
        description="Remove SOCI indexes from the artifacts DB and their manifests from the local content "
        "store (zTOCs are left; soci rebuild-db drops entries whose blobs are gone).",
    )
    rm.add_argument("digests", nargs="*", metavar="DIGEST")
    rm.add_argument("--ref", help="remove the indexes of this image (a manifest digest without containerd)")
    rm.set_defaults(func=run_remove)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def run_list(args: argparse.Namespace) -> int:
    platforms = [parse_platform(s) for s in cmd_base.split_list(args.platform)]
    with cmd_base.open_source(args) as src:
        rows = src.indexes()
        if args.ref:
            wanted = set(src.resolve_ref(args.ref))
            rows = [r for r in rows if r.image_digest in wanted]
        if platforms:
            matchers = [PlatformMatcher(p, strict=True) for p in platforms]
            keep = []
            for r in rows:
                if not r.platform:
                    continue
                try:
                    rp = parse_platform(r.platform)
                except InvalidArgument:
                    continue
                if any(m.match(rp) for m in matchers):
                    keep.append(r)
            rows = keep
    if args.quiet:
        cmd_base.write_stdout("".join(f"{r.digest}\n" for r in rows))
        return 0
    table = [HEADER]
    for r in rows:
        created = cmd_base.created_text(r.created)
        for ref in r.image_refs or ("",):
            table.append([r.digest, str(r.size), ref, r.platform, r.media_type, r.version, created])
    cmd_base.write_stdout(cmd_base.tabwriter(table))
    return 0


def run_info(args: argparse.Namespace) -> int:
    with cmd_base.open_source(args) as src:
        kind = src.kind(args.digest)
        if kind == "ztoc":
            raise InvalidArgument(
                'the provided digest is of ztoc not SOCI index. Use "soci ztoc info" command to get detailed '
                "info of ztoc"
            )
        if kind != "index":
            raise NotFound(f"the index of the digest {args.digest} doesn't exist")
        data = src.blob(args.digest)
    sys.stdout.buffer.write(gojson.indent(data) + b"\n")
    sys.stdout.flush()
    return 0


def run_remove(args: argparse.Namespace) -> int:
    if args.digests and args.ref:
        raise InvalidArgument("please provide either index digests or image ref, but not both")
    if not args.digests and not args.ref:
        raise InvalidArgument("please provide either index digests or image ref")
    store = cmd_base.open_store(args)
    try:
        src = cmd_base.StoreSource(store)
        if args.ref:
            wanted = set(src.resolve_ref(args.ref))
            digests = [e.digest for e in store.db.entries(TYPE_INDEX) if e.image_digest in wanted]
        else:
            digests = list(args.digests)
        for d in digests:
            e = store.db.get(d)
            if e is None:
                raise NotFound(f"the index of the digest {d} doesn't exist")
            if e.type != TYPE_INDEX:
                raise InvalidArgument(f"the digest {d} does not correspond to an index")
            store.db.remove(d)
            store.content.delete(d)
    finally:
        store.close()
    return 0
