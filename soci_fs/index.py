"""SOCI index manifests (v1 and v2), which layers get a zTOC, and the v2 SOCI-enabled image.

Owns (formats.md §2 and §4):
* building an index manifest byte-identical to upstream (:func:`build_index`, :func:`index_manifest`),
  with the per-layer rules of §2.1 (layer types, ``DiffCompression``, min-layer-size, the skip and failure
  messages, the ``xattr`` optimization annotation);
* reading an index (:func:`parse_index`): version from ``config.mediaType``, the layer -> zTOC map;
* the v2 conversion (:func:`convert_image`): annotated image manifests and the OCI image index carrying the
  SOCI index descriptors.

Will not: read or write files itself. Callers pass functions that open layer blobs, store blobs and look up
zTOCs built earlier, so the same code serves OCI layouts, the local store and (later) containerd.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

from soci_fs.errors import FormatError, InvalidArgument, NotFound, SociError
from soci_fs.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    Manifest,
    Platform,
    PlatformMatcher,
    sha256_digest,
)

# Constants (formats.md §1).
ARTIFACT_TYPE_V1 = "application/vnd.amazon.soci.index.v1+json"
ARTIFACT_TYPE_V2 = "application/vnd.amazon.soci.index.v2+json"
MT_ZTOC = "application/octet-stream"
MT_PREFETCH = "application/vnd.amazon.soci.prefetch.v1+json"
EMPTY_CONFIG = b"{}"
EMPTY_CONFIG_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
DEFAULT_SPAN_SIZE = 1 << 22
DEFAULT_MIN_LAYER_SIZE = 10 << 20
BUILD_TOOL = "AWS SOCI CLI v0.2"

ANN_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
ANN_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
ANN_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANN_SPAN_SIZE = "com.amazon.soci.span-size"
ANN_DISABLE_XATTRS = "com.amazon.soci.disable-xattrs"
ANN_INDEX_DIGEST = "com.amazon.soci.index-digest"
ANN_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"

OPTIMIZATIONS = ("xattr",)

_DOCKER_LAYER_PREFIX = "application/vnd.docker.image.rootfs."
_DOCKER_LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar": "unknown",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "unknown",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"


class NoZtocsError(SociError):
    """No layer of a platform manifest got a zTOC (all skipped); ``convert`` skips such platforms."""


# ---------------------------------------------------------------------------------------------------------
# Layer rules (§2.1)


def is_layer_type(media_type: str) -> bool:
    """containerd ``images.IsLayerType``."""
    if media_type.startswith("application/vnd.oci.image.layer."):
        return True
    base = media_type.split("+", 1)[0]
    return base in _DOCKER_LAYER_TYPES


def diff_compression(media_type: str) -> str:
    """containerd ``images.DiffCompression``: ``gzip``, ``zstd``, ``unknown``, ``uncompressed`` or ``none``.

    ``none`` stands for "no compression containerd knows" (an unknown ``+suffix``).

    Raises:
        FormatError: the media type is not a layer type containerd can classify.
    """
    base, *suffixes = media_type.split("+")
    suffixes.sort()
    last = suffixes[-1] if suffixes else ""
    if base in _DOCKER_LAYER_TYPES:
        if suffixes:
            return "none"
        return _DOCKER_LAYER_TYPES[base]
    if base in (_OCI_LAYER, _OCI_LAYER_ND):
        if last == "gzip":
            return "gzip"
        if last == "zstd":
            return "zstd"
        if media_type == _OCI_LAYER:
            return "uncompressed"
        return "none"
    raise FormatError(f"could not determine layer compression: unrecognised media type {media_type}")


def _algo_name(compression: str) -> str:
    # How upstream spells the algorithm in the unsupported-format message: containerd returns "" for a
    # compression it does not know.
    return "" if compression == "none" else compression


# ---------------------------------------------------------------------------------------------------------
# Index manifests (§2)


@dataclass(frozen=True)
class ZtocRef:
    """One zTOC of an index: its descriptor plus what the annotations say."""

    descriptor: Descriptor
    layer_digest: str
    layer_media_type: str
    span_size: int | None


@dataclass(frozen=True)
class SociIndex:
    """A parsed SOCI index manifest."""

    version: int  # 1 or 2
    manifest: Manifest
    ztocs: tuple[ZtocRef, ...]
    prefetches: tuple[Descriptor, ...]

    @property
    def subject(self) -> Descriptor | None:
        return self.manifest.subject

    @property
    def build_tool(self) -> str:
        return (self.manifest.annotations or {}).get(ANN_BUILD_TOOL, "")

    def ztoc_for_layer(self, layer_digest: str) -> ZtocRef | None:
        for z in self.ztocs:
            if z.layer_digest == layer_digest:
                return z
        return None


def ztoc_descriptor(
    ztoc_digest: str, ztoc_size: int, layer: Descriptor, span_size: int, disable_xattrs: bool
) -> Descriptor:
    ann = {
        ANN_LAYER_DIGEST: layer.digest,
        ANN_LAYER_MEDIA_TYPE: layer.media_type,
        ANN_SPAN_SIZE: str(span_size),
    }
    if disable_xattrs:
        ann[ANN_DISABLE_XATTRS] = "true"
    return Descriptor(MT_ZTOC, ztoc_digest, ztoc_size, annotations=ann)


def index_manifest(
    layers: list[Descriptor],
    *,
    version: int,
    subject: Descriptor | None = None,
    build_tool: str = BUILD_TOOL,
) -> Manifest:
    """The index manifest value (zTOC descriptors then prefetch descriptors, in that order in ``layers``)."""
    if version not in (1, 2):
        raise InvalidArgument(f"unknown SOCI index version {version}")
    config_type = ARTIFACT_TYPE_V1 if version == 1 else ARTIFACT_TYPE_V2
    return Manifest(
        schema_version=2,
        media_type=MT_OCI_MANIFEST,
        config=Descriptor(config_type, EMPTY_CONFIG_DIGEST, len(EMPTY_CONFIG)),
        layers=list(layers),
        subject=subject.short() if (version == 1 and subject is not None) else None,
        annotations={ANN_BUILD_TOOL: build_tool},
    )


def parse_index(data: bytes, what: str = "SOCI index") -> SociIndex:
    """Decode an index manifest.

    Raises:
        FormatError: not a manifest, or ``config.mediaType`` is not a SOCI index type
            ("unknown index version").
    """
    m = Manifest.parse(data, what)
    if m.config.media_type == ARTIFACT_TYPE_V1:
        version = 1
    elif m.config.media_type == ARTIFACT_TYPE_V2:
        version = 2
    else:
        raise FormatError(f"{what}: unknown index version (config media type {m.config.media_type!r})")
    ztocs = []
    prefetches = []
    for d in m.layers or []:
        ann = d.annotations or {}
        if d.media_type == MT_ZTOC:
            span = ann.get(ANN_SPAN_SIZE)
            ztocs.append(
                ZtocRef(
                    descriptor=d,
                    layer_digest=ann.get(ANN_LAYER_DIGEST, ""),
                    layer_media_type=ann.get(ANN_LAYER_MEDIA_TYPE, ""),
                    span_size=int(span) if span and span.isdigit() else None,
                )
            )
        elif d.media_type == MT_PREFETCH:
            prefetches.append(d)
    return SociIndex(version, m, tuple(ztocs), tuple(prefetches))


def is_soci_index(data: bytes) -> bool:
    try:
        parse_index(data)
    except SociError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Building (§2.1)


class LayerReader(Protocol):
    def read(self, n: int = -1) -> bytes: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class BuildOptions:
    span_size: int = DEFAULT_SPAN_SIZE
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    optimizations: frozenset[str] = frozenset()
    build_tool: str = BUILD_TOOL
    force: bool = False
    workers: int = 0  # 0 = min(4, cpus)

    def __post_init__(self) -> None:
        if self.span_size <= 0:
            raise InvalidArgument(f"span size must be positive, got {self.span_size}")
        if self.min_layer_size < 0:
            raise InvalidArgument(f"min layer size must not be negative, got {self.min_layer_size}")
        for o in self.optimizations:
            if o not in OPTIMIZATIONS:
                raise InvalidArgument(
                    f"optimization {o} is not a valid optimization [{' '.join(OPTIMIZATIONS)}]"
                )


@dataclass(frozen=True)
class LayerOutcome:
    layer: Descriptor
    ztoc: Descriptor | None = None  # the zTOC descriptor as it appears in the index
    message: str = ""  # the line printed for this layer ("" = nothing)
    reused: bool = False
    ztoc_bytes: bytes | None = None
    error: SociError | None = None


@dataclass(frozen=True)
class BuiltIndex:
    """A finished index: its bytes, descriptor and the per-layer outcomes (layer order)."""

    version: int
    manifest: Manifest
    data: bytes
    descriptor: Descriptor
    outcomes: tuple[LayerOutcome, ...] = field(default=())

    @property
    def ztocs(self) -> list[LayerOutcome]:
        return [o for o in self.outcomes if o.ztoc is not None]


def _no_xattrs(z: object) -> bool:
    for f in z.files:  # type: ignore[attr-defined]
        if f.name.endswith(".wh..wh..opq"):
            return False
        for key, _ in f.pax:
            if key.startswith("SCHILY.xattr."):
                return False
    return True


def _compression_for_builder(compression: str) -> str:
    return "gzip" if compression == "gzip" else "tar"


def build_layer(
    layer: Descriptor,
    *,
    open_layer: Callable[[Descriptor], LayerReader],
    lookup_ztoc: Callable[[str, int], bytes | None],
    options: BuildOptions,
) -> LayerOutcome:
    """The §2.1 decision and work for one layer. Errors are returned in the outcome, not raised, except
    ones that are not ``SociError`` (bugs)."""
    from soci_fs import builder, ztoc

    mt = layer.media_type
    if mt == MT_PREFETCH:
        return LayerOutcome(layer)
    if not is_layer_type(mt):
        return LayerOutcome(
            layer, error=FormatError(f"layer {layer.digest}: media type {mt} is not a layer type")
        )
    if layer.size < options.min_layer_size:
        return LayerOutcome(
            layer,
            message=f"ztoc skipped - layer {layer.digest} ({mt}) size {layer.size} is less than "
            f"min-layer-size {options.min_layer_size}",
        )
    try:
        compression = diff_compression(mt)
    except FormatError as exc:
        return LayerOutcome(layer, error=FormatError(f"layer {layer.digest}: {exc}"))
    if compression not in ("gzip", "uncompressed", "unknown"):
        return LayerOutcome(
            layer,
            message=f"ztoc skipped - layer {layer.digest} ({mt}) is compressed in an unsupported format. "
            f'expect: [tar, gzip, unknown] but got "{_algo_name(compression)}"',
        )
    xattr_opt = "xattr" in options.optimizations
    if not options.force:
        old = lookup_ztoc(layer.digest, options.span_size)
        if old is not None:
            try:
                disable = xattr_opt and _no_xattrs(ztoc.parse(old))
            except SociError as exc:
                return LayerOutcome(layer, error=FormatError(f"layer {layer.digest}: stored zTOC: {exc}"))
            d = ztoc_descriptor(sha256_digest(old), len(old), layer, options.span_size, disable)
            return LayerOutcome(
                layer,
                ztoc=d,
                reused=True,
                ztoc_bytes=old,
                message=f"layer {layer.digest} -> ztoc {d.digest} (already exists)",
            )
    try:
        reader = open_layer(layer)
        try:
            z = builder.build_ztoc(
                reader.read,
                span_size=options.span_size,
                compression=_compression_for_builder(compression),  # type: ignore[arg-type]
                build_tool=options.build_tool,
            )
            reader.finish()
        finally:
            reader.close()
        data = ztoc.serialize(z)
    except SociError as exc:
        return LayerOutcome(layer, error=type(exc)(f"layer {layer.digest}: {exc}"))
    except OSError as exc:
        return LayerOutcome(layer, error=SociError(f"layer {layer.digest}: {exc}"))
    disable = xattr_opt and _no_xattrs(z)
    d = ztoc_descriptor(sha256_digest(data), len(data), layer, options.span_size, disable)
    return LayerOutcome(layer, ztoc=d, ztoc_bytes=data, message=f"layer {layer.digest} -> ztoc {d.digest}")


def combine_errors(errors: list[SociError]) -> SociError:
    """``errors encountered while building soci layers; <err>[; <err>...]`` with the class the errors share
    (``NotFound`` when a blob was missing, ``FormatError`` for bad data), else ``SociError``."""
    msg = "errors encountered while building soci layers; " + "; ".join(str(e) for e in errors)
    kinds = {type(e) for e in errors}
    cls = kinds.pop() if len(kinds) == 1 else SociError
    return cls(msg)


def build_index(
    manifest_desc: Descriptor,
    manifest: Manifest,
    *,
    version: int,
    open_layer: Callable[[Descriptor], LayerReader],
    put_blob: Callable[[bytes], None],
    lookup_ztoc: Callable[[str, int], bytes | None] = lambda _d, _s: None,
    options: BuildOptions | None = None,
    emit: Callable[[str], None] = lambda _line: None,
) -> BuiltIndex:
    """Build the zTOCs of a platform manifest's layers and the SOCI index over them.

    Layers are processed concurrently; results keep layer order and their lines go to ``emit`` in layer
    order. Every zTOC (new or reused) and the index are handed to ``put_blob``. Nothing is stored when the
    build fails.

    Raises:
        SociError: ``errors encountered while building soci layers; ...`` (any per-layer error), or
            ``no ztocs created, all layers either skipped or produced errors``.
    """
    options = options or BuildOptions()
    layers = list(manifest.layers or [])
    workers = options.workers or min(4, os.cpu_count() or 1)

    def one(layer: Descriptor) -> LayerOutcome:
        return build_layer(layer, open_layer=open_layer, lookup_ztoc=lookup_ztoc, options=options)

    if workers > 1 and len(layers) > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soci-build") as pool:
            outcomes = list(pool.map(one, layers))
    else:
        outcomes = [one(layer) for layer in layers]
    errors = [o.error for o in outcomes if o.error is not None]
    if errors:
        raise combine_errors(errors)
    for o in outcomes:
        if o.message:
            emit(o.message)
    descs = [o.ztoc for o in outcomes if o.ztoc is not None]
    if not descs:
        raise NoZtocsError("no ztocs created, all layers either skipped or produced errors")
    m = index_manifest(descs, version=version, subject=manifest_desc, build_tool=options.build_tool)
    data = m.marshal()
    for o in outcomes:
        if o.ztoc_bytes is not None:
            put_blob(o.ztoc_bytes)
    put_blob(EMPTY_CONFIG)
    put_blob(data)
    desc = Descriptor(MT_OCI_MANIFEST, sha256_digest(data), len(data))
    return BuiltIndex(version, m, data, desc, tuple(outcomes))


# ---------------------------------------------------------------------------------------------------------
# The SOCI-enabled image (§4)


@dataclass(frozen=True)
class PlatformIndex:
    """A v2 index built for one platform manifest."""

    platform: Platform  # as requested
    manifest_descriptor: Descriptor  # the original platform manifest
    index: BuiltIndex


@dataclass(frozen=True)
class ConvertedImage:
    data: bytes  # the OCI image index
    descriptor: Descriptor
    index: ImageIndex
    manifest_digests: dict[str, str]  # original manifest digest -> rewritten manifest digest


def convert_image(
    root_descriptor: Descriptor,
    root_index: ImageIndex | None,
    built: list[PlatformIndex],
    *,
    read_manifest: Callable[[Descriptor], bytes | None],
    put_blob: Callable[[bytes], None],
    root_platform: Platform | None = None,
) -> ConvertedImage:
    """The v2 SOCI-enabled image of formats.md §4.

    Args:
        root_descriptor: the image's root (manifest or index/list).
        root_index: the decoded index when the root is one (``None`` for a single manifest).
        built: the v2 indexes, one per platform.
        read_manifest: bytes of a manifest blob, or ``None`` when it is not available locally.
        put_blob: stores each new blob (rewritten manifests, the new image index).
        root_platform: for a single-manifest image, the platform to record on its entry.
    """
    if root_index is not None:
        idx = replace(root_index, manifests=list(root_index.manifests or []), media_type=MT_OCI_INDEX)
    else:
        plat = root_platform or (built[0].platform if built else None)
        idx = ImageIndex(
            manifests=[replace(root_descriptor, platform=plat)], schema_version=2, media_type=MT_OCI_INDEX
        )
    by_manifest = {b.manifest_descriptor.digest: b for b in built}
    new_digest: dict[str, str] = {}
    entries = idx.manifests or []
    for i, d in enumerate(entries):
        if d.artifact_type in (ARTIFACT_TYPE_V1, ARTIFACT_TYPE_V2) or d.media_type in INDEX_TYPES:
            continue
        if d.media_type and d.media_type not in MANIFEST_TYPES:
            continue
        raw = read_manifest(d)
        if raw is None:
            continue
        m = Manifest.parse(raw, f"manifest {d.digest}")
        m.media_type = MT_OCI_MANIFEST
        m.config = replace(m.config, media_type=MT_OCI_CONFIG)
        b = by_manifest.get(d.digest)
        if b is not None:
            ann = dict(m.annotations or {})
            ann[ANN_INDEX_DIGEST] = b.index.descriptor.digest
            m.annotations = ann
        data = m.marshal()
        put_blob(data)
        digest = sha256_digest(data)
        new_digest[d.digest] = digest
        entries[i] = replace(
            d,
            media_type=MT_OCI_MANIFEST,
            digest=digest,
            size=len(data),
            annotations=dict(m.annotations) if m.annotations else None,
        )
    for b in built:
        manifest_digest = new_digest.get(b.manifest_descriptor.digest, b.manifest_descriptor.digest)
        sd = Descriptor(
            MT_OCI_MANIFEST,
            b.index.descriptor.digest,
            b.index.descriptor.size,
            annotations={ANN_MANIFEST_DIGEST: manifest_digest},
            platform=b.platform,
            artifact_type=ARTIFACT_TYPE_V2,
        )
        strict = PlatformMatcher(b.platform, strict=True)
        for i, d in enumerate(entries):
            if d.artifact_type == ARTIFACT_TYPE_V2 and d.platform is not None and strict.match(d.platform):
                entries[i] = sd
                break
        else:
            entries.append(sd)
    idx.manifests = entries
    data = idx.marshal()
    put_blob(data)
    return ConvertedImage(data, Descriptor(MT_OCI_INDEX, sha256_digest(data), len(data)), idx, new_digest)


def require_manifest(data: bytes | None, desc: Descriptor) -> bytes:
    if data is None:
        raise NotFound(f"manifest {desc.digest}: not present")
    return data
