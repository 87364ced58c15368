"""Lazily loaded images straight from a registry: resolve the image, find its SOCI index, open every layer.

Owns the path from an image reference to one :class:`~soci_fs.spans.RemoteLayer` per layer:

* resolution (:meth:`ImageSource.plan`): the image manifest for a platform (an image index is narrowed to
  the first manifest entry matching the platform that is not itself a SOCI index), then the SOCI index as
  the snapshotter finds it (formats.md §3): an explicit index digest wins; else v2, the
  ``com.amazon.soci.index-digest`` annotation on the image manifest (a failure to fetch or decode the
  manifest ends discovery with that error); else v1, the first referrer of the manifest whose artifact type
  is the v1 index type (the client falls back to the ``<alg>-<hex>`` referrers tag). The index and every
  zTOC are fetched from the image's own registry, digest- and size-verified, and parsed;
* a local copy of what is content-addressed (image manifests fetched by digest, SOCI indexes, zTOCs) in a
  :class:`~soci_fs.store.ContentStore`, read back (verified) before asking the registry, so an image named
  by digest whose spans are all in the block cache opens with no network at all. A tag always asks the
  registry;
* per layer with a zTOC, a ``fetch(start, end)`` that is one ranged read of the blob through the
  :class:`~soci_fs.registry.client.RegistryClient` (whose ``Credential`` is asked on every token fetch, so a
  rotated secret or an expired token is picked up by the next fetch, with nothing unmounted);
* layers without a zTOC (below the index's minimum layer size, or left out): the whole blob is fetched once,
  verified while it is written into the content store, and a zTOC is built for it locally; the layer is then
  served from the local blob through the same span manager (a memory-only block cache of its own, so its
  span ids never mix with those of a zTOC from a registry). Overlay stacking therefore works the same for
  lazy and local layers (whiteouts and opaque directories come from the same inode tree). Compressions other
  than gzip and uncompressed tar are refused (``FailedPrecondition``).
* what the FUSE side needs to know per layer besides its data (:meth:`OpenedLayer.serve_options`): the
  digest and size for the state file, and the zTOC descriptor's ``com.amazon.soci.disable-xattrs``;
* letting go of parsed zTOCs: a served layer needs its inode tree and span manager, not the zTOC they were
  built from (several MB per big layer), so :meth:`OpenedLayer.take_ztoc` hands it over once and
  :meth:`ImagePlan.without_ztoc` drops it from a kept plan; a plan without it reloads it on the next open.

Errors: ``NotFound`` (image, platform, index, blob), ``Unauthenticated``, ``Unavailable`` (registry
unreachable), ``FormatError`` (digest mismatch, bad index or zTOC), ``FailedPrecondition`` (a layer that
cannot be served).

Will not: mount anything (``soci_fs.mount`` serves the layers, the caller stacks them), pick credentials
(the caller hands the client its ``Credential``), or import the control plane.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from soci_fs import index as soci_index
from soci_fs import ztoc as ztoc_mod
from soci_fs.builder import build_ztoc
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.errors import FailedPrecondition, FormatError, NotFound, Unavailable
from soci_fs.operations import LocalBlob
from soci_fs.registry.client import (
    INDEX_TYPES,
    Descriptor,
    Manifest,
    RegistryClient,
    host_platform,
    select_platform,
)
from soci_fs.registry.reference import Reference
from soci_fs.spanread import Fetch
from soci_fs.spans import RemoteLayer, SpanConfig
from soci_fs.store import ContentStore
from soci_fs.ztoc import Ztoc

__all__ = [
    "ImagePlan",
    "ImageSource",
    "LayerPlan",
    "OpenedLayer",
    "blob_fetch",
    "open_layer",
]

log = logging.getLogger(__name__)

SOCI_ARTIFACT_TYPES = (soci_index.ARTIFACT_TYPE_V1, soci_index.ARTIFACT_TYPE_V2)
LOCAL_SPAN_SIZE = 1 << 20
MAX_ZTOC_SIZE = 256 << 20

HOW_EXPLICIT = "--index-digest"
HOW_V2 = "v2 annotation"
HOW_V1 = "v1 referrers"


@dataclass(frozen=True)
class LayerPlan:
    """One layer of the image and, when the index has one, its zTOC (parsed and verified).

    A lazy layer's plan may leave the parsed zTOC out (:meth:`without_ztoc`, once the layer is served):
    :func:`open_layer` then loads it again through the :class:`ImageSource` (its local copy first).
    """

    descriptor: Descriptor
    ztoc_descriptor: Descriptor | None = None
    ztoc: Ztoc | None = None

    @property
    def lazy(self) -> bool:
        """The index has a zTOC for this layer (whether or not the plan still holds it parsed)."""
        return self.ztoc is not None or self.ztoc_descriptor is not None

    def without_ztoc(self) -> LayerPlan:
        """This plan without the parsed zTOC (the descriptor is kept, so the layer is still lazy)."""
        return self if self.ztoc is None else dataclasses.replace(self, ztoc=None)

    @property
    def disable_xattrs(self) -> bool:
        """The zTOC descriptor's ``com.amazon.soci.disable-xattrs`` (Go ``ParseBool``; invalid -> false)."""
        if self.ztoc_descriptor is None:
            return False
        value = (self.ztoc_descriptor.annotations or {}).get(soci_index.ANN_DISABLE_XATTRS, "")
        return value in ("1", "t", "T", "TRUE", "true", "True")


