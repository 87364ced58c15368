"""``soci convert``: turn an image into a SOCI-enabled image with v2 indexes (formats.md §4).

Two modes over one conversion (:func:`build_converted`, run over a :class:`~soci_fs.oci.Layout`):

* ``soci convert SRC_REF DST_REF`` (upstream's command): SRC_REF is an image record in containerd
  (``--address``, ``--namespace``; the name as given, then normalized) read from containerd's content
  store through :class:`~soci_grpc.cli.ctrsource.ContainerdImage`. DST_REF must be a tagged reference
  without a digest (checked before containerd is asked). Under a lease, every new blob (zTOCs, the ``{}``
  config, the v2 SOCI indexes, the annotated image manifests, the new image index) is written into
  containerd's content store with its GC labels (:mod:`~soci_grpc.cli.ctrsource`: the image index
  references its manifests, each manifest its config and layers, each SOCI index its config and zTOCs), then
  the image record DST_REF is created or pointed at the new image index. The image record is the GC root:
  deleting DST_REF lets containerd collect what only it used; the source image can be deleted without
  breaking DST_REF. This happens whatever ``--content-store`` says, since the image must be whole in
  containerd to be pushed; with ``--content-store soci`` the indexes, zTOCs and ``{}`` are also put in
  ``<root>/content``. The indexes are recorded in the artifacts DB (image digest = the annotated manifest)
  and zTOCs recorded there earlier are reused unless ``--force``.
* ``--standalone``: SRC is an OCI layout directory or tar, DST an OCI archive tar (``--format
  oci-archive``, default) or layout directory (``--format oci-dir``). The output is assembled next to DST
  and renamed into place, so a failed conversion leaves DST as it was. Every blob copied to the output is
  verified against its digest. Standalone conversion does not touch ``--root`` or the local store (its
  bookkeeping is per run, as upstream's throwaway DB).

New blobs are staged in a temp directory first in both modes.

Errors: a bad DST_REF is ``InvalidArgument`` (exit 2) with upstream's wording; a source image that is not in
containerd is ``NotFound`` (exit 3) naming the image and the namespace; containerd that cannot be reached is
``Unavailable`` (exit 5).

Will not: build prefetch artifacts, or push anything (push DST_REF with ``ctr``/``nerdctl``, or convert
standalone and use ``soci push --oci-layout``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from soci_fs import index as soci_index
from soci_fs.errors import InvalidArgument, SociError
from soci_fs.oci import (
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Descriptor,
    Layout,
    RootImage,
    SelectedManifest,
    graph_blobs,
    index_json_for,
    write_layout_dir,
    write_layout_tar,
)
from soci_fs.registry import reference
from soci_fs.store import Store
from soci_grpc.cli import cmd_base
from soci_grpc.cli.cmd_create import containerd_lookup
from soci_grpc.cli.ctrsource import ContainerdImage, ContainerdSink, ctr_descriptor, get_image, labels_for
from soci_grpc.containerd import ContainerdClient

FORMATS = ("oci-archive", "oci-dir")
DEST_REF_ERROR = 'the destination image must be a tagged ref of the form "registry/repository:tag"'


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        parents=parents,
        help="convert an image into a SOCI enabled image (SOCI index v2)",
        description="Build a v2 SOCI index per platform and write a SOCI-enabled image: image manifests "
        "annotated with com.amazon.soci.index-digest and an OCI image index that also lists the SOCI "
        "indexes. SOURCE is an image in containerd (--namespace at --address) and DEST the tagged name of "
        "the new image there; with --standalone, SOURCE is an OCI layout (dir or tar) and DEST a path.",
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
    if args.standalone:
        convert_standalone(Path(args.source), Path(args.dest), args, opts)
    else:
        convert_containerd(args, opts)
    return 0


def check_dest_ref(dest: str, source: str = "") -> str:
    """``dest`` if it is a tagged reference without a digest (upstream's rules and wording).

    Raises:
        InvalidArgument: ``the destination image must be a tagged ref ...: <reason>``; when SOURCE or DEST
            names a file or directory the message also points at ``--standalone``.
    """
    hint = ""
    if any(x and os.path.exists(x) for x in (source, dest)):
        hint = " (to convert an OCI layout directory or tar use soci convert --standalone SRC DST)"
    try:
        ref = reference.parse(dest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{DEST_REF_ERROR}: could not parse reference: {exc}{hint}") from exc
    if ref.digest:
        raise InvalidArgument(f"{DEST_REF_ERROR}: reference must not contain a digest{hint}")
    if not ref.tag:
        raise InvalidArgument(f"{DEST_REF_ERROR}: reference must be tagged{hint}")
    return dest


# ---------------------------------------------------------------------------------------------------------
# The conversion, wherever the image comes from


class Staging:
    """New blobs of a conversion as files in a temp directory (the OS temp dir, honouring ``$TMPDIR``)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="soci-convert-"))
        self.blobs: dict[str, Path] = {}

    def put(self, data: bytes) -> None:
        digest = soci_index.sha256_digest(data)
        if digest not in self.blobs:
            path = self.dir / digest.split(":", 1)[1]
            path.write_bytes(data)
            self.blobs[digest] = path

    def read(self, digest: str) -> bytes:
        return self.blobs[digest].read_bytes()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def build_converted(
    layout: Layout,
    root: RootImage,
    selected: list[SelectedManifest],
    opts: soci_index.BuildOptions,
    put: Callable[[bytes], None],
    lookup: Callable[[str, int], bytes | None],
) -> tuple[soci_index.ConvertedImage, list[soci_index.PlatformIndex]]:
    """Build a v2 index per selected manifest (platforms whose layers all get skipped are left out) and the
    SOCI-enabled image over them; every new blob goes to ``put``.

    Raises:
        NoZtocsError: no platform got an index.
    """
    memo: dict[tuple[str, int], bytes] = {}

    def find(layer_digest: str, span_size: int) -> bytes | None:
        return memo.get((layer_digest, span_size)) or lookup(layer_digest, span_size)

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
                lookup_ztoc=find,
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
    return converted, built


