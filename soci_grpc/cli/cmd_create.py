"""``soci create``: build v1 SOCI indexes (formats.md §2) for an image and keep them with its zTOCs.

Where the image comes from:

* ``soci create IMAGE_REF`` (upstream's command): the image record ``IMAGE_REF`` in containerd's image store
  (``--address``, ``--namespace``; the name as given, then normalized), read from containerd's content
  store: root, platform manifests, configs, and the layers streamed while their zTOCs are built;
* ``soci create --oci-layout PATH [REF]`` (a soci-py addition): an image in an OCI layout (directory or tar);
  ``REF`` selects the ``index.json`` entry by its ``org.opencontainers.image.ref.name`` annotation.

Both run the same build (:func:`build_all`) over a :class:`~soci_fs.oci.Layout` (for containerd a
:class:`~soci_grpc.cli.ctrsource.ContainerdImage`); only where the results go differs:

* ``--content-store soci``: the indexes, zTOCs and the ``{}`` config go to ``<root>/content`` with the image
  manifests and configs (so ``rebuild-db`` finds the platforms); from a layout the layers that got a zTOC are
  copied too (``ztoc get-file`` reads them there), from containerd they stay in containerd (``ztoc get-file``
  reads them from there);
* ``--content-store containerd`` (containerd images only): the same blobs go to containerd's content store
  under a lease, with the GC labels of :mod:`~soci_grpc.cli.ctrsource`: the index references its config
  and zTOCs, and the image record gets ``containerd.io/gc.ref.content.soci-index = <index>`` (the last
  platform's, as upstream) plus, when several platforms were built, one
  ``containerd.io/gc.ref.content.soci-index.<os>-<arch>[-<variant>]`` per platform, so every index lives as
  long as the image (upstream keeps only the last one).

Every index is recorded in the artifacts DB (image digest = the platform manifest), so ``index``/``ztoc``
commands and ``soci push IMAGE_REF`` find them. The containerd image record gets the ``soci-index`` label
in both store modes (as upstream). Nothing is written unless every platform builds.

Errors: an image that is not in containerd is ``NotFound`` (exit 3) naming the image and the namespace;
containerd that cannot be reached is ``Unavailable`` (exit 5) naming the socket.

Will not: build prefetch artifacts, or write to containerd for an image read from a layout.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from soci_fs import index as soci_index
from soci_fs.errors import FormatError, InvalidArgument, NotFound, SociError
from soci_fs.oci import Descriptor, Layout, SelectedManifest
from soci_fs.store import Store
from soci_grpc.cli import cmd_base
from soci_grpc.cli.ctrsource import (
    LABEL_SOCI_INDEX,
    ContainerdImage,
    ContainerdSink,
    get_image,
    platform_label_key,
    soci_index_labels,
)
from soci_grpc.containerd import ContainerdClient

Built = list[tuple[SelectedManifest, soci_index.BuiltIndex]]


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "create",
        parents=parents,
        help="create SOCI index (v1) for an image",
        description="Build a v1 SOCI index for each selected platform of an image and store it with its "
        "zTOCs. The image is read from containerd (IMAGE_REF in --namespace at --address), or with "
        "--oci-layout PATH from an OCI layout (dir or tar; IMAGE_REF then selects the layout entry by its "
        "org.opencontainers.image.ref.name annotation). --content-store soci keeps the artifacts in "
        "<root>/content; --content-store containerd in containerd's content store, kept from its garbage "
        "collector by a label on the image.",
    )
    p.add_argument("image_ref", nargs="?", metavar="IMAGE_REF", help="image reference (ref name in a layout)")
    cmd_base.add_build_flags(p)
    p.add_argument("--oci-layout", metavar="PATH", help="read the image from this OCI layout (dir or tar)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = cmd_base.build_options(args)
    if args.oci_layout:
        create_from_layout(args, opts)
        return 0
    if not args.image_ref:
        raise InvalidArgument("source image needs to be specified")
    create_from_containerd(args, opts)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The build, wherever the image comes from


def build_all(
    layout: Layout,
    selected: list[SelectedManifest],
    opts: soci_index.BuildOptions,
    lookup: Callable[[str, int], bytes | None],
) -> tuple[Built, dict[str, bytes]]:
    """Build a v1 index per selected manifest; ``(results, new blobs by digest)``, nothing stored yet.

    ``lookup`` finds zTOCs built earlier (formats.md §2.1 step 5); zTOCs built here are reused by the later
    platforms.
    """
    pending: dict[str, bytes] = {}
    built_here: dict[tuple[str, int], bytes] = {}

    def find(layer_digest: str, span_size: int) -> bytes | None:
        return built_here.get((layer_digest, span_size)) or lookup(layer_digest, span_size)

    def put(data: bytes) -> None:
        pending[soci_index.sha256_digest(data)] = data

    results: Built = []
    for sel in selected:
        built = soci_index.build_index(
            sel.descriptor,
            sel.manifest,
            version=1,
            open_layer=layout.open_blob,
            put_blob=put,
            lookup_ztoc=find,
            options=opts,
            emit=print,
        )
        results.append((sel, built))
        for o in built.ztocs:
            assert o.ztoc_bytes is not None
            built_here[(o.layer.digest, opts.span_size)] = o.ztoc_bytes
    return results, pending


def record(store: Store, results: Built, span_size: int) -> None:
    """The indexes and their zTOCs in the artifacts DB (one transaction per index)."""
    for sel, built in results:
        store.record_index(
            built, image_digest=sel.descriptor.digest, platform=str(sel.platform), span_size=span_size
        )


def commit_to_store(
    store: Store, results: Built, pending: dict[str, bytes], copy: Callable[[Descriptor], None]
) -> None:
    """New blobs into ``<root>/content`` (each verified and atomic), then ``copy`` for every image manifest
    and config."""
    for digest, data in pending.items():
        store.content.put(data, digest)
    for sel, _ in results:
        for blob in (sel.descriptor, sel.manifest.config):
            copy(blob)


# ---------------------------------------------------------------------------------------------------------
# From an OCI layout


def create_from_layout(args: argparse.Namespace, opts: soci_index.BuildOptions) -> None:
    platforms = cmd_base.platforms_from(args)
    store = cmd_base.open_store(args)
    try:
        with Layout.open(args.oci_layout) as layout:
            root = layout.resolve_root(args.image_ref or None)
            selected = layout.select(root, platforms, args.all_platforms)
            results, pending = build_all(layout, selected, opts, store.lookup_ztoc)

            def copy(d: Descriptor) -> None:
                store.content.put_file(layout.blob_path(d.digest), d.digest, d.size)

            commit_to_store(store, results, pending, copy)
            for _, built in results:
                for o in built.ztocs:
                    copy(o.layer)
            record(store, results, opts.span_size)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------------
# From containerd


def containerd_lookup(store: Store, client: ContainerdClient) -> Callable[[str, int], bytes | None]:
    """zTOCs recorded in the artifacts DB whose blob is in containerd's content store."""

    def lookup(layer_digest: str, span_size: int) -> bytes | None:
        e = store.db.find_ztoc(layer_digest, span_size)
        if e is None:
            return None
        try:
            data = client.content.read(e.digest)
        except NotFound:
            return None
        if soci_index.sha256_digest(data) != e.digest:
            raise FormatError(f"ztoc {e.digest} in containerd's content store: digest mismatch")
        return data

    return lookup


def image_labels(results: Built) -> dict[str, str]:
    """The labels that keep the indexes as long as the image (see the module docstring)."""
    labels = {LABEL_SOCI_INDEX: results[-1][1].descriptor.digest}
    if len(results) > 1:
        for sel, built in results:
            labels[platform_label_key(sel.platform)] = built.descriptor.digest
    return labels


def create_from_containerd(args: argparse.Namespace, opts: soci_index.BuildOptions) -> None:
    platforms = cmd_base.platforms_from(args)
    with ContainerdClient(args.address, args.namespace, timeout=args.timeout) as client:
        image = get_image(client, args.image_ref)
        src = ContainerdImage(client, image)
        store = Store.open(args.root, create=True)
        try:
            if args.content_store == "containerd":
                with client.lease():
                    root = src.resolve_root()
                    selected = src.select(root, platforms, args.all_platforms)
                    results, pending = build_all(src, selected, opts, containerd_lookup(store, client))
                    sink = ContainerdSink(client)
                    indexes = {built.descriptor.digest for _, built in results}
                    for digest, data in pending.items():
                        if digest not in indexes:
                            sink.put(data)
                    for _, built in results:
                        sink.put(built.data, soci_index_labels(built.manifest))
                    client.images.update(image.name, image.target, image_labels(results))
                record(store, results, opts.span_size)
                return
            root = src.resolve_root()
            selected = src.select(root, platforms, args.all_platforms)
            results, pending = build_all(src, selected, opts, store.lookup_ztoc)

            def copy(d: Descriptor) -> None:
                store.content.put(src.read_blob(d), d.digest)

            commit_to_store(store, results, pending, copy)
            record(store, results, opts.span_size)
            try:
                client.images.update(image.name, image.target, image_labels(results))
            except SociError as exc:
                raise type(exc)(
                    f"image {image.name!r}: the SOCI indexes are stored, but labelling the image in "
                    f"containerd failed: {exc}"
                ) from exc
        finally:
            store.close()
