"""``soci convert``: turn an image into a SOCI-enabled image with v2 indexes (formats.md §4).

Only ``--standalone`` works in soci-py (no containerd yet): SRC is an OCI layout directory or tar, DST an
OCI archive tar (``--format oci-archive``, default) or layout directory (``--format oci-dir``). New blobs are
staged in a temp directory; the output is assembled next to DST and renamed into place, so a failed
conversion leaves DST as it was. Every blob copied to the output is verified against its digest.

Will not: touch ``--root`` or the local store (standalone bookkeeping is per run, as upstream's throwaway DB),
or build prefetch artifacts.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from soci_fs import index as soci_index
from soci_fs.errors import FailedPrecondition, SociError
from soci_fs.oci import Descriptor, Layout, graph_blobs, index_json_for, write_layout_dir, write_layout_tar
from soci_grpc.cli import cmd_base

FORMATS = ("oci-archive", "oci-dir")


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        parents=parents,
        help="convert an image into a SOCI enabled image (SOCI index v2)",
        description="Build a v2 SOCI index per platform and write a SOCI-enabled image: image manifests "
        "annotated with com.amazon.soci.index-digest and an OCI image index that also lists the SOCI "
        "indexes. soci-py supports only --standalone (SOURCE: OCI layout dir or tar; DEST: a path).",
    )
    p.add_argument("source", nargs="?", metavar="SOURCE")
    p.add_argument("dest", nargs="?", metavar="DEST")
    cmd_base.add_build_flags(p)
    p.add_argument(
        "--standalone", action="store_true", help="convert an OCI layout (dir or tar) without containerd"
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="oci-archive",
        help="standalone output: oci-archive (tar, default) or oci-dir (layout directory)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = cmd_base.build_options(args)
    if not args.source:
        raise cmd_base.InvalidArgument("source image needs to be specified")
    if not args.dest:
        raise cmd_base.InvalidArgument("destination image needs to be specified")
    if not args.standalone:
        raise FailedPrecondition(
            f"soci convert without --standalone: {cmd_base.CONTAINERD_MISSING}; use "
            "soci convert --standalone SRC DST with an OCI layout directory or tar"
        )
    convert_standalone(Path(args.source), Path(args.dest), args, opts)
    return 0


def convert_standalone(src: Path, dst: Path, args: argparse.Namespace, opts: soci_index.BuildOptions) -> None:
    platforms = cmd_base.platforms_from(args)
    staging = Path(tempfile.mkdtemp(prefix="soci-convert-"))
    try:
        staged: dict[str, Path] = {}

        def put(data: bytes) -> None:
            digest = soci_index.sha256_digest(data)
            if digest not in staged:
                path = staging / digest.split(":", 1)[1]
                path.write_bytes(data)
                staged[digest] = path

        with Layout.open(src) as layout:
            root = layout.resolve_root()
            selected = layout.select(root, platforms, args.all_platforms)
            memo: dict[tuple[str, int], bytes] = {}
            built: list[soci_index.PlatformIndex] = []
            last_empty: SociError | None = None
            for sel in selected:
                try:
                    b = soci_index.build_index(
                        sel.descriptor,
                        sel.manifest,
                        version=2,
                        open_layer=layout.open_blob,
                        put_blob=put,
                        lookup_ztoc=lambda d, s: memo.get((d, s)),
                        options=opts,
                        emit=print,
                    )
                except soci_index.NoZtocsError as exc:
                    last_empty = exc
                    continue
                for o in b.ztocs:
                    assert o.ztoc_bytes is not None
                    memo[(o.layer.digest, opts.span_size)] = o.ztoc_bytes
                built.append(soci_index.PlatformIndex(sel.platform, sel.descriptor, b))
            if not built:
                raise last_empty or soci_index.NoZtocsError("no SOCI index created for any platform")

            def read_manifest(d: Descriptor) -> bytes | None:
                return layout.read_blob(d) if layout.has_blob(d.digest) else None

            root_platform = selected[0].platform if root.index is None else None
            converted = soci_index.convert_image(
                root.descriptor,
                root.index,
                built,
                read_manifest=read_manifest,
                put_blob=put,
                root_platform=root_platform,
            )

            def has(digest: str) -> bool:
                return digest in staged or layout.has_blob(digest)

            def read(d: Descriptor) -> bytes:
                if d.digest in staged:
                    return staged[d.digest].read_bytes()
                return layout.read_blob(d)

            index_json = index_json_for(converted.descriptor)
            if args.format == "oci-dir":
                blobs = dict(layout.all_blobs())
            else:
                blobs = {}
                for digest in graph_blobs(has, read, converted.descriptor):
                    if digest not in staged:
                        blobs[digest] = layout.blob_path(digest)
            final = [(d, p) for d, p in blobs.items() if d not in staged] + list(staged.items())
            if args.format == "oci-dir":
                write_layout_dir(dst, final, index_json)
            else:
                write_layout_tar(dst, final, index_json)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
