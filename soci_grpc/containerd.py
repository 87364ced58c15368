"""A small blocking client for containerd's own gRPC API: content, images, leases, snapshots and diff.

Owns:

* :class:`ContainerdClient`: one gRPC channel to containerd's socket (``unix:<path>``), the namespace sent
  with every call as the ``containerd-namespace`` metadata, and, inside :meth:`ContainerdClient.lease`, the
  lease id as ``containerd-lease`` (what keeps the content and snapshots of a pull from containerd's
  garbage collector until the image record references them);
* one object per service, reached as attributes: ``content`` (:class:`ContentService`), ``images``
  (:class:`ImagesService`), ``leases`` (:class:`LeasesService`), ``diff`` (:class:`DiffService`) and
  ``snapshots(name)`` (:class:`SnapshotsService`, containerd's snapshots service with ``snapshotter=name``,
  so containerd's metadata layer records what the snapshotter does);
* the one mapping of gRPC status codes to :mod:`soci_fs.errors` (:data:`ERROR_OF`), applied to every call;
  the message names the call, the object and containerd's own words (``containerd Content.Info
  sha256:...: content digest sha256:...: not found``).

The content ``Write`` stream is driven as containerd's own client drives it: a ``STAT`` message names the
ingest ref and the expected digest and size, ``WRITE`` messages carry the data from offset 0 (which restarts
an ingest left behind by an earlier attempt), and ``COMMIT`` asks containerd to verify and commit. The data
is hashed on the way as well, so a blob whose bytes do not match the expected digest is never committed and
the error names the blob (``FormatError``). ``ALREADY_EXISTS`` (the blob is in the store) counts as success.

Will not: talk to registries, decide what to pull or unpack (``soci_grpc.cli.cmd_image`` does that), retry
calls other than a content write whose ingest ref another writer holds, or keep any state besides the
channel and the current lease.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from soci_fs.errors import (
    AlreadyExists,
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    SociError,
    Unauthenticated,
    Unavailable,
)
from soci_fs.registry.client import Descriptor
from soci_grpc._proto.soci import containerd_content_pb2 as content_pb2
from soci_grpc._proto.soci import containerd_content_pb2_grpc as content_grpc
from soci_grpc._proto.soci import containerd_diff_pb2 as diff_pb2
from soci_grpc._proto.soci import containerd_diff_pb2_grpc as diff_grpc
from soci_grpc._proto.soci import containerd_images_pb2 as images_pb2
from soci_grpc._proto.soci import containerd_images_pb2_grpc as images_grpc
from soci_grpc._proto.soci import containerd_leases_pb2 as leases_pb2
from soci_grpc._proto.soci import containerd_leases_pb2_grpc as leases_grpc
from soci_grpc._proto.soci import descriptor_pb2, mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from soci_grpc.metastore import Info as SnapshotInfo
from soci_grpc.metastore import Kind
from soci_grpc.snapshotter import Mount

__all__ = [
    "DEFAULT_ADDRESS",
    "ERROR_OF",
    "ContainerdClient",
    "ContentInfo",
    "ContentService",
    "DiffService",
    "Image",
    "ImagesService",
    "LeasesService",
    "Mount",
    "SnapshotInfo",
    "SnapshotsService",
    "error_from_rpc",
]

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
DEFAULT_LEASE_EXPIRE = 24 * 3600.0  # what containerd's client gives a lease it creates for a pull
WRITE_CHUNK = 1 << 20  # containerd accepts messages up to 16 MiB; 1 MiB keeps memory flat
MAX_MESSAGE = 16 << 20
LOCKED_RETRIES = 12  # ~ 40 s of waiting in all for an ingest ref another writer holds

# The one table: gRPC status -> soci_fs.errors class. Anything not listed is a plain SociError.
ERROR_OF: dict[grpc.StatusCode, type[SociError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.DATA_LOSS: FormatError,
}


def error_from_rpc(exc: grpc.RpcError, what: str) -> SociError:
    """The :mod:`soci_fs.errors` exception for a failed call; ``what`` names the call and the object."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or code.name.lower()
    cls = ERROR_OF.get(code, SociError)
    if cls is SociError:
        details = f"{code.name}: {details}"
    return cls(f"{what}: {details}")