@dataclass(frozen=True)
class ImagePlan:
    """A resolved image: its manifest, the SOCI index used and how it was found, the layers base first."""

    ref: Reference
    manifest: Manifest
    index_digest: str
    index_version: int
    how: str
    layers: tuple[LayerPlan, ...]

    def without_ztoc(self, digest: str) -> ImagePlan:
        """This plan with the parsed zTOC of layer ``digest`` left out (see :meth:`LayerPlan.without_ztoc`):
        what a caller keeps once that layer is served, so the zTOC's entries are not held twice."""
        layers = tuple(lp.without_ztoc() if lp.descriptor.digest == digest else lp for lp in self.layers)
        if all(a is b for a, b in zip(layers, self.layers, strict=True)):
            return self
        return dataclasses.replace(self, layers=layers)


def _platform_matches(platform: str, entry: Mapping[str, Any]) -> bool:
    try:
        select_platform({"manifests": [entry]}, platform)
    except NotFound:
        return False
    return True


class ImageSource:
    """The registry (through ``client``) plus the local content store, for one image reference.

    Blocking (HTTP and disk): call from a worker thread when on an event loop.
    """

    def __init__(self, client: RegistryClient, ref: Reference, content: ContentStore) -> None:
        self.client = client
        self.ref = ref
        self.content = content
        content.init()

    # ---- content-addressed objects, local copy first

    def _local(self, digest: str, size: int | None) -> bytes | None:
        if not self.content.has(digest):
            return None
        try:
            return self.content.read(digest, size)
        except FormatError as exc:  # a damaged local copy: drop it and fetch again
            log.warning("local copy of %s is damaged (%s); fetching it again", digest, exc)
            self.content.delete(digest)
            return None

    def manifest_by_digest(self, digest: str) -> Manifest:
        """A manifest fetched by digest (immutable): the local copy when present, else the registry's."""
        data = self._local(digest, None)
        if data is not None:
            media_type = ""
            try:
                media_type = str(Manifest("", digest, data).json().get("mediaType", ""))
            except FormatError:
                pass
            return Manifest(media_type, digest, data)
        m = self.client.get_manifest(self.ref, digest)
        self.content.put(m.data, digest)
        return m

    def blob(self, desc: Descriptor, *, max_size: int = MAX_ZTOC_SIZE) -> bytes:
        """A small blob (zTOC), verified: the local copy when present, else the registry's (then kept)."""
        data = self._local(desc.digest, desc.size)
        if data is not None:
            return data
        if desc.size > max_size:
            raise FormatError(f"blob {desc.digest}: size {desc.size} exceeds the limit of {max_size} bytes")
        data = self.client.get_blob(self.ref, desc.digest, size=desc.size)
        self.content.put(data, desc.digest)
        return data

    # ---- resolution

    def image_manifest(self, platform: str | None = None) -> Manifest:
        """The image manifest of the reference for ``platform`` (default: this host's)."""
        platform = platform or host_platform()
        if self.ref.digest:
            top = self.manifest_by_digest(self.ref.digest)
        else:
            top = self.client.get_manifest(self.ref)
        if top.media_type not in INDEX_TYPES and top.json().get("mediaType") not in INDEX_TYPES:
            return top
        entries = [
            m
            for m in top.json().get("manifests") or []
            if isinstance(m, dict)
            and m.get("artifactType") not in SOCI_ARTIFACT_TYPES
            and m.get("mediaType") not in INDEX_TYPES
        ]
        for entry in entries:
            if _platform_matches(platform, entry):
                return self.manifest_by_digest(Descriptor.from_json(entry).digest)
        raise NotFound(f"image {self.ref}: no manifest for platform {platform} in its image index")

    def find_index(
        self, manifest: Manifest, *, explicit: str = "", v2: bool = True, v1: bool = True
    ) -> tuple[str, str]:
        """``(index digest, how it was found)`` (formats.md §3), or ``("", "")`` when there is none."""
        if explicit:
            return explicit, HOW_EXPLICIT
        if v2:
            annotations = manifest.json().get("annotations") or {}
            found = str(annotations.get(soci_index.ANN_INDEX_DIGEST, "") or "")
            if found:
                return found, HOW_V2
        if v1:
            refs = self.client.referrers(self.ref, manifest.digest, soci_index.ARTIFACT_TYPE_V1)
            if refs:
                return refs[0].digest, HOW_V1
        return "", ""

    def plan(
        self, *, platform: str | None = None, index_digest: str = "", v2: bool = True, v1: bool = True
    ) -> ImagePlan:
        """Resolve the image, find and fetch its SOCI index and zTOCs.

        Raises:
            NotFound: no such image/platform, or no SOCI index (the message says where it looked).
            Unauthenticated / Unavailable / FormatError: from the registry or the content.
        """
        manifest = self.image_manifest(platform)
        digest, how = self.find_index(manifest, explicit=index_digest, v2=v2, v1=v1)
        if not digest:
            looked = " and ".join(
                x
                for x, on in (
                    (f"the {soci_index.ANN_INDEX_DIGEST} annotation", v2),
                    ("the referrers of the manifest", v1),
                )
                if on
            )
            raise NotFound(
                f"image {self.ref}: no SOCI index for manifest {manifest.digest} "
                f"(looked at {looked or 'nothing'})"
            )
        index_data = self.manifest_by_digest(digest).data
        idx = soci_index.parse_index(index_data, f"SOCI index {digest}")
        doc = manifest.json()
        layers: list[LayerPlan] = []
        for raw in doc.get("layers") or []:
            desc = Descriptor.from_json(raw)
            ref = idx.ztoc_for_layer(desc.digest)
            if ref is None:
                layers.append(LayerPlan(desc))
                continue
            zdesc = Descriptor(
                ref.descriptor.media_type,
                ref.descriptor.digest,
                ref.descriptor.size,
                annotations=dict(ref.descriptor.annotations or {}),
            )
            layers.append(LayerPlan(desc, zdesc, self.load_ztoc(desc, zdesc)))
        log.info(
            "image %s: manifest %s, SOCI index %s (%s), %d layers, %d with a zTOC",
            self.ref,
            manifest.digest,
            digest,
            how,
            len(layers),
            sum(1 for x in layers if x.lazy),
        )
        return ImagePlan(self.ref, manifest, digest, idx.version, how, tuple(layers))

    def load_ztoc(self, desc: Descriptor, zdesc: Descriptor) -> Ztoc:
        """The zTOC ``zdesc`` of layer ``desc``: fetched (local copy first), verified, parsed, size-checked.

        Raises:
            FormatError: a bad zTOC, or one that describes a blob of another size than the layer's.
            NotFound / Unauthenticated / Unavailable: from the registry.
        """
        try:
            z = ztoc_mod.parse(self.blob(zdesc))
        except FormatError as exc:
            raise FormatError(f"zTOC {zdesc.digest} of layer {desc.digest}: {exc}") from exc
        if z.compressed_archive_size and desc.size and z.compressed_archive_size != desc.size:
            raise FormatError(
                f"zTOC {zdesc.digest} describes a {z.compressed_archive_size}-byte blob, but layer "
                f"{desc.digest} is {desc.size} bytes"
            )
        return z

    # ---- layers without a zTOC

    def download_layer(self, desc: Descriptor) -> tuple[Path, int]:
        """The whole layer blob in the content store (verified while written): ``(path, bytes fetched)``."""
        if self.content.has(desc.digest) and self.content.size(desc.digest) == desc.size:
            return self.content.blob_path(desc.digest), 0
        blob = self.client.blob(self.ref, desc.digest, size=desc.size)
        got = 0
        with self.content.writer(desc.digest, desc.size) as write:
            for chunk in blob.read_all():
                write(chunk)
                got += len(chunk)
        return self.content.blob_path(desc.digest), got


