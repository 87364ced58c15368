"""Images and blobs in containerd's content store, seen the way the ``soci`` commands see OCI layouts.

Owns:

* :func:`get_image`: the image record a command names (the name as given, then its normalized form, so
  ``nginx`` finds ``docker.io/library/nginx:latest``), with errors that name the image and the namespace;
* :class:`ContainerdImage`: one image record read through the :class:`~soci_fs.oci.Layout` interface. A
  layout's read paths all go through ``index_json`` / ``has_blob`` / ``read_blob`` / ``open_blob`` /
  ``read_range``; this class answers them from containerd (``index.json`` is the image record's target), so
  root resolution, platform selection and the index builders run unchanged over a layout or over containerd.
  Layers are streamed in windows of :data:`WINDOW` bytes (one ``Content.Read`` each) and verified against
  their digest and size as a layout's are;
* :func:`manifest_digests`: the manifest digests an image name stands for (``--ref`` of the read-only
  commands);
* :class:`LazyClient` and :class:`ContainerdContent`: a connection made on first use, and the read side of
  :class:`~soci_fs.store.ContentStore` (``has``, ``size``, ``read``, ``read_range``) over containerd's
  content store through it;
* :class:`ContainerdSink`: writes blobs into containerd's content store with their GC labels (labels are set
  at commit, or added when containerd has the blob already);
* the GC labels SOCI artifacts carry in containerd (what keeps them once the lease of the command ends):
  a SOCI index references its ``{}`` config (``containerd.io/gc.ref.content.config``) and its zTOCs
  (``containerd.io/gc.ref.content.ztoc.<i>``); an image manifest its config and layers (``...config``,
  ``...l.<i>``, as containerd's own import does); an image index its manifests (``...m.<i>``); an image
  record its v1 SOCI index (``containerd.io/gc.ref.content.soci-index``).

Thread use: the index builders read layers from several threads at once. That is safe here because every
call made during a build runs inside one ``ContainerdClient.lease`` block (the lease id does not change
while the threads run) and gRPC channels are thread-safe.

Will not: decide what to build or where artifacts are recorded (``cmd_create`` / ``cmd_convert`` do), talk
to registries, or delete anything from containerd.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from soci_fs import index as soci_index
from soci_fs.errors import FailedPrecondition, FormatError, InvalidArgument, NotFound, Unavailable
from soci_fs.oci import (
    INDEX_TYPES,
    MT_OCI_INDEX,
    Descriptor,
    ImageIndex,
    Layout,
    Manifest,
    Platform,
    VerifyingReader,
    sha256_digest,
    verify_bytes,
)
from soci_fs.registry import reference
from soci_fs.registry.client import Descriptor as CtrDescriptor
from soci_grpc.containerd import ContainerdClient, Image

log = logging.getLogger(__name__)

WINDOW = 4 << 20  # bytes per Content.Read call when a layer is streamed

LABEL_GC_CONFIG = "containerd.io/gc.ref.content.config"
LABEL_GC_LAYER = "containerd.io/gc.ref.content.l."
LABEL_GC_MANIFEST = "containerd.io/gc.ref.content.m."
LABEL_GC_ZTOC = "containerd.io/gc.ref.content.ztoc."
LABEL_SOCI_INDEX = "containerd.io/gc.ref.content.soci-index"


# ---------------------------------------------------------------------------------------------------------
# Descriptors between the two types


def oci_descriptor(d: CtrDescriptor) -> Descriptor:
    """The :mod:`soci_fs.oci` descriptor of an image record's target."""
    return Descriptor(d.media_type, d.digest, d.size, annotations=dict(d.annotations) or None)


def ctr_descriptor(d: Descriptor) -> CtrDescriptor:
    """The descriptor :class:`~soci_grpc.containerd.ImagesService` takes for an image record's target."""
    return CtrDescriptor(d.media_type, d.digest, d.size, annotations=dict(d.annotations or {}))


# ---------------------------------------------------------------------------------------------------------
# Image records


def get_image(client: ContainerdClient, ref: str) -> Image:
    """The image record ``ref``: the name as given, else its normalized form.

    Raises:
        NotFound: no record under either name in the client's namespace.
        Unavailable: containerd cannot be reached (the message says where it was looked for).
    """
    names = [ref]
    try:
        normalized = str(reference.parse(ref, normalize=True))
    except InvalidArgument:
        normalized = ref
    if normalized != ref:
        names.append(normalized)
    for name in names:
        try:
            return client.images.get(name)
        except NotFound:
            log.debug("no image %r in containerd namespace %s", name, client.namespace)
        except Unavailable as exc:
            raise Unavailable(
                f"image {ref!r}: cannot reach containerd (is it running? --address): {exc}"
            ) from exc
    tried = " or ".join(repr(n) for n in names)
    raise NotFound(f"image {tried} not found in containerd (namespace {client.namespace!r})")


def platform_label_key(p: Platform) -> str:
    """``containerd.io/gc.ref.content.soci-index.<os>-<arch>[-<variant>]``: one index per platform kept."""
    return f"{LABEL_SOCI_INDEX}.{str(p).replace('/', '-')}"


# ---------------------------------------------------------------------------------------------------------
# Reading


class _WindowReader:
    """A blob of containerd's content store read front to back, :data:`WINDOW` bytes per call."""

    def __init__(self, client: ContainerdClient, digest: str, size: int) -> None:
        self._client = client
        self._digest = digest
        self._size = size
        self._offset = 0  # of the next window
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        if not self._buf:
            if self._offset >= self._size:
                return b""
            want = min(WINDOW, self._size - self._offset)
            data = self._client.content.read(self._digest, offset=self._offset, size=want)
            if not data:
                return b""  # shorter than its descriptor: the verifying reader says so
            self._offset += len(data)
            self._buf = memoryview(data)
        take = len(self._buf) if n is None or n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:take])
        self._buf = self._buf[take:]
        return out

    def close(self) -> None:
        self._buf = memoryview(b"")


class ContainerdImage(Layout):
    """An image record of containerd, read like an OCI layout whose ``index.json`` names its target.

    ``source`` (used in messages) names the image and the namespace. Presence answers are cached for the
    life of the object; blob bytes are not.
    """

    def __init__(self, client: ContainerdClient, image: Image) -> None:
        super().__init__(Path("/"), source=f"image {image.name} (containerd namespace {client.namespace})")
        self.client = client
        self.image = image
        self.target = oci_descriptor(image.target)
        self._present: dict[str, bool] = {}

    def _what(self, digest: str, media_type: str = "") -> str:
        kind = f" ({media_type})" if media_type else ""
        return f"blob {digest}{kind} of {self.source}"

    def blob_path(self, digest: str) -> Path:
        raise FailedPrecondition(f"{self._what(digest)}: blobs in containerd have no path")

    def has_blob(self, digest: str) -> bool:
        if digest not in self._present:
            self._present[digest] = self.client.content.has(digest)
        return self._present[digest]

    def _absent(self, desc: Descriptor) -> NotFound:
        return NotFound(f"{self._what(desc.digest, desc.media_type)}: not in containerd's content store")

    def read_blob(self, desc: Descriptor) -> bytes:
        """The verified bytes of a (small) blob. ``NotFound`` when containerd does not have it."""
        try:
            data = self.client.content.read(desc.digest)
        except NotFound as exc:
            raise self._absent(desc) from exc
        return verify_bytes(data, desc.digest, desc.size, self._what(desc.digest, desc.media_type))

    def open_blob(self, desc: Descriptor, tee: Callable[[bytes], None] | None = None) -> VerifyingReader:
        """A verifying reader over the blob, streamed in windows."""
        if not self.has_blob(desc.digest):
            raise self._absent(desc)
        raw = _WindowReader(self.client, desc.digest, desc.size)
        return VerifyingReader(raw, desc.digest, desc.size, self._what(desc.digest, desc.media_type), tee)  # type: ignore[arg-type]

    def read_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        try:
            data = self.client.content.read(desc.digest, offset=offset, size=length)
        except NotFound as exc:
            raise self._absent(desc) from exc
        if len(data) != length:
            raise FormatError(
                f"{self._what(desc.digest)}: short read at {offset} ({len(data)} of {length} bytes)"
            )
        return data

    def all_blobs(self) -> Iterator[tuple[str, Path]]:
        return iter(())

    def index_json(self) -> ImageIndex:
        if not self.has_blob(self.target.digest):
            raise NotFound(
                f"{self.source}: its target {self.target.media_type} {self.target.digest} is not in "
                "containerd's content store"
            )
        return ImageIndex(manifests=[self.target], media_type=MT_OCI_INDEX)

    def manifest_digests(self) -> list[str]:
        """The image's manifest digests: the target itself, or every platform manifest its index lists."""
        root = self.resolve_root()
        if root.index is None:
            return [root.descriptor.digest]
        return [d.digest for d in self._manifest_candidates(root.index)]