def _target(address: str) -> tuple[str, str]:
    """(gRPC target, path for messages) of a containerd address: a path, ``unix://path`` or ``unix:path``."""
    path = address
    for prefix in ("unix://", "unix:"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    if not path:
        raise InvalidArgument(f"containerd address {address!r} is empty")
    return "unix:" + path, path


# ---------------------------------------------------------------------------------------------------------
# values


@dataclass(frozen=True)
class ContentInfo:
    """A committed blob in containerd's content store."""

    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


@dataclass(frozen=True)
class Image:
    """An image record: a name, the root descriptor (index or manifest) and labels."""

    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


def _descriptor_pb(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations or {})
    )


def _descriptor(pb: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(pb.media_type, pb.digest, pb.size, annotations=dict(pb.annotations))


def _ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def _content_info(pb: content_pb2.Info) -> ContentInfo:
    return ContentInfo(
        pb.digest, pb.size, dict(pb.labels), created_ns=_ns(pb.created_at), updated_ns=_ns(pb.updated_at)
    )


def _image(pb: images_pb2.Image) -> Image:
    return Image(
        pb.name,
        _descriptor(pb.target),
        dict(pb.labels),
        created_ns=_ns(pb.created_at),
        updated_ns=_ns(pb.updated_at),
    )


def _mounts(pb: snapshots_pb2.MountsReply) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options), m.target) for m in pb.mounts]


def _mount_pb(m: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))


def _chunks(data: bytes | Iterable[bytes], size: int) -> Iterator[bytes]:
    """``data`` (bytes or an iterable of byte strings) as pieces of at most ``size`` bytes."""
    parts: Iterable[bytes] = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    for part in parts:
        view = memoryview(part)
        for off in range(0, len(view), size):
            yield bytes(view[off : off + size])


# ---------------------------------------------------------------------------------------------------------
# the client