def blob_fetch(client: RegistryClient, ref: Reference, desc: Descriptor) -> Fetch:
    """``fetch(start, end)``: one HTTP range read of the layer blob (retries, redirects, auth inside).

    An answer that does not describe the requested range (a wrong ``Content-Range``, a multipart body) says
    nothing about the blob's content, so it is reported as ``Unavailable``: the span manager retries it
    within the fetch timeout. Wrong *content* is caught by the span digests, not here.
    """
    blob = client.blob(ref, desc.digest, size=desc.size)

    def fetch(start: int, end: int) -> bytes:
        try:
            return blob.read(start, end - start)
        except FormatError as exc:
            raise Unavailable(f"blob {desc.digest} range [{start}, {end}): {exc}") from exc

    return fetch


def _compression(desc: Descriptor) -> str:
    kind = soci_index.diff_compression(desc.media_type)
    if kind == "gzip":
        return "gzip"
    if kind in ("uncompressed", "unknown"):
        return "tar"
    raise FailedPrecondition(
        f"layer {desc.digest}: media type {desc.media_type} has no zTOC and cannot be indexed here "
        f"(only gzip and uncompressed tar layers can)"
    )


def _local_ztoc(path: Path, desc: Descriptor, span_size: int) -> Ztoc:
    with open(path, "rb") as f:
        return build_ztoc(f.read, span_size=span_size, compression=_compression(desc))  # type: ignore[arg-type]


