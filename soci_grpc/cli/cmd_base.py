"""Pieces the ``soci`` command modules share: flag groups, Go-compatible table and duration output, and the
places artifacts can be read from: the artifacts DB with its blobs in the local store (``--content-store
soci``) or in containerd's content store (``--content-store containerd``), or an OCI layout given with
``--oci-layout``.

With the artifacts DB, containerd is asked only when a command needs it: blobs in ``--content-store
containerd`` mode, image references that are not digests (``--ref``, ``--image-ref``), and layers the local
store does not hold (``soci create IMAGE`` leaves the layers in containerd). The connection is made on first
use (:class:`~soci_grpc.cli.ctrsource.LazyClient`).

Will not: define commands (each ``cmd_*.py`` does) or map errors to exit codes (``common.py`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from soci_fs import index as soci_index
from soci_fs.errors import FailedPrecondition, InvalidArgument, NotFound, SociError, Unavailable
from soci_fs.oci import (
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    MT_OCI_MANIFEST,
    Descriptor,
    Layout,
    Platform,
    parse_platform,
)
from soci_fs.store import TYPE_INDEX, TYPE_LAYER, Store

if TYPE_CHECKING:
    from soci_grpc.cli.ctrsource import LazyClient

CONTENT_STORES = ("soci", "containerd")

CONTAINERD_MISSING = "image names are resolved through containerd, which this command does not connect to"


# ---------------------------------------------------------------------------------------------------------
# Flags


def split_list(values: list[str] | None) -> list[str]:
    """urfave string slices: repeatable, each value split on commas, items trimmed, empties dropped."""
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def add_platform_flags(p: argparse.ArgumentParser, *, all_platforms: bool = True) -> None:
    if all_platforms:
        p.add_argument("--all-platforms", action="store_true", help="use every platform of the image")
    p.add_argument(
        "--platform",
        "-p",
        action="append",
        metavar="PLATFORM",
        help="os/arch[/variant] (repeatable, comma-separated); default: the host platform",
    )


def platforms_from(args: argparse.Namespace) -> list[Platform] | None:
    specs = split_list(getattr(args, "platform", None))
    return [parse_platform(s) for s in specs] or None


def add_layout_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--oci-layout",
        metavar="PATH",
        help="work on the SOCI indexes of an OCI image layout (directory or tar) instead of the local store",
    )


def _positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from exc
    return v


def add_build_flags(p: argparse.ArgumentParser) -> None:
    """The index-building flags of ``create`` and ``convert``."""
    add_platform_flags(p)
    p.add_argument(
        "--span-size",
        type=_positive_int,
        default=soci_index.DEFAULT_SPAN_SIZE,
        help="span size (default 4194304)",
    )
    p.add_argument(
        "--min-layer-size",
        type=_positive_int,
        default=soci_index.DEFAULT_MIN_LAYER_SIZE,
        help="layers smaller than this get no zTOC (default 10485760)",
    )
    p.add_argument(
        "--optimizations",
        action="append",
        metavar="OPT",
        help="enable an optimization (repeatable; valid: xattr)",
    )
    p.add_argument("--force", "-f", action="store_true", help="rebuild zTOCs even when they are known")
    p.add_argument(
        "--prefetch-file",
        action="append",
        metavar="PATH",
        help="(experimental; not built in soci-py yet) file to prefetch",
    )
    p.add_argument(
        "--prefetch-files-json",
        metavar="FILE",
        help="(experimental; not built in soci-py yet) JSON array of files to prefetch",
    )


def build_options(args: argparse.Namespace) -> soci_index.BuildOptions:
    if args.prefetch_file or args.prefetch_files_json:
        raise FailedPrecondition(
            "prefetch artifacts (--prefetch-file, --prefetch-files-json) are not built yet"
        )
    if args.span_size <= 0:
        raise InvalidArgument(f"span size must be positive, got {args.span_size}")
    return soci_index.BuildOptions(
        span_size=args.span_size,
        min_layer_size=args.min_layer_size,
        optimizations=frozenset(split_list(args.optimizations)),
        force=args.force,
    )


def content_store_type(text: str) -> str:
    if text not in CONTENT_STORES:
        raise argparse.ArgumentTypeError(
            f"unknown content store type: {text}; must be one of [{' '.join(CONTENT_STORES)}]"
        )
    return text


def lazy_containerd(args: argparse.Namespace) -> LazyClient:
    """A containerd connection for ``--address`` / ``--namespace`` / ``--timeout``, made on first use."""
    from soci_grpc.cli.ctrsource import LazyClient
    from soci_grpc.containerd import DEFAULT_ADDRESS

    return LazyClient(
        getattr(args, "address", None) or DEFAULT_ADDRESS,
        getattr(args, "namespace", None) or "default",
        getattr(args, "timeout", None),
    )


def open_store(args: argparse.Namespace) -> Store:
    """The local store selected by ``--root`` / ``--content-store`` (root created if missing)."""
    if args.content_store != "soci":
        raise FailedPrecondition(
            "the containerd content store is not supported yet by this command (create and convert of "
            "containerd images, index list/info and ztoc list/info/get-file support it); use "
            "--content-store soci"
        )
    return Store.open(args.root, create=True)


# ---------------------------------------------------------------------------------------------------------
# Output formats


def tabwriter(rows: list[list[str]], *, minwidth: int = 8, padding: int = 4) -> str:
    """Go ``text/tabwriter`` (padchar ' ', no flags) over lines whose every cell ends with a tab."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [minwidth] * ncols
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell) + padding)
    lines = []
    for r in rows:
        lines.append("".join(cell + " " * (widths[i] - len(cell)) for i, cell in enumerate(r)))
    return "\n".join(lines) + "\n"