class ContainerdClient:
    """A connection to containerd for one namespace.

    Args:
        address: containerd's gRPC socket (a path, ``unix://path`` or ``unix:path``).
        namespace: sent as ``containerd-namespace`` with every call.
        timeout: seconds allowed for each call (a stream as a whole counts as one call); None = no limit.

    Blocking; one client may be used from one thread at a time (the current lease is client state).
    """

    def __init__(
        self, address: str = DEFAULT_ADDRESS, namespace: str = "default", *, timeout: float | None = None
    ) -> None:
        if not namespace:
            raise InvalidArgument("containerd namespace is empty")
        target, self.path = _target(address)
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.lease_id = ""
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self.content = ContentService(self)
        self.images = ImagesService(self)
        self.leases = LeasesService(self)
        self.diff = DiffService(self)

    def snapshots(self, snapshotter: str) -> SnapshotsService:
        """containerd's snapshots service for the snapshotter (plugin) ``snapshotter``."""
        return SnapshotsService(self, snapshotter)

    # ---- lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- leases as a context

    @contextlib.contextmanager
    def lease(
        self, *, expire: float = DEFAULT_LEASE_EXPIRE, labels: Mapping[str, str] | None = None
    ) -> Iterator[str]:
        """Create a lease, send it with every call made inside the block, delete it when the block ends.

        The lease expires after ``expire`` seconds even if this process dies before deleting it. An error
        deleting it is logged, not raised, so it never hides the block's own outcome.
        """
        lease_id = self.leases.create(expire=expire, labels=labels)
        previous, self.lease_id = self.lease_id, lease_id
        try:
            yield lease_id
        finally:
            self.lease_id = previous
            try:
                self.leases.delete(lease_id)
            except SociError as exc:
                log.warning("lease %s not deleted (it expires by itself): %s", lease_id, exc)

    # ---- calls

    def metadata(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if self.lease_id:
            md.append((LEASE_HEADER, self.lease_id))
        return md

    def _what(self, call: str, obj: str) -> str:
        return f"containerd {call} {obj}".rstrip()

    def call(self, method: Any, request: Any, call: str, obj: str = "") -> Any:
        """One unary call with the namespace/lease metadata and the timeout; errors mapped once."""
        log.debug("containerd %s %s (namespace %s)", call, obj, self.namespace)
        try:
            return method(request, metadata=self.metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, call, obj) from None

    def _error(self, exc: grpc.RpcError, call: str, obj: str) -> SociError:
        what = self._what(call, obj)
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
            what = f"{what} (containerd at {self.path})"
        return error_from_rpc(exc, what)


# ---------------------------------------------------------------------------------------------------------
# services


class ContentService:
    """``containerd.services.content.v1.Content``."""

    def __init__(self, client: ContainerdClient) -> None:
        self._c = client
        self._stub = content_grpc.ContentStub(client._channel)

    def info(self, digest: str) -> ContentInfo:
        """The blob's info. Raises ``NotFound`` when it is not in the store (in this namespace)."""
        resp = self._c.call(self._stub.Info, content_pb2.InfoRequest(digest=digest), "Content.Info", digest)
        return _content_info(resp.info)

    def has(self, digest: str) -> bool:
        try:
            self.info(digest)
        except NotFound:
            return False
        return True

    def read(self, digest: str, *, offset: int = 0, size: int = 0) -> bytes:
        """The blob's bytes from ``offset`` (``size`` 0: to the end), through the ``Read`` stream."""
        c = self._c
        req = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        log.debug("containerd Content.Read %s", digest)
        parts: list[bytes] = []
        try:
            for resp in self._stub.Read(req, metadata=c.metadata(), timeout=c.timeout):
                parts.append(resp.data)
        except grpc.RpcError as exc:
            raise c._error(exc, "Content.Read", digest) from None
        return b"".join(parts)

    def update_labels(self, digest: str, labels: Mapping[str, str]) -> ContentInfo:
        """Set (or, with an empty value, remove) the given labels; other labels stay as they are."""
        req = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        resp = self._c.call(self._stub.Update, req, "Content.Update", digest)
        return _content_info(resp.info)

    def abort(self, ref: str) -> None:
        """Drop the ingest ``ref`` (a partial write)."""
        self._c.call(self._stub.Abort, content_pb2.AbortRequest(ref=ref), "Content.Abort", ref)

    def write(
        self,
        ref: str,
        data: bytes | Iterable[bytes],
        expected: str,
        size: int,
        labels: Mapping[str, str] | None = None,
    ) -> bool:
        """Write one blob through the ``Write`` stream and commit it as ``expected`` (``size`` bytes).

        ``data`` is bytes or an iterable of byte strings (consumed once; an exception it raises ends the
        write uncommitted and is raised here). ``labels`` are set at commit. Returns True when the blob was
        written, False when containerd had it already (its labels are then left as they are).

        Raises:
            FormatError: the bytes do not hash to ``expected`` or are not ``size`` long (nothing committed).
            Unavailable: containerd cannot be reached, or another writer keeps the ingest ref locked.
            SociError: other failures, mapped from the gRPC status.
        """
        alg = expected.split(":", 1)[0]
        try:
            hashlib.new(alg)
        except ValueError as exc:
            raise InvalidArgument(f"blob {expected}: unsupported digest algorithm") from exc
        attempt = 0
        while True:
            try:
                return self._write_once(ref, data, expected, size, labels, alg)
            except _Locked as exc:
                # containerd answers UNAVAILABLE "ref ... locked" while another client writes this ref; the
                # answer comes to the opening STAT, before any data was taken from ``data``.
                if attempt >= LOCKED_RETRIES:
                    raise Unavailable(f"containerd Content.Write {expected} (ingest {ref}): {exc}") from None
                delay = min(0.01 * 2**attempt, 5.0)
                log.debug("ingest %s is locked by another writer; waiting %.2f s", ref, delay)
                time.sleep(delay)
                attempt += 1

    def _write_once(
        self,
        ref: str,
        data: bytes | Iterable[bytes],
        expected: str,
        size: int,
        labels: Mapping[str, str] | None,
        alg: str,
    ) -> bool:
        c = self._c
        what = f"{expected} (ingest {ref})"
        stat_answered = threading.Event()  # the data is not touched before containerd accepted the ingest
        state: dict[str, Any] = {"go": False, "error": None, "offset": 0, "digest": ""}

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            yield content_pb2.WriteContentRequest(
                action=content_pb2.STAT, ref=ref, total=size, expected=expected
            )
            stat_answered.wait()
            if not state["go"]:
                return
            h = hashlib.new(alg)
            offset = 0
            try:
                for piece in _chunks(data, WRITE_CHUNK):
                    h.update(piece)
                    yield content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, ref=ref, offset=offset, data=piece
                    )
                    offset += len(piece)
            except Exception as exc:  # raised by the caller's data; re-raised in the caller's thread
                state["error"] = exc
                return
            state["offset"], state["digest"] = offset, f"{alg}:{h.hexdigest()}"
            if offset != size or state["digest"] != expected:
                return  # end the stream without COMMIT: containerd keeps nothing under the digest
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                ref=ref,
                offset=offset,
                total=size,
                expected=expected,
                labels=dict(labels or {}),
            )

        log.debug("containerd Content.Write %s", what)
        committed = False
        call = self._stub.Write(requests(), metadata=c.metadata(), timeout=c.timeout)
        try:
            for resp in call:
                if resp.action == content_pb2.STAT:
                    state["go"] = True
                    stat_answered.set()
                elif resp.action == content_pb2.COMMIT:
                    committed = True
                    if resp.digest and resp.digest != expected:
                        raise FormatError(f"blob {what}: containerd committed {resp.digest}")
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.ALREADY_EXISTS:
                log.debug("blob %s already in the content store", expected)
                return False
            details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
            if code == grpc.StatusCode.UNAVAILABLE and not state["go"] and "locked" in details:
                raise _Locked(details) from None
            raise c._error(exc, "Content.Write", what) from None
        finally:
            stat_answered.set()
            call.cancel()  # a no-op once the stream has ended; ends it when we stopped reading early
        if state["error"] is not None:
            err = state["error"]
            raise err if isinstance(err, SociError) else SociError(f"blob {what}: reading data: {err}")
        if not committed:
            if state["offset"] != size:
                raise FormatError(
                    f"blob {expected}: got {state['offset']} bytes, expected {size}; not committed"
                )
            if state["digest"] != expected:
                raise FormatError(f"blob {expected}: data hashes to {state['digest']}; not committed")
            raise SociError(f"containerd Content.Write {what}: stream ended without a commit answer")
        return True


class _Locked(Exception):
    """containerd said another writer holds the ingest ref (before any data was sent)."""


class ImagesService:
    """``containerd.services.images.v1.Images``."""

    def __init__(self, client: ContainerdClient) -> None:
        self._c = client
        self._stub = images_grpc.ImagesStub(client._channel)

    def get(self, name: str) -> Image:
        """The image record ``name``; ``NotFound`` when there is none."""
        resp = self._c.call(self._stub.Get, images_pb2.GetImageRequest(name=name), "Images.Get", name)
        return _image(resp.image)

    def create(self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None) -> Image:
        """Create the record; ``AlreadyExists`` when the name is taken."""
        img = images_pb2.Image(name=name, target=_descriptor_pb(target), labels=dict(labels or {}))
        resp = self._c.call(
            self._stub.Create, images_pb2.CreateImageRequest(image=img), "Images.Create", name
        )
        return _image(resp.image)

    def update(self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None) -> Image:
        """Create the record, or point an existing one at ``target`` and set ``labels`` (other labels stay).

        This is what a pull does with the image name; containerd's own ``Update`` is the second step.
        """
        try:
            return self.create(name, target, labels)
        except AlreadyExists:
            pass
        labels = dict(labels or {})
        img = images_pb2.Image(name=name, target=_descriptor_pb(target), labels=labels)
        mask = field_mask_pb2.FieldMask(paths=["target", *(f"labels.{k}" for k in labels)])
        resp = self._c.call(
            self._stub.Update,
            images_pb2.UpdateImageRequest(image=img, update_mask=mask),
            "Images.Update",
            name,
        )
        return _image(resp.image)

    def delete(self, name: str, *, sync: bool = False) -> None:
        """Delete the record (``sync``: wait for the garbage collector)."""
        self._c.call(
            self._stub.Delete, images_pb2.DeleteImageRequest(name=name, sync=sync), "Images.Delete", name
        )


