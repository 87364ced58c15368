"""``soci ztoc list|ls``, ``soci ztoc info``, ``soci ztoc get-file`` (cli-and-config.md §2).

``get-file`` reads only the spans that hold the file (through :mod:`soci_fs.spanread`, each span verified
against its digest) from the layer blob in the local content store or in ``--oci-layout``.

Will not: write to the store.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys

from soci_fs import gojson, ztoc
from soci_fs.errors import FailedPrecondition, FormatError, InvalidArgument, NotFound
from soci_fs.gojson import Struct
from soci_fs.index import parse_index
from soci_fs.spanread import LayerSpans
from soci_grpc.cli import cmd_base

HEADER = ["DIGEST", "SIZE", "LAYER DIGEST"]


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ztoc", parents=parents, help="inspect zTOCs", description="Inspect zTOCs.")
    zsub = p.add_subparsers(dest="ztoc_command", metavar="COMMAND")
    p.set_defaults(func=lambda args: _usage(p))

    ls = zsub.add_parser(
        "list", aliases=["ls"], parents=parents, help="list zTOCs", description="List zTOCs."
    )
    ls.add_argument("--ztoc-digest", help="only this zTOC")
    ls.add_argument(
        "--image-ref", help="only zTOCs of this image (ref name in --oci-layout, or a manifest digest)"
    )
    ls.add_argument("--quiet", "-q", action="store_true", help="only print digests")
    cmd_base.add_layout_flag(ls)
    ls.set_defaults(func=run_list)

    info = zsub.add_parser(
        "info",
        parents=parents,
        help="display a zTOC",
        description="Print what a zTOC holds as JSON: version, build tool, sizes, spans and files.",
    )
    info.add_argument("digest", metavar="DIGEST")
    cmd_base.add_layout_flag(info)
    info.set_defaults(func=run_info)

    gf = zsub.add_parser(
        "get-file",
        parents=parents,
        help="retrieve a file from a layer through its zTOC",
        description="Extract one file of a layer by reading only the spans that hold it. Prints the file "
        "followed by a newline, or writes it to --output (created with mode 0600; upstream uses 0000).",
    )
    gf.add_argument("digest", metavar="ZTOC_DIGEST")
    gf.add_argument("path", metavar="PATH", help="the file's name exactly as in the layer's tar")
    gf.add_argument("--output", "-o", metavar="FILE", help="write the file here (mode 0600)")
    cmd_base.add_layout_flag(gf)
    gf.set_defaults(func=run_get_file)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def run_list(args: argparse.Namespace) -> int:
    with cmd_base.open_source(args) as src:
        if args.image_ref:
            wanted = set(src.resolve_ref(args.image_ref))
            known = {z.digest: z for z in src.ztocs()}
            rows = []
            seen: set[str] = set()
            for r in src.indexes():
                if r.image_digest not in wanted:
                    continue
                try:
                    idx = parse_index(src.blob(r.digest), f"SOCI index {r.digest}")
                except NotFound:
                    continue
                for z in idx.ztocs:
                    d = z.descriptor.digest
                    if d in seen:
                        continue
                    if d not in known:
                        raise FailedPrecondition(
                            f"ztoc {d} of index {r.digest} is not in the artifacts DB; run soci rebuild-db"
                        )
                    seen.add(d)
                    rows.append(known[d])
            if args.ztoc_digest:
                rows = [z for z in rows if z.digest == args.ztoc_digest]
                if not rows:
                    raise NotFound(
                        "the specified ztoc doesn't exist or is not associated with the specified image"
                    )
        else:
            rows = src.ztocs()
            if args.ztoc_digest:
                rows = [z for z in rows if z.digest == args.ztoc_digest]
    if args.quiet:
        cmd_base.write_stdout("".join(f"{z.digest}\n" for z in rows))
        return 0
    table = [HEADER] + [[z.digest, str(z.size), z.layer_digest] for z in rows]
    cmd_base.write_stdout(cmd_base.tabwriter(table))
    return 0


def _load_ztoc(src: cmd_base.Source, digest: str) -> tuple[ztoc.Ztoc, int]:
    kind = src.kind(digest)
    if kind == "index":
        raise InvalidArgument(
            "the provided digest belongs to a SOCI index. Use `soci index info` to get the detailed "
            "information about it"
        )
    if kind != "ztoc":
        raise NotFound(f"ztoc {digest} does not exist")
    data = src.blob(digest)
    return ztoc.parse(data), len(data)


def _no_fetch(start: int, end: int) -> bytes:
    raise AssertionError("ztoc info reads no layer data")


def run_info(args: argparse.Namespace) -> int:
    with cmd_base.open_source(args) as src:
        z, size = _load_ztoc(src, args.digest)
    spans = LayerSpans.from_ztoc(z, _no_fetch, check_header=False)
    files = []
    multi = 0
    for f in z.files:
        start, end = spans.span_range(f.uncompressed_offset, f.uncompressed_size)
        if start != end:
            multi += 1
        files.append(
            Struct(
                ("filename", f.name),
                ("offset", f.uncompressed_offset),
                ("size", f.uncompressed_size),
                ("type", f.type),
                ("start_span", start),
                ("end_span", end),
            )
        )
    info = Struct(
        ("version", z.version),
        ("build_tool", z.build_tool_identifier),
        ("size", size),
        ("span_size", spans.index.span_size),
        ("num_spans", spans.max_span_id + 1),
        ("num_files", len(z.files)),
        ("num_multi_span_files", multi),
        ("files", files or None),
    )
    sys.stdout.buffer.write(gojson.dumps_indent(info) + b"\n")
    sys.stdout.flush()
    return 0


def find_entry(z: ztoc.Ztoc, path: str) -> ztoc.FileMetadata:
    """The entry named exactly ``path``; hardlinks and symlinks are followed by name (40 hops at most; a
    relative symlink target is taken relative to the link's directory)."""
    by_name = {f.name: f for f in z.files}
    name = path
    for _ in range(40):
        f = by_name.get(name)
        if f is None:
            raise NotFound(f"file {name!r} not found in the zTOC")
        if f.type == "hardlink":
            name = f.linkname
        elif f.type == "symlink":
            target = f.linkname
            if target.startswith("/"):
                name = target.lstrip("/")
            else:
                name = posixpath.normpath(posixpath.join(posixpath.dirname(f.name), target))
            if name not in by_name and "./" + name in by_name:
                name = "./" + name
        else:
            return f  # other types have no data (size 0): like upstream, an empty file comes out
    raise InvalidArgument(f"{path!r}: too many levels of links")


def run_get_file(args: argparse.Namespace) -> int:
    with cmd_base.open_source(args) as src:
        z, _ = _load_ztoc(src, args.digest)
        entry = find_entry(z, args.path)
        layer = src.ztoc_layer(args.digest)
        if layer.size != z.compressed_archive_size:
            raise FormatError(
                f"layer {layer.digest} has {layer.size} bytes but ztoc {args.digest} describes "
                f"{z.compressed_archive_size}"
            )

        def fetch(start: int, end: int) -> bytes:
            return src.read_layer_range(layer, start, end - start)

        spans = LayerSpans.from_ztoc(z, fetch)
        data = spans.read(entry.uncompressed_offset, entry.uncompressed_size)
    if args.output:
        fd = cmd_base.create_private_file(args.output)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return 0
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.flush()
    return 0