def go_duration(seconds: int) -> str:
    """Go ``time.Duration.String`` of a whole number of seconds."""
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{sign}{h}h{m}m{sec}s"
    if m:
        return f"{sign}{m}m{sec}s"
    return f"{sign}{sec}s"


def created_text(created: _dt.datetime | None, now: _dt.datetime | None = None) -> str:
    if created is None:
        return "n/a"
    now = now or _dt.datetime.now(_dt.UTC)
    secs = (now - created).total_seconds()
    return f"{go_duration(round(secs))} ago"


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------
# Sources of artifacts


@dataclass(frozen=True)
class IndexRow:
    digest: str
    size: int
    image_refs: tuple[str, ...]
    platform: str
    media_type: str
    version: str  # v1 / v2
    created: _dt.datetime | None
    image_digest: str


@dataclass(frozen=True)
class ZtocRow:
    digest: str
    size: int
    layer_digest: str
    layer_media_type: str = ""


class BlobReader(Protocol):
    """The read side of a content store (the local ``ContentStore``, or containerd's)."""

    def has(self, digest: str) -> bool: ...
    def size(self, digest: str) -> int: ...
    def read(self, digest: str, size: int | None = None) -> bytes: ...
    def read_range(self, digest: str, offset: int, length: int) -> bytes: ...


class StoreSource:
    """Artifacts recorded in the artifacts DB, blobs in the soci content store (or in ``content``).

    Args:
        store: the local store (its artifacts DB; its content store unless ``content`` is given).
        content: where index and zTOC blobs are read instead (containerd's content store).
        containerd: a connection made on first use, asked for image references that are not digests and
            for layers that ``content`` does not hold.
    """

    def __init__(
        self,
        store: Store,
        *,
        content: BlobReader | None = None,
        containerd: LazyClient | None = None,
    ) -> None:
        self.store = store
        self.content: BlobReader = content if content is not None else store.content
        self.containerd = containerd
        self._layer_content: dict[str, BlobReader] = {}  # layer digest -> where ztoc_layer found it

    def indexes(self) -> list[IndexRow]:
        rows = []
        for e in self.store.db.entries(TYPE_INDEX):
            rows.append(
                IndexRow(
                    e.digest,
                    e.size,
                    (),
                    e.platform,
                    e.media_type,
                    e.manifest_version,
                    e.created(),
                    e.image_digest,
                )
            )
        rows.sort(key=lambda r: r.created or _dt.datetime.min.replace(tzinfo=_dt.UTC), reverse=True)
        return rows

    def ztocs(self) -> list[ZtocRow]:
        return [ZtocRow(e.digest, e.size, e.oci_digest) for e in self.store.db.entries(TYPE_LAYER)]

    def kind(self, digest: str) -> str | None:
        e = self.store.db.get(digest)
        if e is None:
            return None
        return {TYPE_INDEX: "index", TYPE_LAYER: "ztoc"}.get(e.type, e.type)

    def blob(self, digest: str) -> bytes:
        e = self.store.db.get(digest)
        return self.content.read(digest, e.size if e else None)

    def _containerd_content(self) -> BlobReader | None:
        if self.containerd is None or self.content is not self.store.content:
            return None  # no containerd, or ``content`` is containerd's already
        from soci_grpc.cli.ctrsource import ContainerdContent

        return ContainerdContent(self.containerd)

    def ztoc_layer(self, digest: str) -> Descriptor:
        e = self.store.db.get(digest)
        if e is None or e.type != TYPE_LAYER:
            raise NotFound(f"ztoc {digest}: not in the artifacts DB")
        if self.content.has(e.oci_digest):
            self._layer_content[e.oci_digest] = self.content
            return Descriptor("", e.oci_digest, self.content.size(e.oci_digest))
        where = "the local content store" if self.content is self.store.content else "the content store"
        hint = "pass --oci-layout PATH to read it from the image layout"
        other = self._containerd_content()
        if other is not None:
            try:
                if other.has(e.oci_digest):
                    self._layer_content[e.oci_digest] = other
                    return Descriptor("", e.oci_digest, other.size(e.oci_digest))
                where += " nor in containerd's"
            except Unavailable as exc:
                hint += f"; containerd could not be asked: {exc}"
        raise NotFound(f"layer {e.oci_digest} of ztoc {digest}: not in {where} ({hint})")

    def read_layer_range(self, layer: Descriptor, offset: int, length: int) -> bytes:
        content = self._layer_content.get(layer.digest, self.content)
        return content.read_range(layer.digest, offset, length)

    def resolve_ref(self, ref: str) -> list[str]:
        """Image manifest digests for ``--ref``: a digest as it is; an image name through containerd (the
        image's manifest, or every platform manifest of its index)."""
        if ref.startswith("sha256:"):
            return [ref]
        if self.containerd is None:
            raise FailedPrecondition(
                f"resolving image reference {ref!r}: {CONTAINERD_MISSING}; pass a manifest digest, "
                "or --oci-layout PATH to resolve ref names in a layout"
            )
        from soci_grpc.cli.ctrsource import manifest_digests

        try:
            return manifest_digests(self.containerd.get(), ref)
        except Unavailable as exc:
            raise Unavailable(
                f"resolving image reference {ref!r}: {exc}; pass a manifest digest instead, or "
                "--oci-layout PATH to resolve ref names in a layout"
            ) from exc