class LeasesService:
    """``containerd.services.leases.v1.Leases``."""

    def __init__(self, client: ContainerdClient) -> None:
        self._c = client
        self._stub = leases_grpc.LeasesStub(client._channel)

    def create(
        self,
        lease_id: str = "",
        *,
        expire: float | None = DEFAULT_LEASE_EXPIRE,
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """Create a lease (a random id unless given) that expires after ``expire`` seconds; its id."""
        lease_id = lease_id or f"soci-{time.time_ns()}-{secrets.token_hex(4)}"
        all_labels = dict(labels or {})
        if expire is not None:
            all_labels[LABEL_GC_EXPIRE] = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expire)
            )
        req = leases_pb2.CreateRequest(id=lease_id, labels=all_labels)
        resp = self._c.call(self._stub.Create, req, "Leases.Create", lease_id)
        log.debug("lease %s created (expires in %s s)", resp.lease.id, expire)
        return str(resp.lease.id)

    def delete(self, lease_id: str, *, sync: bool = False) -> None:
        """Delete the lease (``sync``: wait for the garbage collector)."""
        self._c.call(
            self._stub.Delete, leases_pb2.DeleteRequest(id=lease_id, sync=sync), "Leases.Delete", lease_id
        )

    def list(self) -> list[str]:
        """The ids of the namespace's leases."""
        resp = self._c.call(self._stub.List, leases_pb2.ListRequest(), "Leases.List")
        return [str(x.id) for x in resp.leases]


class SnapshotsService:
    """``containerd.services.snapshots.v1.Snapshots`` for one snapshotter, through containerd's metadata."""

    def __init__(self, client: ContainerdClient, snapshotter: str) -> None:
        self._c = client
        self.snapshotter = snapshotter
        self._stub = snapshots_pb2_grpc.SnapshotsStub(client._channel)

    def _what(self, obj: str) -> str:
        return f"{obj!r} (snapshotter {self.snapshotter})"

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """An active snapshot ``key`` on ``parent``; its mounts.

        ``AlreadyExists`` from a layer Prepare (label ``containerd.io/snapshot.ref``) can mean that the
        snapshotter provided the layer itself (a remote snapshot): ``stat`` the ref to find out.
        """
        req = snapshots_pb2.PrepareRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {})
        )
        return _mounts(self._c.call(self._stub.Prepare, req, "Snapshots.Prepare", self._what(key)))

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = snapshots_pb2.ViewRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {})
        )
        return _mounts(self._c.call(self._stub.View, req, "Snapshots.View", self._what(key)))

    def mounts(self, key: str) -> list[Mount]:
        req = snapshots_pb2.MountsRequest(snapshotter=self.snapshotter, key=key)
        return _mounts(self._c.call(self._stub.Mounts, req, "Snapshots.Mounts", self._what(key)))

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = snapshots_pb2.CommitRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {})
        )
        self._c.call(self._stub.Commit, req, "Snapshots.Commit", f"{self._what(key)} as {name!r}")

    def stat(self, key: str) -> SnapshotInfo:
        req = snapshots_pb2.StatRequest(snapshotter=self.snapshotter, key=key)
        info = self._c.call(self._stub.Stat, req, "Snapshots.Stat", self._what(key)).info
        return SnapshotInfo(
            name=info.name,
            kind=Kind(info.kind),
            parent=info.parent,
            labels=dict(info.labels),
            created_ns=_ns(info.created_at),
            updated_ns=_ns(info.updated_at),
        )

    def remove(self, key: str) -> None:
        req = snapshots_pb2.RemoveRequest(snapshotter=self.snapshotter, key=key)
        self._c.call(self._stub.Remove, req, "Snapshots.Remove", self._what(key))


class DiffService:
    """``containerd.services.diff.v1.Diff`` (the applier: layer blob from the content store -> mounts)."""

    def __init__(self, client: ContainerdClient) -> None:
        self._c = client
        self._stub = diff_grpc.DiffStub(client._channel)

    def apply(self, desc: Descriptor, mounts: Iterable[Mount]) -> Descriptor:
        """Apply the layer ``desc`` (its blob must be in the content store) onto ``mounts``.

        Returns the descriptor of the uncompressed tar that was applied: its digest is the layer's diff ID.
        """
        req = diff_pb2.ApplyRequest(diff=_descriptor_pb(desc), mounts=[_mount_pb(m) for m in mounts])
        resp = self._c.call(self._stub.Apply, req, "Diff.Apply", f"layer {desc.digest}")
        return _descriptor(resp.applied)
