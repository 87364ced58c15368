"""Remote layers for the daemon: the snapshotter's :class:`~soci_grpc.snapshotter.LayerProvider`.

Owns the decision, per layer-unpack Prepare, between serving the layer lazily, unpacking it here, and
leaving it to containerd (snapshotter.md §4-5), and everything that decision needs at run time:

* **Image contexts**, one per image-manifest digest (label ``cri.manifest-digest``): the registry client for
  the image (credentials through the daemon's credential chain, asked on every token fetch), the SOCI index
  found as the snapshotter finds it (the explicit ``remote/soci.index.digest`` label, the v2 annotation, then
  v1 referrers when ``[pull_modes.soci_v1] enable``), its zTOCs, and the image config's ``diff_ids``.
  Built once, single-flight. "No SOCI index" is remembered for the daemon's lifetime as upstream does, and
  so is a broken index (the index or a zTOC it lists is missing from the registry, does not parse, or does
  not fit its layer: upstream reports those as "no index" too; here they are ``bad_index`` and logged at
  WARNING naming the index, the zTOC and the layer). Unlike upstream, a transient failure (registry
  unreachable, credentials refused: ``resolve_failed``) is not remembered: the next Prepare of that image
  tries again.
* **Lazy layers**: one FUSE session for the daemon (:class:`soci_fs.mount.ThreadedSession` at
  ``<root>/fuse``, mode 0700) serves each lazily loaded layer as ``<root>/fuse/<snapshot id>``, which is
  bind-mounted (read-only) onto the snapshot's ``snapshots/<id>/fs`` so that the snapshotter's overlay
  mounts and the kubelet see the layer where containerd expects it. Spans go through one block cache
  (``<root>/cache``) and the background fetcher runs on the session's loop.
* **Local layers** (the index has no zTOC for the layer, or ``[snapshotter] min_layer_size`` says it is
  too small): the blob is downloaded into the content store, unpacked into ``snapshots/<id>/fs`` with
  overlay whiteout conversion (:mod:`soci_fs.unpack`), its uncompressed digest checked against the
  config's ``diff_ids``, and the blob dropped again.
* **Fallbacks**: no SOCI index, a broken one, an image that cannot be resolved now, or labels that are
  not digests/references (``bad_labels``) -> defer to containerd (Prepare returns ordinary mounts); a lazy
  mount that fails -> local; a local unpack that fails -> defer (its directory emptied first). Each is
  logged at WARNING (INFO for "no index", the normal case of an image that was never converted) with the
  reason, counted in the metrics and recorded per image and layer for ``soci debug``
  (:meth:`RemoteLayers.status`). :meth:`RemoteLayers.provide_layer` never raises: an unexpected exception
  is logged with its traceback and recorded as ``internal_error``, and the layer is deferred. A lazy layer
  whose bytes do not match its zTOC's span digests is never served wrong: the read fails with EIO.
* **Restart** (:meth:`RemoteLayers.restore`): snapshots labelled ``containerd.io/snapshot/remote`` are served
  again from the locally stored manifest, index and zTOCs, with no network (the gzip header check is left
  out; spans come from the block cache or are fetched on first read). One that cannot be restored is
  retried in the background (a registry that is down does not stop the daemon) when
  ``[snapshotter] allow_invalid_mounts_on_restart`` is set or the cause is a registry that is unreachable;
  any other failure stops the start, as upstream does.

Will not: touch the snapshot metadata (the snapshotter core commits what this reports), talk gRPC, or decide
credentials (the chain does).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from soci_fs.background import BackgroundConfig, BackgroundFetcher
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.errors import (
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    SociError,
    Unauthenticated,
    Unavailable,
)
from soci_fs.index import ANN_LAYER_DIGEST, MT_ZTOC, diff_compression
from soci_fs.mount import MountOptions, ThreadedSession, is_mounted
from soci_fs.registry import reference
from soci_fs.registry.client import Descriptor, RegistryClient
from soci_fs.registry.credentials import Credential
from soci_fs.remote import (
    HOW_EXPLICIT,
    MAX_ZTOC_SIZE,
    ImagePlan,
    ImageSource,
    LayerPlan,
    OpenedLayer,
    open_layer,
)
from soci_fs.spans import SpanConfig
from soci_fs.store import ContentStore
from soci_grpc.snapshotter import LayerRequest, LayerResult

log = logging.getLogger(__name__)

LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER = "containerd.io/snapshot/cri.layer-digest"
LABEL_SOCI_SIZE = "containerd.io/snapshot/remote/soci.size"
LABEL_INDEX_DIGEST = "containerd.io/snapshot/remote/soci.index.digest"
LABEL_REMOTE = "containerd.io/snapshot/remote"
LABEL_HAS_INDEX = "containerd.io/snapshot/remote/has.soci.index.digest"
REMOTE_VALUE = "remote snapshot"

_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")

# reasons recorded per layer (and the metrics' fallback reasons)
NO_INDEX = "no_index"  # the image has no SOCI index (deferred; INFO: the normal case of an unconverted image)
BAD_INDEX = "bad_index"  # the index, or a zTOC it lists, is missing or broken (deferred, remembered)
RESOLVE_FAILED = "resolve_failed"  # the image context failed for now: registry down, credentials refused
NO_ZTOC = "no_ztoc"
BELOW_MIN_SIZE = "below_min_size"
MOUNT_FAILED = "mount_failed"
LOCAL_FAILED = "local_unpack_failed"
BAD_LABELS = "bad_labels"
INTERNAL_ERROR = "internal_error"  # a bug: logged with its traceback, the layer is left to containerd

# ---------------------------------------------------------------------------------------------------------
# bind mounts (mount(2) directly: one syscall, no fork, no dependency on util-linux's behaviour)

_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def bind_mount(source: Path, target: Path) -> None:
    """Bind ``source`` read-only onto ``target``.

    Raises:
        FailedPrecondition: the kernel refused (errno named).
    """
    src, dst = os.fsencode(source), os.fsencode(target)
    if _libc.mount(src, dst, None, _MS_BIND, None) != 0:
        e = ctypes.get_errno()
        raise FailedPrecondition(f"bind mount of {source} on {target}: {os.strerror(e)}")
    if _libc.mount(None, dst, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None) != 0:
        e = ctypes.get_errno()
        detach(target)
        raise FailedPrecondition(f"read-only remount of {target}: {os.strerror(e)}")


def detach(target: Path) -> bool:
    """Lazily unmount ``target`` (MNT_DETACH); False when nothing was mounted there."""
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e in (errno.EINVAL, errno.ENOENT):
            return False
        raise FailedPrecondition(f"unmount of {target}: {os.strerror(e)}")
    return True


def mounts_under(prefix: Path) -> list[Path]:
    """Mountpoints at or below ``prefix`` (from /proc/self/mountinfo), deepest first."""
    want = str(prefix).rstrip("/")
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if mp == want or mp.startswith(want + "/"):
                found.append(Path(mp))
    return sorted(set(found), key=lambda p: (-len(p.parts), str(p)))


def unmount_all_under(prefix: Path) -> int:
    """Detach every mount at or below ``prefix`` (stale mounts of a previous run); how many."""
    n = 0
    for mp in mounts_under(prefix):
        with contextlib.suppress(FailedPrecondition):
            # a mount stacked several times at one path needs one detach per layer
            while detach(mp):
                n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# records for the debug tools


@dataclass
class LayerRecord:
    """What happened to one layer-unpack Prepare (or restore)."""

    snapshot_id: str
    digest: str
    mode: str  # "lazy", "local", "deferred", "failed", "degraded"
    reason: str = ""  # fallback reason code ("" when served as asked)
    detail: str = ""  # the error or explanation, for people
    mountpoint: str = ""
    size: int = 0
    since: float = field(default_factory=time.time)


@dataclass
class ImageRecord:
    """One image (by manifest digest) as the daemon knows it."""

    ref: str
    manifest: str
    index_digest: str = ""
    index_how: str = ""
    state: str = "resolving"  # "indexed", "no_index", "error"
    detail: str = ""
    layers: dict[str, LayerRecord] = field(default_factory=dict)  # by snapshot id


# ---------------------------------------------------------------------------------------------------------
# per-image context


@dataclass
class _Image:
    ref: reference.Reference
    manifest: str
    client: RegistryClient
    source: ImageSource
    plan: ImagePlan | None = None
    error: SociError | None = None  # "no index" or a broken index: remembered
    reason: str = ""  # NO_INDEX or BAD_INDEX with ``error``
    diff_ids: tuple[str, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: bool = False

    def layer(self, digest: str) -> tuple[int, LayerPlan] | None:
        assert self.plan is not None
        for i, lp in enumerate(self.plan.layers):
            if lp.descriptor.digest == digest:
                return i, lp
        return None


class _Source(ImageSource):
    """:class:`ImageSource` that remembers whether discovery found an index, and names the layer of a zTOC
    that the registry does not have (so a broken index is told apart from "no index")."""

    found_index = ""

    def find_index(
        self, manifest: Any, *, explicit: str = "", v2: bool = True, v1: bool = True
    ) -> tuple[str, str]:
        found = super().find_index(manifest, explicit=explicit, v2=v2, v1=v1)
        self.found_index = found[0]
        return found

    def blob(self, desc: Descriptor, *, max_size: int = MAX_ZTOC_SIZE) -> bytes:
        try:
            return super().blob(desc, max_size=max_size)
        except NotFound as exc:
            layer = (desc.annotations or {}).get(ANN_LAYER_DIGEST, "")
            if desc.media_type != MT_ZTOC or not layer:
                raise
            raise NotFound(f"zTOC {desc.digest} of layer {layer}, listed in the SOCI index: {exc}") from exc


@dataclass
class _Served:
    snapshot_id: str
    mountpoint: Path
    image: _Image
    opened: OpenedLayer | None = None  # lazy
    fuse_name: str = ""


class RemoteLayers:
    """The daemon's layer provider. Start with :meth:`start`, end with :meth:`close`.

    Args:
        root: the daemon root; uses ``<root>/fuse``, ``<root>/cache`` and ``<root>/content``.
        config: the daemon's :class:`~soci_grpc.config.Config`.
        credential: the credential chain, ``(host, ref) -> Credentials | None``.
        metrics: optional :class:`~soci_grpc.metrics.DaemonMetrics` (registry responses and token fetches
            per host, span fetches and cache hits through the layers' hooks, fallbacks, mount failures,
            mounted layers and images).
    """

    def __init__(
        self, root: str | os.PathLike[str], config: Any, credential: Credential, metrics: Any = None
    ):
        self.root = Path(root).absolute()
        self.cfg = config
        self.credential = credential
        self.metrics = metrics
        self.fuse_dir = self.root / "fuse"
        self.content = ContentStore(self.root / "content")
        self.registry_config = config.registry_config()
        self.span_config = SpanConfig.from_blob_section(config.blob)
        self.mount_timeout = float(config.mount_timeout_sec or 30)
        self._lock = threading.Lock()
        self._images: dict[str, _Image] = {}
        self._records: dict[str, ImageRecord] = {}
        self._served: dict[str, _Served] = {}
        self._session: ThreadedSession | None = None
        self._fetcher: BackgroundFetcher | None = None
        self._cache: BlockCache | None = None
        self._limiters: tuple[trio.CapacityLimiter, trio.CapacityLimiter] | None = None
        self._retry_stop = threading.Event()
        self._retry_threads: list[threading.Thread] = []

    # ---- lifecycle

    def start(self, mount_options: MountOptions | None = None) -> None:
        """Detach stale mounts of a previous run under ``<root>/fuse``, mount the FUSE session, start the
        background fetcher."""
        # first, and without touching the path: a FUSE mount whose daemon was killed answers every stat
        # with ENOTCONN until it is detached
        stale = unmount_all_under(self.fuse_dir)
        if stale:
            log.info("detached %d stale FUSE mount(s) under %s", stale, self.fuse_dir)
        self.fuse_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.content.init()
        self._cache = BlockCache(self.root, CacheConfig.from_section(self.cfg.directory_cache))
        session = ThreadedSession(self.fuse_dir, mount_options or MountOptions()).start()
        self._session = session
        self._fetcher = BackgroundFetcher(
            BackgroundConfig.from_section(self.cfg.background_fetch),
            metrics=self.metrics.hook() if self.metrics is not None else None,
        )
        session.start_service(self._fetcher.serve)

        async def limiters() -> tuple[trio.CapacityLimiter, trio.CapacityLimiter]:
            return (
                trio.CapacityLimiter(self.span_config.fetch_threads),
                trio.CapacityLimiter(self.span_config.inflate_threads or os.cpu_count() or 1),
            )

        self._limiters = session.call(limiters)

    def close(self) -> None:
        """Unmount every layer's bind mount and the FUSE session (SIGTERM/SIGINT: a clean stop)."""
        self._retry_stop.set()
        for t in self._retry_threads:
            t.join(10)
        with self._lock:
            served = list(self._served.values())
            self._served.clear()
        for s in served:
            with contextlib.suppress(SociError):
                detach(s.mountpoint)
            if s.opened is not None:
                s.opened.close()
        if self._session is not None:
            self._session.close()
            self._session = None
        with self._lock:
            images = list(self._images.values())
            self._images.clear()
        for img in images:
            img.client.close()

    # ---- image contexts

    def _image(self, image_ref: str, manifest: str, explicit_index: str) -> _Image:
        """The context of manifest ``manifest`` (built once; a transient failure is retried next time)."""
        with self._lock:
            img = self._images.get(manifest)
            if img is None:
                ref = reference.parse(image_ref, normalize=True)
                client = RegistryClient(
                    self.credential, config=self.registry_config, ref=str(ref), pool_maxsize=64
                )
                if self.metrics is not None:
                    client.on_response = self.metrics.registry_status
                    client.auth.on_token_fetch = self.metrics.token_refresh
                by_digest = ref.with_object(tag=ref.tag, digest=manifest)
                img = _Image(ref, manifest, client, _Source(client, by_digest, self.content))
                self._images[manifest] = img
                self._records[manifest] = ImageRecord(str(ref), manifest)
        with img.lock:
            if img.ready:
                return img
            rec = self._records[manifest]
            source = img.source
            if isinstance(source, _Source):
                source.found_index = ""
            try:
                img.plan = source.plan(
                    index_digest=explicit_index,
                    v2=self.cfg.pull_modes.soci_v2.enable,
                    v1=self.cfg.pull_modes.soci_v1.enable,
                )
            except (NotFound, FormatError) as exc:
                # Remembered for the daemon's lifetime, as upstream does (upstream reports both as "no
                # index"): an image without an index, and one whose index or a zTOC of it is missing (404)
                # or broken, will not heal by asking again.
                found = getattr(source, "found_index", "")
                broken = isinstance(exc, FormatError) or bool(found)
                img.error, img.ready = exc, True
                img.reason = BAD_INDEX if broken else NO_INDEX
                rec.state, rec.detail = ("bad_index" if broken else NO_INDEX), str(exc)
                rec.index_digest = found
                if broken:
                    log.warning(
                        "image %s: %s; its layers are left to containerd",
                        img.ref,
                        f"SOCI index {found} cannot be used: {exc}" if found else str(exc),
                    )
                return img
            except SociError as exc:  # transient: the next Prepare of this image tries again
                rec.state, rec.detail = "error", str(exc)
                raise
            except Exception as exc:  # a bug; still never a crash, and tried again next time
                log.warning("image %s: resolving failed unexpectedly", img.ref, exc_info=True)
                rec.state, rec.detail = "error", f"unexpected error: {exc!r}"
                raise SociError(f"unexpected error while resolving: {exc!r}") from exc
            config_desc = Descriptor.from_json(img.plan.manifest.json().get("config") or {})
            try:
                doc = _json(
                    img.source.blob(config_desc, max_size=16 << 20), f"image config {config_desc.digest}"
                )
                img.diff_ids = tuple(str(x) for x in (doc.get("rootfs") or {}).get("diff_ids") or ())
            except SociError as exc:
                log.warning(
                    "image %s: cannot read its config (%s); local layers will not be verified", img.ref, exc
                )
            rec.state, rec.detail = "indexed", ""
            rec.index_digest, rec.index_how = img.plan.index_digest, img.plan.how
            img.ready = True
            return img

    # ---- the provider

    def provide_layer(self, request: LayerRequest) -> LayerResult | None:
        """Serve the layer of a layer-unpack Prepare lazily or locally; ``None`` defers it to containerd.

        Never raises: whatever the labels, the registry or the index hold, the answer is a served layer or
        a deferral whose reason is logged and recorded for :meth:`status` (an unexpected exception too, as
        ``internal_error`` with its traceback in the log).
        """
        try:
            return self._provide(request)
        except Exception as exc:
            log.warning(
                "layer %s: unexpected error (%r); leaving it to containerd",
                request.labels.get(LABEL_LAYER, "") or request.key,
                exc,
                exc_info=True,
                extra={"key": request.key},
            )
            with self._lock:
                served = request.snapshot_id in self._served
                img = self._images.get(request.labels.get(LABEL_MANIFEST, ""))
            with contextlib.suppress(Exception):
                if served:
                    self.release_layer(request.snapshot_id)
                _empty_dir(request.mountpoint)
                self._fallback(
                    request,
                    img,
                    INTERNAL_ERROR,
                    "deferred",
                    f"unexpected error: {exc!r}",
                    level=logging.DEBUG,
                )
            return None

    def _provide(self, request: LayerRequest) -> LayerResult | None:
        labels = request.labels
        image_ref = labels.get(LABEL_IMAGE_REF, "")
        manifest = labels.get(LABEL_MANIFEST, "")
        digest = labels.get(LABEL_LAYER, "")
        explicit = labels.get(LABEL_INDEX_DIGEST, "")
        if not (image_ref and manifest and digest):
            log.debug(
                "prepare without the image labels; leaving the layer to containerd",
                extra={"key": request.key},
            )
            return None
        bad = [
            f"{k}={v!r}"
            for k, v in ((LABEL_MANIFEST, manifest), (LABEL_LAYER, digest))
            if not _DIGEST.match(v)
        ]
        if explicit and not _DIGEST.match(explicit):
            bad.append(f"{LABEL_INDEX_DIGEST}={explicit!r}")
        try:
            if bad:
                raise InvalidArgument("invalid digest label " + ", ".join(bad))
            ref = reference.parse(image_ref, normalize=True)
        except SociError as exc:
            self._fallback(request, None, BAD_LABELS, "deferred", str(exc), level=logging.WARNING)
            return None
        try:
            img = self._image(image_ref, manifest, explicit)
        except SociError as exc:
            with self._lock:
                failed = self._images.get(manifest)
            self._fallback(
                request,
                failed,
                RESOLVE_FAILED,
                "deferred",
                f"image {ref}: {exc} (tried again at the next pull of this image)",
                level=logging.WARNING,
            )
            return None
        if img.error is not None:
            # "no index" is the normal case of an unconverted image; a broken index was logged once
            level = logging.INFO if img.reason == NO_INDEX else logging.DEBUG
            self._fallback(request, img, img.reason or NO_INDEX, "deferred", str(img.error), level=level)
            return None
        found = img.layer(digest)
        if found is None:
            self._fallback(
                request,
                img,
                BAD_LABELS,
                "deferred",
                f"layer {digest} is not in manifest {manifest}",
                level=logging.WARNING,
            )
            return None
        idx, lp = found
        min_size = int(self.cfg.snapshotter.min_layer_size or 0)
        size_label = labels.get(LABEL_SOCI_SIZE, "")
        if lp.lazy and min_size > 0 and size_label.isdigit() and int(size_label) < min_size:
            return self._local(
                request,
                img,
                idx,
                lp,
                BELOW_MIN_SIZE,
                f"layer is {size_label} bytes, below min_layer_size {min_size}",
            )
        if not lp.lazy:
            return self._local(request, img, idx, lp, NO_ZTOC, "the SOCI index has no zTOC for this layer")
        try:
            self._mount_lazy(request.snapshot_id, request.mountpoint, img, lp, check_header=True)
        except Exception as exc:
            expected = isinstance(exc, SociError | OSError | RuntimeError | trio.TooSlowError)
            detail = f"lazy mount failed: {_why(exc) if expected else repr(exc)}"
            log.warning(
                "layer %s: %s; unpacking it locally",
                digest,
                detail,
                exc_info=not expected,
                extra={"key": request.key},
            )
            self._count_fallback(MOUNT_FAILED)
            if self.metrics is not None:
                _call(self.metrics, "mount_failure", "lazy", digest)
            return self._local(request, img, idx, lp, MOUNT_FAILED, detail, logged=True)
        self._record(
            request.snapshot_id,
            img,
            LayerRecord(
                request.snapshot_id,
                digest,
                "lazy",
                mountpoint=str(request.mountpoint),
                size=lp.descriptor.size,
            ),
        )
        log.info(
            "remote-snapshot-prepared=true: layer %s of %s served lazily",
            digest,
            img.ref,
            extra={"key": request.key, "id": request.snapshot_id},
        )
        result = {LABEL_REMOTE: REMOTE_VALUE, LABEL_HAS_INDEX: "true"}
        assert img.plan is not None
        result[LABEL_INDEX_DIGEST] = img.plan.index_digest
        return LayerResult(labels=result, compute_usage=False)

    def _mount_lazy(
        self, sid: str, mountpoint: Path, img: _Image, lp: LayerPlan, *, check_header: bool
    ) -> None:
        session = self._session
        if session is None or self._limiters is None:
            raise FailedPrecondition("the FUSE session is not running")
        fetch_limiter, inflate_limiter = self._limiters
        cache, fetcher = self._cache, self._fetcher
        assert cache is not None and fetcher is not None
        timeout = self.mount_timeout

        async def open_and_add() -> tuple[OpenedLayer, Path]:
            with trio.fail_after(timeout):
                layer = await open_layer(
                    img.source,
                    lp,
                    cache,
                    span_config=self.span_config,
                    fetch_limiter=fetch_limiter,
                    inflate_limiter=inflate_limiter,
                    check_header=check_header,
                    metrics=self.metrics.hook(lp.descriptor.digest) if self.metrics is not None else None,
                )
            try:
                # the tree is built from the zTOC, which is then released (memory: see bench_daemon_memory)
                ztoc = layer.take_ztoc()
                path = await session.session.add_layer(sid, ztoc, layer.data, **layer.serve_options())
                del ztoc
            except BaseException:
                layer.close()
                raise
            fetcher.register(layer.data)
            return layer, path

        layer, path = session.call(open_and_add)
        try:
            mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)
            bind_mount(path, mountpoint)
        except BaseException:
            self._drop_from_session(sid, layer)
            raise
        with self._lock:
            self._served[sid] = _Served(sid, mountpoint, img, layer, sid)
        with img.lock:  # the image context keeps the zTOC descriptor only (reloaded locally if needed again)
            if img.plan is not None:
                img.plan = img.plan.without_ztoc(lp.descriptor.digest)

    def _drop_from_session(self, sid: str, layer: OpenedLayer) -> None:
        session, fetcher = self._session, self._fetcher
        if session is not None and fetcher is not None:

            async def drop() -> None:
                fetcher.unregister(layer.data)
                with contextlib.suppress(NotFound):
                    await session.session.remove_layer(sid)

            with contextlib.suppress(SociError, trio.RunFinishedError, RuntimeError):
                session.call(drop)
        layer.close()

    def _local(
        self,
        request: LayerRequest,
        img: _Image,
        idx: int,
        lp: LayerPlan,
        reason: str,
        detail: str,
        *,
        logged: bool = False,
    ) -> LayerResult | None:
        """Download, verify and unpack the layer into its snapshot; ``None`` (defer) when that fails."""
        from soci_fs.unpack import apply_layer

        desc = lp.descriptor
        if not logged:
            log.info("layer %s: %s; unpacking it locally", desc.digest, detail, extra={"key": request.key})
            self._count_fallback(reason)
        diff_id = img.diff_ids[idx] if idx < len(img.diff_ids) else None
        try:
            kind = diff_compression(desc.media_type)
            compression = {"gzip": "gzip", "uncompressed": "tar", "unknown": "tar"}.get(kind, kind)
            path, _ = img.source.download_layer(desc)
            try:
                apply_layer(
                    path,
                    request.mountpoint,
                    compression=compression,
                    expected_diff_id=diff_id,
                    parent_dirs=request.parent_dirs,
                )
            finally:
                with contextlib.suppress(OSError, SociError):
                    img.source.content.delete(desc.digest)
        except Exception as exc:  # whatever it was, containerd must get an empty directory back
            _empty_dir(request.mountpoint)
            expected = isinstance(exc, SociError | OSError)
            why = f"{detail}; local unpack failed: {_why(exc) if expected else repr(exc)}"
            log.warning(
                "failed to prepare local snapshot of layer %s (%s); deferring to container runtime",
                desc.digest,
                why,
                exc_info=not expected,
                extra={"key": request.key},
            )
            self._count_fallback(LOCAL_FAILED)
            if self.metrics is not None:
                _call(self.metrics, "mount_failure", "local", desc.digest)
            self._record(
                request.snapshot_id,
                img,
                LayerRecord(request.snapshot_id, desc.digest, "deferred", LOCAL_FAILED, why, size=desc.size),
            )
            return None
        self._record(
            request.snapshot_id,
            img,
            LayerRecord(
                request.snapshot_id, desc.digest, "local", reason, detail, str(request.mountpoint), desc.size
            ),
        )
        return LayerResult(labels={LABEL_HAS_INDEX: "true"}, compute_usage=True)

    def _fallback(
        self, request: LayerRequest, img: _Image | None, reason: str, mode: str, detail: str, *, level: int
    ) -> None:
        digest = request.labels.get(LABEL_LAYER, "")
        log.log(
            level,
            "layer %s: %s; leaving it to containerd",
            digest or request.key,
            detail,
            extra={"key": request.key, "reason": reason},
        )
        self._count_fallback(reason)
        if img is not None:
            self._record(
                request.snapshot_id, img, LayerRecord(request.snapshot_id, digest, mode, reason, detail)
            )
        else:
            with self._lock:
                rec = self._records.setdefault("", ImageRecord("(unknown image)", ""))
                rec.layers[request.snapshot_id] = LayerRecord(
                    request.snapshot_id, digest, mode, reason, detail
                )

    def _count_fallback(self, reason: str) -> None:
        if self.metrics is not None:
            _call(self.metrics, "fallback", reason)

    def _record(self, sid: str, img: _Image, rec: LayerRecord) -> None:
        with self._lock:
            self._records[img.manifest].layers[sid] = rec
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        counts = self.served_count()
        for mode, n in counts.items():
            _call(self.metrics, "set_mounted_layers", mode, n)
        with self._lock:
            images = sum(
                1
                for r in self._records.values()
                if any(x.mode in ("lazy", "local") for x in r.layers.values())
            )
        _call(self.metrics, "set_images", images)

    def layer_stats(self) -> list[Any]:
        """Per lazy layer ``(digest, mountpoint, fetched bytes, size)`` for the metrics' live families."""
        from soci_grpc.metrics import LayerStat

        with self._lock:
            served = list(self._served.values())
        return [
            LayerStat(s.opened.digest, str(s.mountpoint), s.opened.data.fetched_size(), s.opened.size)
            for s in served
            if s.opened is not None
        ]

    # ---- removal and restart

    def release_layer(self, snapshot_id: str) -> None:
        """The snapshot is gone (Cleanup): unmount its bind mount and stop serving its layer."""
        with self._lock:
            served = self._served.pop(snapshot_id, None)
            for rec in self._records.values():
                rec.layers.pop(snapshot_id, None)
        if served is None:
            return
        with contextlib.suppress(SociError):
            detach(served.mountpoint)
        if served.opened is not None:
            self._drop_from_session(snapshot_id, served.opened)
        self._forget_if_unused(served.image)
        self._update_gauges()
        log.info("released layer of snapshot %s", snapshot_id)

    def _forget_if_unused(self, img: _Image) -> None:
        """Drop the context (and its registry connections) of an indexed image none of whose layers is served
        any more; its record goes too when it lists no layer. A later Prepare builds it again from the local
        copies of the manifest, index and zTOCs. "No index" answers stay remembered (they are small)."""
        with self._lock:
            if img.error is not None or any(s.image is img for s in self._served.values()):
                return
            if self._images.get(img.manifest) is img:
                del self._images[img.manifest]
                rec = self._records.get(img.manifest)
                if rec is not None and not rec.layers:
                    del self._records[img.manifest]
            else:
                return
        img.client.close()
        log.debug("forgot image %s (%s): no layer of it is served", img.ref, img.manifest)

    def restore(self, snapshots: Iterable[tuple[str, Path, Mapping[str, str]]]) -> int:
        """Serve again the remote snapshots of a previous run: ``(snapshot id, fs dir, labels)`` each.

        Returns how many came back now; the rest are retried in the background (see the module docstring).

        Raises:
            FailedPrecondition: a snapshot could not be restored, for a reason other than an unreachable
                registry, and ``allow_invalid_mounts_on_restart`` is off.
        """
        n = 0
        for sid, fs, labels in snapshots:
            try:
                self._restore_one(sid, fs, labels)
                n += 1
            except (SociError, OSError, RuntimeError, trio.TooSlowError) as exc:
                transient = isinstance(exc, Unavailable | Unauthenticated | trio.TooSlowError)
                if not transient and not self.cfg.snapshotter.allow_invalid_mounts_on_restart:
                    raise FailedPrecondition(
                        f"cannot restore remote snapshot {sid} (layer {labels.get(LABEL_LAYER, '?')}): "
                        f"{_why(exc)}; set [snapshotter] allow_invalid_mounts_on_restart = true to start "
                        "anyway"
                    ) from exc
                log.warning(
                    "remote snapshot %s restored degraded (%s); retrying in the background", sid, _why(exc)
                )
                self._note_degraded(sid, labels, _why(exc))
                t = threading.Thread(
                    target=self._retry_restore,
                    args=(sid, fs, dict(labels)),
                    name=f"restore-{sid}",
                    daemon=True,
                )
                self._retry_threads.append(t)
                t.start()
        return n

    def _restore_one(self, sid: str, fs: Path, labels: Mapping[str, str]) -> None:
        image_ref, manifest = labels.get(LABEL_IMAGE_REF, ""), labels.get(LABEL_MANIFEST, "")
        digest, index_digest = labels.get(LABEL_LAYER, ""), labels.get(LABEL_INDEX_DIGEST, "")
        if not (image_ref and manifest and digest):
            raise FormatError(f"snapshot {sid} lacks the image labels needed to serve it again")
        img = self._image(image_ref, manifest, index_digest)
        if img.error is not None:
            raise img.error
        found = img.layer(digest)
        if found is None or not found[1].lazy:
            raise FormatError(f"layer {digest} has no zTOC in SOCI index {index_digest or '(discovered)'}")
        self._mount_lazy(sid, fs, img, found[1], check_header=False)
        self._record(
            sid, img, LayerRecord(sid, digest, "lazy", "", "restored", str(fs), found[1].descriptor.size)
        )
        log.info("restored remote snapshot %s (layer %s)", sid, digest)

    def _note_degraded(self, sid: str, labels: Mapping[str, str], why: str) -> None:
        manifest = labels.get(LABEL_MANIFEST, "")
        with self._lock:
            rec = self._records.setdefault(manifest, ImageRecord(labels.get(LABEL_IMAGE_REF, ""), manifest))
            rec.layers[sid] = LayerRecord(sid, labels.get(LABEL_LAYER, ""), "degraded", MOUNT_FAILED, why)
            img = self._images.get(manifest)
            if img is not None and not img.ready:  # let the retry build the context afresh
                self._images.pop(manifest, None)

    def _retry_restore(self, sid: str, fs: Path, labels: dict[str, str]) -> None:
        delay = 1.0
        while not self._retry_stop.wait(delay):
            with self._lock:
                if sid in self._served:
                    return
            try:
                self._restore_one(sid, fs, labels)
                return
            except (SociError, OSError, RuntimeError, trio.TooSlowError) as exc:
                log.debug("restore of snapshot %s failed again: %s", sid, _why(exc))
                delay = min(delay * 2, 30.0)

    # ---- introspection

    def status(self) -> dict[str, Any]:
        """Every image and layer the daemon handled, with per-layer fetch statistics (JSON-able)."""
        with self._lock:
            records = [(r, dict(r.layers)) for r in self._records.values()]
            served = dict(self._served)
        images = []
        for rec, layers in records:
            out_layers = []
            for sid, lr in sorted(layers.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
                d: dict[str, Any] = {
                    "snapshot_id": sid,
                    "digest": lr.digest,
                    "mode": lr.mode,
                    "reason": lr.reason,
                    "detail": lr.detail,
                    "mountpoint": lr.mountpoint,
                    "size": lr.size,
                }
                s = served.get(sid)
                if s is not None and s.opened is not None:
                    st = s.opened.data.statistics()
                    d["fetched_percent"] = round(float(st.get("fetched_percent", 0.0)), 2)
                    d["fetched_bytes"] = int(st.get("bytes_fetched", 0))
                    d["spans"] = int(st.get("spans", 0))
                    d["spans_fetched"] = int(st.get("spans_fetched", 0))
                    d["cache_hits"] = int(st.get("cache_hits", 0))
                    d["fuse_path"] = str(self.fuse_dir / sid)
                out_layers.append(d)
            images.append(
                {
                    "ref": rec.ref,
                    "manifest": rec.manifest,
                    "index_digest": rec.index_digest,
                    "index_found_by": rec.index_how,
                    "state": rec.state,
                    "detail": rec.detail,
                    "layers": out_layers,
                }
            )
        cache = self._cache.statistics() if self._cache is not None else {}
        return {"images": images, "cache": _jsonable(cache), "fuse_mountpoint": str(self.fuse_dir)}

    def served_count(self) -> dict[str, int]:
        with self._lock:
            lazy = sum(1 for s in self._served.values() if s.opened is not None)
            local = sum(1 for r in self._records.values() for x in r.layers.values() if x.mode == "local")
        return {"lazy": lazy, "local": local}


# ---------------------------------------------------------------------------------------------------------


def _json(data: bytes, what: str) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise FormatError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a JSON object")
    return doc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    text = str(exc)
    cause = exc.__cause__
    if isinstance(exc, RuntimeError) and cause is not None:
        text = f"{text}: {cause}"
    return text or type(exc).__name__


def _empty_dir(path: Path) -> None:
    """Remove what a failed unpack left in ``path`` (the directory itself stays: containerd uses it)."""
    if is_mounted(path):
        return
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _call(obj: Any, method: str, *args: Any) -> None:
    """Call an optional metrics method; metrics never break the data path."""
    fn: Callable[..., Any] | None = getattr(obj, method, None)
    if fn is None:
        return
    try:
        fn(*args)
    except Exception as exc:  # metrics must not fail a Prepare
        log.debug("metrics %s failed: %s", method, exc)


__all__ = [
    "HOW_EXPLICIT",
    "LABEL_HAS_INDEX",
    "LABEL_REMOTE",
    "ImageRecord",
    "LayerRecord",
    "RemoteLayers",
    "bind_mount",
    "detach",
    "mounts_under",
    "unmount_all_under",
]