class LayoutSource:
    """SOCI indexes of an OCI layout: v2 ones through the index descriptors / manifest annotations, v1 ones
    through their subject (found in ``index.json`` or anywhere among the blobs)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._indexes: dict[str, tuple[Descriptor, soci_index.SociIndex, IndexRow]] | None = None

    def _scan(self) -> dict[str, tuple[Descriptor, soci_index.SociIndex, IndexRow]]:
        if self._indexes is not None:
            return self._indexes
        lay = self.layout
        found: dict[str, tuple[Descriptor, soci_index.SociIndex, IndexRow]] = {}
        refs: dict[str, list[str]] = {}  # manifest digest -> ref names
        platforms: dict[str, Platform] = {}  # manifest digest -> platform
        v2: list[tuple[Descriptor, str]] = []  # (index descriptor, top-level ref)
        try:
            top = lay.index_json().manifests or []
        except SociError:
            top = []

        def walk(d: Descriptor, ref: str, depth: int) -> None:
            if depth > 8 or not lay.has_blob(d.digest):
                return
            if ref:
                refs.setdefault(d.digest, [])
                if ref not in refs[d.digest]:
                    refs[d.digest].append(ref)
            if d.platform is not None:
                platforms.setdefault(d.digest, d.platform)
            if d.artifact_type == soci_index.ARTIFACT_TYPE_V2:
                v2.append((d, ref))
                return
            if d.media_type in INDEX_TYPES:
                try:
                    idx = lay.read_index(d)
                except SociError:
                    return
                for child in idx.manifests or []:
                    walk(child, ref, depth + 1)

        for d in top:
            walk(d, (d.annotations or {}).get(ANNOTATION_REF_NAME, ""), 0)

        def add(
            desc: Descriptor, data: bytes, idx: soci_index.SociIndex, image_digest: str, plat: str, ref: str
        ):
            image_refs = tuple(refs.get(image_digest, [])) or ((ref,) if ref else ())
            row = IndexRow(
                desc.digest,
                desc.size,
                image_refs,
                plat,
                idx.manifest.media_type or MT_OCI_MANIFEST,
                f"v{idx.version}",
                None,
                image_digest,
            )
            found[desc.digest] = (desc, idx, row)

        for d, ref in v2:
            try:
                data = lay.read_blob(d)
                idx = soci_index.parse_index(data, f"SOCI index {d.digest}")
            except SociError:
                continue
            image_digest = (d.annotations or {}).get(soci_index.ANN_MANIFEST_DIGEST, "")
            add(d, data, idx, image_digest, str(d.platform) if d.platform else "", ref)
        # v1 indexes: any blob that parses as one (they are referrers, often not in index.json).
        for digest, path in lay.all_blobs():
            if digest in found:
                continue
            try:
                if not 10 <= path.stat().st_size <= (4 << 20):
                    continue
                with open(path, "rb") as f:
                    if f.read(1) != b"{":
                        continue
                data = path.read_bytes()
                idx = soci_index.parse_index(data, f"blob {digest}")
            except (SociError, OSError):
                continue
            subject = idx.subject
            if idx.version != 1 or subject is None:
                continue
            desc = Descriptor(MT_OCI_MANIFEST, digest, len(data))
            image_digest = subject.digest
            plat = platforms.get(image_digest)
            if plat is None and lay.has_blob(subject.digest):
                try:
                    plat = lay.config_platform(lay.read_manifest(subject))
                except SociError:
                    plat = None
            add(desc, data, idx, image_digest, str(plat) if plat else "", "")
        self._indexes = found
        return found

    def indexes(self) -> list[IndexRow]:
        return [row for _, _, row in self._scan().values()]

    def _ztoc_map(self) -> dict[str, ZtocRow]:
        out: dict[str, ZtocRow] = {}
        for _, idx, _row in self._scan().values():
            for z in idx.ztocs:
                out.setdefault(
                    z.descriptor.digest,
                    ZtocRow(z.descriptor.digest, z.descriptor.size, z.layer_digest, z.layer_media_type),
                )
        return out

    def ztocs(self) -> list[ZtocRow]:
        return [self._ztoc_map()[k] for k in sorted(self._ztoc_map())]

    def kind(self, digest: str) -> str | None:
        if digest in self._scan():
            return "index"
        if digest in self._ztoc_map():
            return "ztoc"
        return None

    def blob(self, digest: str) -> bytes:
        if digest in self._scan():
            return self.layout.read_blob(self._scan()[digest][0])
        z = self._ztoc_map().get(digest)
        if z is None:
            raise NotFound(f"blob {digest}: not a SOCI index or zTOC of OCI layout {self.layout.source!r}")
        return self.layout.read_blob(Descriptor("", z.digest, z.size))

    def ztoc_layer(self, digest: str) -> Descriptor:
        z = self._ztoc_map().get(digest)
        if z is None:
            raise NotFound(
                f"ztoc {digest}: not referenced by a SOCI index of OCI layout {self.layout.source!r}"
            )
        path = self.layout.blob_path(z.layer_digest)
        if not path.is_file():
            raise NotFound(
                f"layer {z.layer_digest} of ztoc {digest}: not in OCI layout {self.layout.source!r}"
            )
        return Descriptor(z.layer_media_type, z.layer_digest, path.stat().st_size)

    def read_layer_range(self, layer: Descriptor, offset: int, length: int) -> bytes:
        return self.layout.read_range(layer, offset, length)

    def resolve_ref(self, ref: str) -> list[str]:
        """Manifest digests for a ref name (``org.opencontainers.image.ref.name``) or a manifest digest."""
        if ref.startswith("sha256:"):
            return [ref]
        root = self.layout.resolve_root(ref)
        if root.index is None:
            return [root.descriptor.digest]
        out = []
        for p in self.layout.platforms(root):
            for sel in self.layout.select(root, [p], False):
                out.append(sel.descriptor.digest)
        return out


Source = StoreSource | LayoutSource


@contextlib.contextmanager
def open_source(args: argparse.Namespace) -> Iterator[Source]:
    """The store, or the layout named by ``--oci-layout``, for a read-only command.

    With ``--content-store containerd`` the artifacts DB is the local one and the blobs are read from
    containerd's content store (namespace ``--namespace``).
    """
    layout_path = getattr(args, "oci_layout", None)
    if layout_path:
        with Layout.open(layout_path) as layout:
            yield LayoutSource(layout)
        return
    containerd = lazy_containerd(args)
    try:
        if getattr(args, "content_store", "soci") == "containerd":
            from soci_grpc.cli.ctrsource import ContainerdContent

            store = Store.open(args.root, create=True)
            try:
                yield StoreSource(store, content=ContainerdContent(containerd), containerd=containerd)
            finally:
                store.close()
            return
        store = open_store(args)
        try:
            yield StoreSource(store, containerd=containerd)
        finally:
            store.close()
    finally:
        containerd.close()


def create_private_file(path: str | os.PathLike[str]) -> int:
    """Open ``path`` for writing, created or truncated, mode 0600."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd
