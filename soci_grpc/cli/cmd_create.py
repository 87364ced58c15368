"""``soci create``: build v1 SOCI indexes (formats.md §2) and keep them in the local store.

Upstream reads the image from containerd's image store; soci-py does not talk to containerd yet, so
``soci create IMAGE`` says so. ``soci create --oci-layout PATH [REF]`` (a soci-py addition) builds the indexes
of an image in an OCI layout and stores the indexes, zTOCs, the ``{}`` config, the image manifest and config,
and the layers that got a zTOC in ``<root>/content``, recording them in the artifacts DB, so that
``index``/``ztoc`` commands and ``rebuild-db`` have data. Nothing is written unless every platform builds.

Will not: set containerd image labels or build prefetch artifacts.
"""

from __future__ import annotations

import argparse

from soci_fs import index as soci_index
from soci_fs.errors import FailedPrecondition, InvalidArgument
from soci_fs.oci import Layout
from soci_grpc.cli import cmd_base


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "create",
        parents=parents,
        help="create SOCI index (v1) for an image",
        description="Build a v1 SOCI index for each selected platform of an image and store it with its "
        "zTOCs in the local store. Without containerd support, the image must come from an OCI layout "
        "(--oci-layout PATH, directory or tar); IMAGE_REF then selects the layout entry by its "
        "org.opencontainers.image.ref.name annotation.",
    )
    p.add_argument("image_ref", nargs="?", metavar="IMAGE_REF", help="image reference (ref name in a layout)")
    cmd_base.add_build_flags(p)
    p.add_argument("--oci-layout", metavar="PATH", help="read the image from this OCI layout (dir or tar)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = cmd_base.build_options(args)
    if not args.oci_layout:
        if not args.image_ref:
            raise InvalidArgument("source image needs to be specified")
        raise FailedPrecondition(
            f"soci create {args.image_ref}: {cmd_base.CONTAINERD_MISSING}; "
            "use --oci-layout PATH for an image in an OCI layout, or soci convert --standalone"
        )
    platforms = cmd_base.platforms_from(args)
    store = cmd_base.open_store(args)
    pending: dict[str, bytes] = {}  # digest -> blob, written only when every platform built
    built_here: dict[tuple[str, int], bytes] = {}  # zTOCs of this run, reused by later platforms

    def lookup(layer_digest: str, span_size: int) -> bytes | None:
        return built_here.get((layer_digest, span_size)) or store.lookup_ztoc(layer_digest, span_size)

    try:
        with Layout.open(args.oci_layout) as layout:
            root = layout.resolve_root(args.image_ref or None)
            selected = layout.select(root, platforms, args.all_platforms)
            results = []
            for sel in selected:

                def put(data: bytes) -> None:
                    pending[soci_index.sha256_digest(data)] = data

                built = soci_index.build_index(
                    sel.descriptor,
                    sel.manifest,
                    version=1,
                    open_layer=layout.open_blob,
                    put_blob=put,
                    lookup_ztoc=lookup,
                    options=opts,
                    emit=print,
                )
                results.append((sel, built))
                for o in built.ztocs:
                    assert o.ztoc_bytes is not None
                    built_here[(o.layer.digest, opts.span_size)] = o.ztoc_bytes
            # Commit: blobs first (each verified and atomic), then the DB in one transaction per index.
            for digest, data in pending.items():
                store.content.put(data, digest)
            for sel, built in results:
                for blob in (sel.descriptor, sel.manifest.config):
                    store.content.put_file(layout.blob_path(blob.digest), blob.digest, blob.size)
                for o in built.ztocs:
                    store.content.put_file(layout.blob_path(o.layer.digest), o.layer.digest, o.layer.size)
            for sel, built in results:
                store.record_index(
                    built,
                    image_digest=sel.descriptor.digest,
                    platform=str(sel.platform),
                    span_size=opts.span_size,
                )
    finally:
        store.close()
    return 0
