"""The gRPC servicer of ``containerd.services.snapshots.v1.Snapshots``: proto -> core -> proto.

Each RPC unpacks its request, calls :class:`soci_grpc.snapshotter.Snapshotter` and packs the answer. Errors
are mapped to gRPC status codes in one place, :data:`STATUS_OF` (the ``soci_fs.errors`` class, or the
nearest base class in it; anything else is ``UNKNOWN`` and logged). The error message travels as the status
details, which containerd's proxy turns back into its own error kinds.

Will not: decide anything about snapshots, or read the ``containerd-namespace`` metadata (the keys
containerd's metadata layer sends are already namespaced, e.g. ``default/7/extract-...``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from soci_fs import errors
from soci_grpc._proto.soci import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from soci_grpc.metastore import Info, Kind
from soci_grpc.snapshotter import Mount, Snapshotter, iter_batches

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"

STATUS_OF: dict[type[errors.SociError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.FormatError: grpc.StatusCode.DATA_LOSS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc`` by :data:`STATUS_OF` (walking its class's bases); else UNKNOWN."""
    for cls in type(exc).__mro__:
        code = STATUS_OF.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


F = TypeVar("F", bound=Callable[..., Any])


def _rpc(method: F) -> F:
    """Map exceptions of a unary RPC to a status with the error's message (the one mapping point)."""

    @functools.wraps(method)
    def wrapper(self: SnapshotsServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code = status_of(exc)
            if code == grpc.StatusCode.UNKNOWN:
                log.error("%s failed unexpectedly", method.__name__, exc_info=True)
            else:
                log.debug("%s: %s: %s", method.__name__, code.name, exc)
            context.abort(code, str(exc))

    return wrapper  # type: ignore[return-value]


def _mounts_reply(mounts: list[Mount]) -> snapshots_pb2.MountsReply:
    return snapshots_pb2.MountsReply(
        mounts=[
            mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
            for m in mounts
        ]
    )


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_proto(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=_ts(info.created_ns),
        updated_at=_ts(info.updated_ns),
        labels=dict(info.labels),
    )


def info_from_proto(msg: snapshots_pb2.Info) -> Info:
    return Info(
        name=msg.name,
        parent=msg.parent,
        kind=Kind(msg.kind) if msg.kind in Kind._value2member_map_ else Kind.UNKNOWN,
        labels=dict(msg.labels),
        created_ns=msg.created_at.seconds * 1_000_000_000 + msg.created_at.nanos,
        updated_ns=msg.updated_at.seconds * 1_000_000_000 + msg.updated_at.nanos,
    )


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    """The Snapshots service over one :class:`Snapshotter`."""

    def __init__(self, core: Snapshotter) -> None:
        self.core = core

    @_rpc
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        log.debug("prepare", extra={"key": request.key, "parent": request.parent})
        return _mounts_reply(self.core.prepare(request.key, request.parent, dict(request.labels)))

    @_rpc
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        log.debug("view", extra={"key": request.key, "parent": request.parent})
        return _mounts_reply(self.core.view(request.key, request.parent, dict(request.labels)))

    @_rpc
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _mounts_reply(self.core.mounts(request.key))

    @_rpc
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        log.debug("commit", extra={"key": request.key, "snapshot_name": request.name})
        self.core.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        log.debug("remove", extra={"key": request.key})
        self.core.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        return snapshots_pb2.InfoReply(info=info_to_proto(self.core.stat(request.key)))

    @_rpc
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.core.update(info_from_proto(request.info), paths)
        return snapshots_pb2.InfoReply(info=info_to_proto(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            infos = self.core.walk(list(request.filters))
        except Exception as exc:
            context.abort(status_of(exc), str(exc))
        for batch in iter_batches(infos):
            yield snapshots_pb2.ListReply(info=[info_to_proto(i) for i in batch])

    @_rpc
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        u = self.core.usage(request.key)
        return snapshots_pb2.UsageReply(size=u.size, inodes=u.inodes)

    @_rpc
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.core.cleanup()
        return empty_pb2.Empty()


def add_to_server(core: Snapshotter, server: grpc.Server) -> SnapshotsServicer:
    """Register the Snapshots service for ``core`` on ``server``."""
    servicer = SnapshotsServicer(core)
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(servicer, server)
    return servicer
