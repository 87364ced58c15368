"""``soci image rpull``: pull an image into containerd and unpack it for a snapshotter (default ``soci``).

What containerd's ``client.Pull`` with unpack does, plus the labels SOCI's handler wrapper adds for the
snapshotter (upstream's ``soci image rpull`` up to v0.4, here without containerd's Go client):

1. Resolve REF in its registry (``--user``, else the credential chain of the config, as ``soci mount``);
   an image index is narrowed to the first manifest of ``--platform`` (default: this host's) that is not a
   SOCI index. ``fetching <digest[:15]>... <mediaType>`` is printed for every descriptor handled.
2. Under a containerd lease (sent as ``containerd-lease`` metadata with every call, deleted at the end): the
   index (if any), the manifest and the config are written into containerd's content store, digest- and
   size-verified (what containerd has already is read back from it and checked instead of fetched again),
   with containerd's GC labels: ``containerd.io/gc.ref.content.m.<i>`` on the index,
   ``containerd.io/gc.ref.content.config`` on the manifest, and ``containerd.io/gc.ref.content.l.<i>`` on
   the manifest for each layer whose blob is downloaded; every blob gets
   ``containerd.io/distribution.source.<host>=<repository>``.
3. Layers are unpacked in order through containerd's snapshots service (``snapshotter=--snapshotter``),
   named by chain ID (``chainID(0) = diffID(0)``, ``chainID(n) = sha256(chainID(n-1) + " " + diffID(n))``,
   the diff IDs from the config's ``rootfs.diff_ids``): a chain ID that ``Stat`` finds is already unpacked;
   otherwise ``Prepare("extract-<nanos>-<random> <chainID>", parent)`` with the labels of
   :func:`layer_labels`. ``ALREADY_EXISTS`` from that Prepare followed by a ``Stat`` that finds the chain ID
   means the snapshotter provided the layer itself (a lazily loaded layer); otherwise the layer blob is
   streamed from the registry into the content store (verified), ``Diff.Apply`` unpacks it onto the
   Prepare's mounts, the applied digest must be the diff ID, and the snapshot is committed under the chain
   ID (any failure removes the active snapshot). The layer blob then gets ``containerd.io/uncompressed``.
4. The config gets ``containerd.io/gc.ref.snapshot.<snapshotter>=<top chain ID>`` (how containerd records
   that the image is unpacked for that snapshotter) and the image record ``REF`` (normalized) is created or
   pointed at the new target (the index or manifest as fetched). The last line says how many layers were
   unpacked and how.

Errors follow the exit-code table of ``common.py``; messages name the object and never hold secrets.

Will not: pull more than one platform, convert schema 1 manifests, verify signatures, or pass registry
credentials to the snapshotter (the snapshotter finds its own, as with any other pull).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from soci_fs.errors import (
    AlreadyExists,
    FailedPrecondition,
    FormatError,
    NotFound,
    SociError,
    Unauthenticated,
)
from soci_fs.index import ARTIFACT_TYPE_V1, ARTIFACT_TYPE_V2, is_layer_type
from soci_fs.registry import reference
from soci_fs.registry.client import (
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    RegistryClient,
    host_platform,
    select_platform,
    sha256_digest,
)
from soci_fs.registry.reference import Reference
from soci_grpc.cli.cmd_mount import credentials, load_config
from soci_grpc.config import DEFAULT_CONFIG_PATH
from soci_grpc.containerd import ContainerdClient, Mount

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOTTER = "soci"
MAX_LABEL = 4096  # containerd's limit on len(key) + len(value)
MAX_CONFIG_SIZE = 16 << 20
PREPARE_TRIES = 3

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
LABEL_SOCI_SIZE = "containerd.io/snapshot/remote/soci.size"
LABEL_LAYERS_SIZE = "containerd.io/snapshot/remote/image.layers.size"
LABEL_SOCI_INDEX = "containerd.io/snapshot/remote/soci.index.digest"
LABEL_GC_CONFIG = "containerd.io/gc.ref.content.config"
LABEL_GC_LAYER = "containerd.io/gc.ref.content.l."
LABEL_GC_MANIFEST = "containerd.io/gc.ref.content.m."
LABEL_GC_SNAPSHOT = "containerd.io/gc.ref.snapshot."
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
LABEL_DIST_SOURCE = "containerd.io/distribution.source."


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``image`` (with ``rpull``) to the ``soci`` command tree."""
    p = sub.add_parser(
        "image",
        parents=parents,
        help="manage images in containerd",
        description="Manage images in containerd (--address, --namespace).",
    )
    isub = p.add_subparsers(dest="image_command", metavar="COMMAND")
    p.set_defaults(func=lambda args: _usage(p))
    r = isub.add_parser(
        "rpull",
        parents=parents,
        help="pull an image into containerd and unpack it for the soci snapshotter",
        description="Fetch IMAGE_REF into containerd's content store and unpack it through containerd's "
        "snapshots service for --snapshotter (default soci), which may provide layers itself (lazily). "
        "Afterwards `ctr run --snapshotter soci IMAGE_REF ...` finds the image unpacked. Credentials: "
        "--user, else the credential chain of the config (Docker config; Kubernetes secrets when enabled).",
    )
    r.add_argument("image_ref", metavar="IMAGE_REF", help="image reference (registry/repo[:tag][@digest])")
    r.add_argument(
        "--user",
        "-u",
        metavar="USER[:PASSWORD]",
        help="registry credentials; USER alone asks for the password when stdin is a terminal",
    )
    r.add_argument("--plain-http", action="store_true", help="use plain http (not https) for the registry")
    r.add_argument(
        "--snapshotter",
        default=DEFAULT_SNAPSHOTTER,
        help=f"snapshotter to unpack for (default {DEFAULT_SNAPSHOTTER})",
    )
    r.add_argument(
        "--soci-index-digest",
        metavar="DIGEST",
        default="",
        help="SOCI index for the snapshotter to use (passed as a snapshot label)",
    )
    r.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pull (default: this host's)")
    r.add_argument(
        "--config",
        metavar="PATH",
        help=f"snapshotter config.toml for the credential chain and registry settings "
        f"(default {DEFAULT_CONFIG_PATH} when it exists)",
    )
    r.set_defaults(func=run_rpull)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------------
# pure parts


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of every prefix of ``diff_ids`` (OCI image spec: the snapshot names of the layers)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def join_within_limit(key: str, items: Iterable[str]) -> tuple[str, int]:
    """``items`` comma-joined, cut before the first item that would make ``key`` + value exceed containerd's
    label limit; returns (value, number of items kept)."""
    value = ""
    n = 0
    for item in items:
        candidate = f"{value},{item}" if n else item
        if len(key.encode()) + len(candidate.encode()) > MAX_LABEL:
            break
        value, n = candidate, n + 1
    return value, n


def layer_labels(
    *,
    chain_id: str,
    image_ref: str,
    manifest_digest: str,
    layers: Sequence[Descriptor],
    index: int,
    soci_index_digest: str = "",
) -> dict[str, str]:
    """The labels of the Prepare for ``layers[index]``: containerd's unpack and CRI labels plus SOCI's.

    ``cri.image-ref`` and ``cri.manifest-digest`` key the image for the snapshotter; ``cri.image-layers`` and
    ``remote/image.layers.size`` list this layer and the ones after it (the same count in both, cut to fit
    the label limit), which is what a snapshotter needs to prefetch the rest of the image.
    """
    rest = layers[index:]
    digests, n = join_within_limit(LABEL_IMAGE_LAYERS, (d.digest for d in rest))
    sizes, m = join_within_limit(LABEL_LAYERS_SIZE, (str(d.size) for d in rest[:n]))
    if m < n:  # sizes are shorter than digests, so this never happens; keep the counts equal regardless
        digests, _ = join_within_limit(LABEL_IMAGE_LAYERS, (d.digest for d in rest[:m]))
    layer = layers[index]
    labels = {
        LABEL_SNAPSHOT_REF: chain_id,
        LABEL_IMAGE_REF: image_ref,
        LABEL_MANIFEST_DIGEST: manifest_digest,
        LABEL_LAYER_DIGEST: layer.digest,
        LABEL_IMAGE_LAYERS: digests,
        LABEL_SOCI_SIZE: str(layer.size),
        LABEL_LAYERS_SIZE: sizes,
    }
    if soci_index_digest:
        labels[LABEL_SOCI_INDEX] = soci_index_digest
    return labels


def unpack_key(chain_id: str) -> str:
    """A fresh key for the active snapshot a layer is extracted into (containerd's ``extract-`` form)."""
    unique = base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()
    return f"extract-{time.time_ns() % 1_000_000_000}-{unique} {chain_id}"


def content_ref(desc: Descriptor) -> str:
    """The ingest ref containerd's fetcher uses for a descriptor (``layer-``, ``manifest-``, ...)."""
    mt = desc.media_type
    if mt in INDEX_TYPES:
        kind = "index"
    elif is_layer_type(mt):
        kind = "layer"
    elif "manifest" in mt:
        kind = "manifest"
    elif "config" in mt or mt == "application/vnd.docker.container.image.v1+json":
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


def merge_source(existing: str, repository: str) -> str:
    """``containerd.io/distribution.source.<host>``: the comma list of repositories, ``repository`` added."""
    repos = [r for r in existing.split(",") if r]
    return ",".join(repos if repository in repos else [*repos, repository])


# ---------------------------------------------------------------------------------------------------------
# the pull


class _Registry(Protocol):
    def get_manifest(self, ref: Reference, obj: str | None = None) -> Manifest: ...

    def get_blob(self, ref: Reference, digest: str, *, size: int | None = None) -> bytes: ...

    def blob(self, ref: Reference, digest: str, *, size: int | None = None) -> Any: ...


@dataclass
class PullResult:
    """What a pull did."""

    name: str
    target: Descriptor
    manifest: Descriptor
    config: Descriptor
    chain_id: str = ""
    applied: list[str] = field(default_factory=list)  # layer digests downloaded and applied here
    remote: list[str] = field(default_factory=list)  # provided by the snapshotter (Prepare said exists)
    present: list[str] = field(default_factory=list)  # already unpacked before this pull

    @property
    def layers(self) -> int:
        return len(self.applied) + len(self.remote) + len(self.present)

    def summary(self) -> str:
        return (
            f"unpacked {self.layers} layers ({len(self.remote)} provided by the snapshotter, "
            f"{len(self.applied)} downloaded and applied, {len(self.present)} already unpacked)"
        )


class Puller:
    """One pull of ``ref`` from ``registry`` into ``containerd`` (blocking).

    Args:
        registry: the registry client (``get_manifest``, ``get_blob``, ``blob(...).read_all()``).
        containerd: a :class:`~soci_grpc.containerd.ContainerdClient` for the target namespace.
        ref: the normalized reference; its string form names the image record and goes into the labels.
        snapshotter: the snapshotter (plugin name in containerd) to unpack for.
        platform: ``os/arch[/variant]`` for image indexes (default: this host's).
        soci_index_digest: passed to the snapshotter as ``remote/soci.index.digest``.
        out: where progress lines go (``print`` by default).
    """

    def __init__(
        self,
        registry: _Registry,
        containerd: ContainerdClient,
        ref: Reference,
        *,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        platform: str | None = None,
        soci_index_digest: str = "",
        out: Callable[[str], None] = print,
    ) -> None:
        self.registry = registry
        self.ctrd = containerd
        self.ref = ref
        self.name = str(ref)
        self.snapshotter = snapshotter
        self.platform = platform or host_platform()
        self.soci_index_digest = soci_index_digest
        self.out = out
        self._source_key = LABEL_DIST_SOURCE + ref.host

    def run(self) -> PullResult:
        """Pull and unpack under a lease; returns what was done. Raises ``SociError`` subclasses."""
        with self.ctrd.lease():
            return self._pull()

    # ---- content

    def _fetching(self, desc: Descriptor) -> None:
        self.out(f"fetching {desc.digest[:15]}... {desc.media_type}")

    def _source_labels(self, labels: Mapping[str, str], existing: Mapping[str, str]) -> dict[str, str]:
        out = dict(labels)
        out[self._source_key] = merge_source(existing.get(self._source_key, ""), self.ref.repository)
        return out

    def _local(self, desc: Descriptor) -> tuple[bytes, Mapping[str, str]] | None:
        """containerd's copy of ``desc`` (checked against its digest and size) and its labels, or None."""
        content = self.ctrd.content
        try:
            info = content.info(desc.digest)
        except NotFound:
            return None
        data = content.read(desc.digest)
        if len(data) != desc.size or sha256_digest(data) != desc.digest:
            raise FormatError(
                f"blob {desc.digest} in containerd's content store does not match its descriptor "
                f"({len(data)} bytes, expected {desc.size})"
            )
        return data, info.labels

    def _put(
        self, desc: Descriptor, data: bytes, labels: Mapping[str, str], existing: Mapping[str, str] | None
    ) -> None:
        """``data`` under ``desc`` in containerd's content store with ``labels`` (added when it is there)."""
        content = self.ctrd.content
        if existing is None:
            if content.write(
                content_ref(desc), data, desc.digest, desc.size, self._source_labels(labels, {})
            ):
                return
            existing = content.info(desc.digest).labels  # written meanwhile by someone else
        content.update_labels(desc.digest, self._source_labels(labels, existing))

    def _fetch(self, desc: Descriptor, fetch: Callable[[], bytes]) -> tuple[bytes, Mapping[str, str] | None]:
        """(bytes, labels) from containerd's content store, else (fetched bytes, None)."""
        self._fetching(desc)
        local = self._local(desc)
        if local is not None:
            return local
        return fetch(), None

    def _resolve(self) -> tuple[Manifest, Descriptor | None]:
        """(what the reference names, the platform manifest's descriptor when that is an image index)."""
        top = self.registry.get_manifest(self.ref)
        doc = top.json()
        media_type = top.media_type or str(doc.get("mediaType", ""))
        if not media_type:  # OCI documents may leave mediaType out; the registry may not say either
            media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
        if media_type not in INDEX_TYPES:
            return Manifest(media_type, top.digest, top.data), None
        entries = [
            m
            for m in doc.get("manifests") or []
            if isinstance(m, dict)
            and m.get("artifactType") not in (ARTIFACT_TYPE_V1, ARTIFACT_TYPE_V2)
            and m.get("mediaType") not in INDEX_TYPES
        ]
        try:
            desc = select_platform({"manifests": entries}, self.platform)
        except NotFound:
            raise NotFound(
                f"image {self.name}: no manifest for platform {self.platform} in its image index {top.digest}"
            ) from None
        return Manifest(media_type, top.digest, top.data), desc

    def _pull(self) -> PullResult:
        top, chosen = self._resolve()
        if chosen is not None:
            target = Descriptor(top.media_type, top.digest, top.size)
            self._fetching(target)
            self._put(target, top.data, {LABEL_GC_MANIFEST + "0": chosen.digest}, None)
            mdesc = chosen
            data, existing = self._fetch(
                mdesc, lambda: self.registry.get_manifest(self.ref, mdesc.digest).data
            )
        else:
            mdesc = target = Descriptor(top.media_type, top.digest, top.size)
            self._fetching(mdesc)
            data, existing = top.data, None
        doc = Manifest(mdesc.media_type, mdesc.digest, data).json()
        if not isinstance(doc.get("config"), dict):
            raise FormatError(
                f"manifest {mdesc.digest} of {self.name} has no config: not an image manifest "
                f"(media type {mdesc.media_type or 'unknown'})"
            )
        config = Descriptor.from_json(doc["config"])
        layers = [
            Descriptor.from_json(x)
            for x in doc.get("layers") or []
            if isinstance(x, dict) and is_layer_type(str(x.get("mediaType", "")))
        ]
        self._put(mdesc, data, {LABEL_GC_CONFIG: config.digest}, existing)
        if config.size > MAX_CONFIG_SIZE:
            raise FormatError(f"config {config.digest} of {self.name}: {config.size} bytes is too large")
        config_data, existing = self._fetch(
            config, lambda: self.registry.get_blob(self.ref, config.digest, size=config.size)
        )
        self._put(config, config_data, {}, existing)
        diff_ids = _diff_ids(config_data, config.digest)
        if len(diff_ids) != len(layers):
            raise FormatError(
                f"image {self.name}: manifest {mdesc.digest} has {len(layers)} layers but config "
                f"{config.digest} lists {len(diff_ids)} diff IDs"
            )
        result = PullResult(self.name, target, mdesc, config)
        self._unpack(result, layers, diff_ids)
        if result.chain_id:
            key = LABEL_GC_SNAPSHOT + self.snapshotter
            self.ctrd.content.update_labels(config.digest, {key: result.chain_id})
        self.ctrd.images.update(self.name, target)
        return result

    # ---- layers

    def _unpack(self, result: PullResult, layers: list[Descriptor], diff_ids: list[str]) -> None:
        sn = self.ctrd.snapshots(self.snapshotter)
        chains = chain_ids(diff_ids)
        for i, (layer, diff_id, chain_id) in enumerate(zip(layers, diff_ids, chains, strict=True)):
            parent = chains[i - 1] if i else ""
            result.chain_id = chain_id
            try:
                sn.stat(chain_id)
            except NotFound:
                pass
            else:
                log.debug("layer %s: snapshot %s exists already", layer.digest, chain_id)
                result.present.append(layer.digest)
                continue
            labels = layer_labels(
                chain_id=chain_id,
                image_ref=self.name,
                manifest_digest=result.manifest.digest,
                layers=layers,
                index=i,
                soci_index_digest=self.soci_index_digest,
            )
            prepared = self._prepare(sn, chain_id, parent, labels)
            if prepared is None:
                log.debug(
                    "layer %s: provided by snapshotter %s as %s", layer.digest, self.snapshotter, chain_id
                )
                result.remote.append(layer.digest)
                continue
            key, mounts = prepared
            try:
                self._download(result.manifest, i, layer)
                applied = self.ctrd.diff.apply(layer, mounts)
                if applied.digest != diff_id:
                    raise FormatError(
                        f"layer {layer.digest} of {self.name}: unpacked to {applied.digest}, but the "
                        f"config's diff ID is {diff_id}"
                    )
                try:
                    sn.commit(chain_id, key, labels)
                except AlreadyExists:
                    log.debug("layer %s: %s was committed meanwhile by someone else", layer.digest, chain_id)
                    self._remove(sn, key)
                    result.present.append(layer.digest)
                    continue
            except BaseException:
                self._remove(sn, key)
                raise
            self.ctrd.content.update_labels(layer.digest, {LABEL_UNCOMPRESSED: diff_id})
            result.applied.append(layer.digest)

    def _prepare(
        self, sn: Any, chain_id: str, parent: str, labels: Mapping[str, str]
    ) -> tuple[str, list[Mount]] | None:
        """(key, mounts) of a fresh active snapshot, or None when the snapshotter provided the layer."""
        for _ in range(PREPARE_TRIES):
            key = unpack_key(chain_id)
            try:
                return key, sn.prepare(key, parent, labels)
            except AlreadyExists:
                try:
                    sn.stat(chain_id)
                except NotFound:
                    log.debug("prepare %r: exists, but %s does not; trying a new key", key, chain_id)
                    continue
                return None
        raise FailedPrecondition(
            f"snapshot {chain_id} (snapshotter {self.snapshotter}): Prepare said it exists {PREPARE_TRIES} "
            f"times, but Stat does not find it"
        )

    def _remove(self, sn: Any, key: str) -> None:
        try:
            sn.remove(key)
        except SociError as exc:
            log.warning("active snapshot %r not removed after a failed unpack: %s", key, exc)

    def _download(self, manifest: Descriptor, i: int, layer: Descriptor) -> None:
        """The layer blob into containerd's content store (streamed from the registry, verified)."""
        content = self.ctrd.content
        self._fetching(layer)
        try:
            info = content.info(layer.digest)
        except NotFound:
            info = None
        if info is None:
            blob = self.registry.blob(self.ref, layer.digest, size=layer.size)
            written = content.write(
                content_ref(layer), blob.read_all(), layer.digest, layer.size, self._source_labels({}, {})
            )
            if not written:
                info = content.info(layer.digest)
        if info is not None:
            content.update_labels(layer.digest, self._source_labels({}, info.labels))
        content.update_labels(manifest.digest, {f"{LABEL_GC_LAYER}{i}": layer.digest})


def _diff_ids(data: bytes, digest: str) -> list[str]:
    try:
        doc = json.loads(data)
        ids = (doc.get("rootfs") or {}).get("diff_ids")
    except (ValueError, AttributeError) as exc:
        raise FormatError(f"config {digest}: not an image config: {exc}") from None
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise FormatError(f"config {digest}: rootfs.diff_ids is missing or not a list of digests")
    return ids


# ---------------------------------------------------------------------------------------------------------
# the command


def run_rpull(args: argparse.Namespace) -> int:
    ref = reference.parse(args.image_ref, normalize=True)
    if args.soci_index_digest:
        reference.validate_digest(args.soci_index_digest, what="--soci-index-digest")
    cfg = load_config(args.config)
    host = ref.registry_host
    creds = credentials(args, cfg, host)
    try:
        with (
            RegistryClient(
                creds.credential, ref=str(ref), config=cfg.registry_config(), plain_http=args.plain_http
            ) as registry,
            ContainerdClient(args.address, args.namespace, timeout=args.timeout) as ctrd,
        ):
            puller = Puller(
                registry,
                ctrd,
                ref,
                snapshotter=args.snapshotter,
                platform=args.platform,
                soci_index_digest=args.soci_index_digest,
                out=lambda line: print(line, flush=True),
            )
            try:
                result = puller.run()
            except Unauthenticated as exc:
                raise Unauthenticated(
                    f"registry {host} refused the request ({creds.used(host)}): {exc}"
                ) from exc
    finally:
        creds.stop()
    print(result.summary())
    return 0