@dataclass
class OpenedLayer:
    """A layer ready to serve: its zTOC, its span manager, and where the data comes from.

    The zTOC is only needed to build the layer's inode tree (``Session.add_layer``); the served layer keeps
    the tree and the span manager. Hand it over with :meth:`take_ztoc` so it is not kept for the layer's
    lifetime (``ztoc`` is ``None`` afterwards).
    """

    plan: LayerPlan
    ztoc: Ztoc | None
    data: RemoteLayer
    lazy: bool
    downloaded: int = 0  # bytes of a whole blob fetched for a local layer (0 when it was stored already)
    local_blob: LocalBlob | None = None

    @property
    def digest(self) -> str:
        return self.plan.descriptor.digest

    @property
    def size(self) -> int:
        """The layer blob's length (its descriptor's size)."""
        return self.plan.descriptor.size

    @property
    def disable_xattrs(self) -> bool:
        """The zTOC descriptor's ``com.amazon.soci.disable-xattrs`` (false for a layer indexed here)."""
        return self.lazy and self.plan.disable_xattrs

    def take_ztoc(self) -> Ztoc:
        """The zTOC, forgotten here and in :attr:`plan` (call once, to add the layer to a session).

        Raises:
            FailedPrecondition: it was taken already.
        """
        z = self.ztoc
        if z is None:
            raise FailedPrecondition(f"layer {self.digest}: its zTOC was handed over already")
        self.ztoc = None
        self.plan = self.plan.without_ztoc()
        return z

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments of ``soci_fs.mount.Session.add_layer`` that describe this layer: its
        digest and size (the state file) and ``disable_xattrs`` from the zTOC descriptor."""
        return {"digest": self.digest, "size": self.size, "disable_xattrs": self.disable_xattrs}

    def close(self) -> None:
        self.data.close()
        if self.local_blob is not None:
            self.local_blob.close()
            self.local_blob = None


async def open_layer(
    source: ImageSource,
    plan: LayerPlan,
    cache: BlockCache,
    *,
    span_config: SpanConfig | None = None,
    fetch_limiter: trio.CapacityLimiter | None = None,
    inflate_limiter: trio.CapacityLimiter | None = None,
    local_span_size: int = LOCAL_SPAN_SIZE,
    wrap_fetch: Callable[[Fetch], Fetch] | None = None,
    check_header: bool = True,
    metrics: Callable[[str, float], None] | None = None,
) -> OpenedLayer:
    """Open one layer on the trio loop: lazily through its zTOC, or locally (whole blob) without one.

    A lazy layer whose plan no longer holds its parsed zTOC (:meth:`LayerPlan.without_ztoc`) loads it again
    through ``source`` (:meth:`ImageSource.load_ztoc`: the local copy first). Hand the zTOC of the returned
    layer to the session with :meth:`OpenedLayer.take_ztoc`.

    ``wrap_fetch`` lets a caller (tests, metrics) see or alter every remote fetch. ``check_header=False``
    opens a lazy layer with no network at all (a restart while the registry is away: reads fetch later).
    ``metrics`` is the lazy layer's ``metrics(name, value)`` hook (see ``soci_fs.spans``).

    Raises:
        SociError: see the module docstring; a lazy layer's gzip header is fetched and checked unless all its
            spans are in the block cache already.
    """
    kw: dict[str, Any] = {
        "config": span_config,
        "fetch_limiter": fetch_limiter,
        "inflate_limiter": inflate_limiter,
    }
    desc = plan.descriptor
    if plan.lazy:
        z = plan.ztoc
        if z is None:  # left out of the plan (a layer served before): its local copy, else the registry
            assert plan.ztoc_descriptor is not None
            z = await trio.to_thread.run_sync(source.load_ztoc, desc, plan.ztoc_descriptor)
        fetch = blob_fetch(source.client, source.ref, desc)
        if wrap_fetch is not None:
            fetch = wrap_fetch(fetch)
        data = await RemoteLayer.open(
            z, fetch, desc.digest, cache, check_header=check_header, metrics=metrics, **kw
        )
        return OpenedLayer(plan, z, data, lazy=True)
    path, got = await trio.to_thread.run_sync(source.download_layer, desc)
    z = await trio.to_thread.run_sync(_local_ztoc, path, desc, local_span_size)
    blob = LocalBlob(path)
    try:
        own_cache = BlockCache(None, CacheConfig(max_memory_bytes=cache.config.max_memory_bytes))
        data = await RemoteLayer.open(z, blob, desc.digest, own_cache, **kw)
    except BaseException:
        blob.close()
        raise
    return OpenedLayer(plan, z, data, lazy=False, downloaded=got, local_blob=blob)