def manifest_digests(client: ContainerdClient, ref: str) -> list[str]:
    """The manifest digests of image ``ref`` in containerd (``soci index list --ref`` and friends)."""
    return ContainerdImage(client, get_image(client, ref)).manifest_digests()


class LazyClient:
    """A :class:`ContainerdClient` made on first use (so commands that never need containerd never make
    one, and a bad ``--address`` only matters when it is used)."""

    def __init__(self, address: str, namespace: str, timeout: float | None = None) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._client: ContainerdClient | None = None

    def get(self) -> ContainerdClient:
        if self._client is None:
            self._client = ContainerdClient(self.address, self.namespace, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class ContainerdContent:
    """Blobs by digest in containerd's content store, with the read methods of the local ``ContentStore``."""

    def __init__(self, client: LazyClient) -> None:
        self._lazy = client

    @property
    def client(self) -> ContainerdClient:
        return self._lazy.get()

    @property
    def where(self) -> str:
        return f"containerd's content store (namespace {self._lazy.namespace!r})"

    def has(self, digest: str) -> bool:
        return self.client.content.has(digest)

    def size(self, digest: str) -> int:
        try:
            return self.client.content.info(digest).size
        except NotFound as exc:
            raise NotFound(f"blob {digest}: not in {self.where}") from exc

    def read(self, digest: str, size: int | None = None) -> bytes:
        try:
            data = self.client.content.read(digest)
        except NotFound as exc:
            raise NotFound(f"blob {digest}: not in {self.where}") from exc
        return verify_bytes(data, digest, size, f"blob {digest} in {self.where}")

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        try:
            data = self.client.content.read(digest, offset=offset, size=length)
        except NotFound as exc:
            raise NotFound(f"blob {digest}: not in {self.where}") from exc
        if len(data) != length:
            raise FormatError(f"blob {digest}: short read at {offset} ({len(data)} of {length} bytes)")
        return data


# ---------------------------------------------------------------------------------------------------------
# Writing


def soci_index_labels(index: Manifest) -> dict[str, str]:
    """GC labels of a SOCI index: its ``{}`` config and its zTOCs (prefetch blobs are referenced too)."""
    labels = {LABEL_GC_CONFIG: index.config.digest}
    for i, d in enumerate(index.layers or []):
        labels[f"{LABEL_GC_ZTOC}{i}"] = d.digest
    return labels


def manifest_labels(manifest: Manifest) -> dict[str, str]:
    """GC labels of an image manifest: its config and layers."""
    labels = {LABEL_GC_CONFIG: manifest.config.digest}
    for i, d in enumerate(manifest.layers or []):
        labels[f"{LABEL_GC_LAYER}{i}"] = d.digest
    return labels


def index_labels(index: ImageIndex) -> dict[str, str]:
    """GC labels of an image index: every manifest it lists."""
    return {f"{LABEL_GC_MANIFEST}{i}": d.digest for i, d in enumerate(index.manifests or [])}


def labels_for(data: bytes, media_type: str) -> dict[str, str]:
    """The GC labels of a manifest-like blob by what it is (SOCI index, image manifest, image index)."""
    if media_type in INDEX_TYPES:
        return index_labels(ImageIndex.parse(data, "image index"))
    m = Manifest.parse(data, "manifest")
    if m.config.media_type in (soci_index.ARTIFACT_TYPE_V1, soci_index.ARTIFACT_TYPE_V2):
        return soci_index_labels(m)
    return manifest_labels(m)


class ContainerdSink:
    """Writes blobs into containerd's content store (inside the caller's lease)."""

    def __init__(self, client: ContainerdClient) -> None:
        self.client = client

    def put(self, data: bytes, labels: Mapping[str, str] | None = None) -> str:
        """Store ``data`` with ``labels``; when containerd has it already, add the labels. Its digest."""
        digest = sha256_digest(data)
        content = self.client.content
        if not content.write(f"soci-{digest}", data, digest, len(data), labels) and labels:
            content.update_labels(digest, labels)
        log.debug("blob %s in containerd's content store (labels %s)", digest, sorted(labels or {}))
        return digest