# ---------------------------------------------------------------------------------------------------------
# Standalone: OCI layout in, OCI layout out


def convert_standalone(src: Path, dst: Path, args: argparse.Namespace, opts: soci_index.BuildOptions) -> None:
    platforms = cmd_base.platforms_from(args)
    staging = Staging()
    try:
        with Layout.open(src) as layout:
            root = layout.resolve_root()
            selected = layout.select(root, platforms, args.all_platforms)
            converted, _ = build_converted(layout, root, selected, opts, staging.put, lambda _d, _s: None)
            staged = staging.blobs

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
        staging.close()


# ---------------------------------------------------------------------------------------------------------
# containerd: image record in, image record out


def write_to_containerd(
    client: ContainerdClient,
    staging: Staging,
    converted: soci_index.ConvertedImage,
    built: list[soci_index.PlatformIndex],
) -> None:
    """Every staged blob into containerd, referenced blobs before the blobs whose labels reference them."""
    sink = ContainerdSink(client)
    soci_indexes = [b.index.descriptor.digest for b in built]
    manifests = list(dict.fromkeys(converted.manifest_digests.values()))
    labelled = set(soci_indexes) | set(manifests) | {converted.descriptor.digest}
    for digest in staging.blobs:
        if digest not in labelled:
            sink.put(staging.read(digest))  # zTOCs and the {} config
    for digest in [*soci_indexes, *manifests]:
        data = staging.read(digest)
        sink.put(data, labels_for(data, MT_OCI_MANIFEST))
    sink.put(converted.data, labels_for(converted.data, MT_OCI_INDEX))


def convert_containerd(args: argparse.Namespace, opts: soci_index.BuildOptions) -> None:
    dest = check_dest_ref(args.dest, args.source)
    platforms = cmd_base.platforms_from(args)
    with ContainerdClient(args.address, args.namespace, timeout=args.timeout) as client:
        image = get_image(client, args.source)
        src = ContainerdImage(client, image)
        store = Store.open(args.root, create=True)
        staging = Staging()
        try:
            soci_store = args.content_store == "soci"
            lookup = store.lookup_ztoc if soci_store else containerd_lookup(store, client)
            with client.lease():
                root = src.resolve_root()
                selected = src.select(root, platforms, args.all_platforms)
                converted, built = build_converted(src, root, selected, opts, staging.put, lookup)
                write_to_containerd(client, staging, converted, built)
                client.images.update(dest, ctr_descriptor(converted.descriptor))
            if soci_store:
                for b in built:
                    for digest in (
                        b.index.descriptor.digest,
                        *(o.ztoc.digest for o in b.index.ztocs if o.ztoc),
                    ):
                        store.content.put(staging.read(digest), digest)
                    store.content.put(soci_index.EMPTY_CONFIG, soci_index.EMPTY_CONFIG_DIGEST)
            for b in built:
                original = b.manifest_descriptor.digest
                store.record_index(
                    b.index,
                    image_digest=converted.manifest_digests.get(original, original),
                    platform=str(b.platform),
                    span_size=opts.span_size,
                )
        finally:
            staging.close()
            store.close()
