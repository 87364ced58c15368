"""Conformance suite for the snapshotter: every test runs against the core and again through gRPC.

The ``sn`` fixture is either the :class:`Snapshotter` itself or :class:`GrpcClient`, which speaks to a real
gRPC server on a unix socket in a temp dir and turns status codes back into ``soci_fs.errors`` classes, so
one test body checks both the core and the service's mapping (proto -> core -> proto, error table).
Also: the metastore survives a reopen, the filter language, the layer-provider hook, and real overlay
mounts of what Prepare/View return.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from soci_fs import errors
from soci_grpc import service
from soci_grpc._proto.soci import snapshots_pb2, snapshots_pb2_grpc
from soci_grpc.metastore import Info, Kind, Usage
from soci_grpc.snapshotter import LayerRequest, LayerResult, Mount, Snapshotter, compile_filters

ERROR_OF = {code: cls for cls, code in service.STATUS_OF.items()}


class GrpcClient:
    """The Snapshotter's methods over a gRPC channel (what containerd's proxy does)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = snapshots_pb2_grpc.SnapshotsStub(channel)

    def _call(self, rpc: Any, request: Any) -> Any:
        try:
            return rpc(request, timeout=10)
        except grpc.RpcError as exc:
            cls = ERROR_OF.get(exc.code())
            if cls is None:
                raise
            raise cls(exc.details()) from None

    @staticmethod
    def _mounts(reply: Any) -> list[Mount]:
        return [Mount(m.type, m.source, tuple(m.options), m.target) for m in reply.mounts]

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        req = snapshots_pb2.PrepareRequest(snapshotter="soci", key=key, parent=parent, labels=labels or {})
        return self._mounts(self._call(self.stub.Prepare, req))

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        req = snapshots_pb2.ViewRequest(snapshotter="soci", key=key, parent=parent, labels=labels or {})
        return self._mounts(self._call(self.stub.View, req))

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self._call(self.stub.Mounts, snapshots_pb2.MountsRequest(key=key)))

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self._call(self.stub.Commit, snapshots_pb2.CommitRequest(name=name, key=key, labels=labels or {}))

    def remove(self, key: str) -> None:
        self._call(self.stub.Remove, snapshots_pb2.RemoveRequest(key=key))

    def stat(self, key: str) -> Info:
        return service.info_from_proto(self._call(self.stub.Stat, snapshots_pb2.StatRequest(key=key)).info)

    def update(self, info: Info, fieldpaths: list[str] | tuple[str, ...] = ()) -> Info:
        req = snapshots_pb2.UpdateRequest(info=service.info_to_proto(info))
        if fieldpaths:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(fieldpaths)))
        return service.info_from_proto(self._call(self.stub.Update, req).info)

    def walk(self, filters: list[str] | tuple[str, ...] = ()) -> list[Info]:
        try:
            replies = list(self.stub.List(snapshots_pb2.ListRequest(filters=list(filters)), timeout=10))
        except grpc.RpcError as exc:
            raise ERROR_OF.get(exc.code(), errors.SociError)(exc.details()) from None
        return [service.info_from_proto(i) for r in replies for i in r.info]

    def usage(self, key: str) -> Usage:
        r = self._call(self.stub.Usage, snapshots_pb2.UsageRequest(key=key))
        return Usage(r.size, r.inodes)

    def cleanup(self) -> None:
        self._call(self.stub.Cleanup, snapshots_pb2.CleanupRequest())


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Snapshotter]:
    s = Snapshotter(tmp_path / "root" / "snapshotter")
    yield s
    s.close()


@pytest.fixture(params=["core", "grpc"])
def sn(request: pytest.FixtureRequest, core: Snapshotter, tmp_path: Path) -> Iterator[Any]:
    if request.param == "core":
        yield core
        return
    sock = str(tmp_path / "s" / "snap.sock")
    os.makedirs(os.path.dirname(sock))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service.add_to_server(core, server)
    assert server.add_insecure_port("unix:" + sock) != 0
    server.start()
    channel = grpc.insecure_channel("unix://" + sock)
    try:
        yield GrpcClient(channel)
    finally:
        channel.close()
        server.stop(None).wait()


def fs(core: Snapshotter, sid: str) -> str:
    return str(core.fs_dir(sid))


def sid_of(core: Snapshotter, key: str) -> str:
    with core.ms.transaction() as tx:
        return tx.info(key)[0]


def chain(sn: Any, n: int) -> list[str]:
    """n committed layers l1..ln, each with a file; returns their names."""
    names, parent = [], ""
    for i in range(1, n + 1):
        mounts = sn.prepare(f"ex-{i}", parent)
        upper = mounts[0].source if mounts[0].type == "bind" else _opt(mounts[0], "upperdir")
        Path(upper, f"f{i}").write_text(f"layer {i}")
        sn.commit(f"l{i}", f"ex-{i}")
        names.append(f"l{i}")
        parent = f"l{i}"
    return names


def _opt(m: Mount, name: str) -> str:
    return next(o.split("=", 1)[1] for o in m.options if o.startswith(name + "="))


# ------------------------------------------------------------------------------------------------------
# mounts


def test_prepare_without_parent_is_a_rw_bind_mount(sn: Any, core: Snapshotter) -> None:
    mounts = sn.prepare("k1")
    sid = sid_of(core, "k1")
    assert mounts == [Mount("bind", fs(core, sid), ("rw", "rbind"))]
    assert Path(fs(core, sid)).is_dir() and (core.snapshots_dir / sid / "work").is_dir()
    assert oct((core.snapshots_dir / sid / "work").stat().st_mode & 0o777) == oct(0o711)
    assert sn.mounts("k1") == mounts


def test_prepare_on_a_chain_is_overlay_nearest_parent_first(sn: Any, core: Snapshotter) -> None:
    chain(sn, 3)
    ids = [sid_of(core, f"l{i}") for i in (1, 2, 3)]
    mounts = sn.prepare("ctr", "l3")
    sid = sid_of(core, "ctr")
    assert mounts == [
        Mount(
            "overlay",
            "overlay",
            (
                f"workdir={core.work_dir(sid)}",
                f"upperdir={core.fs_dir(sid)}",
                "lowerdir=" + ":".join(fs(core, i) for i in reversed(ids)),
            ),
        )
    ]
    assert sn.mounts("ctr") == mounts


def test_views_are_read_only(sn: Any, core: Snapshotter) -> None:
    chain(sn, 2)
    l1, l2 = sid_of(core, "l1"), sid_of(core, "l2")
    assert sn.view("v0") == [Mount("bind", fs(core, sid_of(core, "v0")), ("ro", "rbind"))]
    assert sn.view("v1", "l1") == [Mount("bind", fs(core, l1), ("ro", "rbind"))]
    assert sn.view("v2", "l2") == [Mount("overlay", "overlay", (f"lowerdir={fs(core, l2)}:{fs(core, l1)}",))]
    assert not (core.snapshots_dir / sid_of(core, "v2") / "work").exists()
    assert sn.stat("v2").kind == Kind.VIEW
    with pytest.raises(errors.FailedPrecondition):
        sn.commit("x", "v2")  # only active snapshots commit


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")
def test_returned_mounts_really_mount(sn: Any, tmp_path: Path) -> None:
    chain(sn, 2)
    (m,) = sn.prepare("ctr", "l2")
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True)
    try:
        assert (target / "f1").read_text() == "layer 1" and (target / "f2").read_text() == "layer 2"
        (target / "new").write_text("x")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert Path(_opt(m, "upperdir"), "new").read_text() == "x"


# ------------------------------------------------------------------------------------------------------
# lifecycle and errors


def test_commit_and_stat(sn: Any) -> None:
    sn.prepare("k", "", {"a": "1"})
    info = sn.stat("k")
    assert (info.name, info.kind, info.parent, dict(info.labels)) == ("k", Kind.ACTIVE, "", {"a": "1"})
    assert info.created_ns > 0 and info.updated_ns >= info.created_ns
    sn.commit("c", "k", {"b": "2"})
    with pytest.raises(errors.NotFound):
        sn.stat("k")
    info = sn.stat("c")
    assert (info.name, info.kind, dict(info.labels)) == ("c", Kind.COMMITTED, {"b": "2"})
    sn.prepare("k2", "c")
    assert sn.stat("k2").parent == "c"


def test_error_codes(sn: Any) -> None:
    chain(sn, 1)
    sn.prepare("a")
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("a")
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("l1")  # names and keys share one space
    with pytest.raises(errors.NotFound):
        sn.prepare("b", "no-such-parent")
    with pytest.raises(errors.InvalidArgument):
        sn.prepare("b", "a")  # parent is not committed
    with pytest.raises(errors.InvalidArgument):
        sn.prepare("")
    with pytest.raises(errors.InvalidArgument):
        sn.prepare("b", "", {"k": "v" * 5000})
    with pytest.raises(errors.NotFound):
        sn.mounts("nope")
    with pytest.raises(errors.FailedPrecondition):
        sn.mounts("l1")  # committed snapshots have no mounts
    with pytest.raises(errors.NotFound):
        sn.commit("x", "nope")
    sn.prepare("c")
    with pytest.raises(errors.AlreadyExists):
        sn.commit("l1", "c")
    with pytest.raises(errors.FailedPrecondition):
        sn.commit("x", "l1")
    with pytest.raises(errors.NotFound):
        sn.remove("nope")
    with pytest.raises(errors.NotFound):
        sn.usage("nope")
    with pytest.raises(errors.NotFound):
        sn.update(Info("nope", Kind.ACTIVE))
    assert [i.name for i in sn.walk()] == ["a", "c", "l1"]  # failed calls left nothing behind


def test_remove_refuses_a_snapshot_with_children_and_cleanup_removes_dirs(sn: Any, core: Snapshotter) -> None:
    chain(sn, 2)
    sn.prepare("ctr", "l2")
    ids = {k: sid_of(core, k) for k in ("l1", "l2", "ctr")}
    for parent in ("l1", "l2"):
        with pytest.raises(errors.FailedPrecondition):
            sn.remove(parent)
    sn.remove("ctr")
    assert (core.snapshots_dir / ids["ctr"]).exists()  # directories go at Cleanup
    sn.remove("l2")
    stale = core.snapshots_dir / "new-crashed"
    stale.mkdir()
    sn.cleanup()
    assert sorted(p.name for p in core.snapshots_dir.iterdir()) == [ids["l1"]]
    sn.remove("l1")
    sn.cleanup()
    assert list(core.snapshots_dir.iterdir()) == [] and sn.walk() == []
    sn.prepare("again")
    assert int(sid_of(core, "again")) > int(ids["ctr"])  # ids are never reused


def test_update_labels(sn: Any) -> None:
    sn.prepare("k", "", {"a": "1", "b": "2"})
    info = sn.stat("k")
    out = sn.update(Info("k", Kind.ACTIVE, labels={"a": "9", "c": "3"}), ["labels.a", "labels.b"])
    assert dict(out.labels) == {"a": "9"}  # b deleted (absent from info), c not in the mask
    assert out.updated_ns >= info.updated_ns and out.created_ns == info.created_ns
    out = sn.update(Info("k", Kind.ACTIVE, labels={"x": "y"}), ["labels"])
    assert dict(out.labels) == {"x": "y"}
    out = sn.update(Info("k", Kind.ACTIVE, labels={"z": "1"}))
    assert dict(out.labels) == {"z": "1"} and dict(sn.stat("k").labels) == {"z": "1"}
    with pytest.raises(errors.InvalidArgument):
        sn.update(Info("k", Kind.ACTIVE, parent="p"), ["parent"])
    assert sn.stat("k").kind == Kind.ACTIVE and sn.stat("k").parent == ""


def test_list_with_filters(sn: Any) -> None:
    chain(sn, 2)
    sn.prepare("default/7/ctr", "l2", {"containerd.io/gc.root": "x", "team": "a.b"})
    sn.view("v", "l1")
    names = lambda *f: [i.name for i in sn.walk(list(f))]  # noqa: E731
    assert names() == ["default/7/ctr", "l1", "l2", "v"]
    assert names("kind==committed") == ["l1", "l2"]
    assert names("kind==active") == ["default/7/ctr"]
    assert names("kind==view", "name==l1") == ["l1", "v"]  # several filters: any
    assert names("kind==committed,parent==l1") == ["l2"]  # one filter, several selectors: all
    assert names('labels."containerd.io/gc.root"') == ["default/7/ctr"]
    assert names("labels.containerd.io/gc.root==x") == ["default/7/ctr"]
    assert names("labels.team==a.b") == ["default/7/ctr"]
    assert names("name~=^l") == ["l1", "l2"]
    assert names("name~=|^default/[0-9]+/|") == ["default/7/ctr"]
    assert names("name~=/^l[2-9]/") == ["l2"]
    assert names("parent!=l1,kind!=view") == ["default/7/ctr", "l1"]
    assert names("parent") == ["default/7/ctr", "l1", "l2", "v"]  # always present, as containerd's adaptor
    assert names('parent==""') == ["l1"]  # what containerd's metadata layer asks for a bottom remote layer
    with pytest.raises(errors.InvalidArgument):
        sn.walk(["kind=="])
    with pytest.raises(errors.InvalidArgument):
        sn.walk(["name~=("])


def test_list_streams_in_batches(core: Snapshotter, sn: Any) -> None:
    for i in range(250):
        core.prepare(f"k{i:03d}")
    assert [i.name for i in sn.walk()] == [f"k{i:03d}" for i in range(250)]


def test_usage(sn: Any, core: Snapshotter) -> None:
    (m,) = sn.prepare("k")
    empty = sn.usage("k")
    assert empty.inodes == 1
    Path(m.source, "d").mkdir()
    Path(m.source, "d", "f").write_bytes(os.urandom(100_000))
    os.link(Path(m.source, "d", "f"), Path(m.source, "hard"))  # counted once
    u = sn.usage("k")
    assert u.inodes == 3 and u.size >= 100_000 + empty.size
    sn.commit("c", "k")
    assert sn.usage("c") == u  # stored at commit
    Path(m.source, "late").write_bytes(b"x" * 10_000)
    assert sn.usage("c") == u


def test_labels_given_to_prepare_are_kept(sn: Any) -> None:
    labels = {
        "containerd.io/snapshot.ref": "sha256:" + "1" * 64,
        "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/e2e/test:v1",
        "containerd.io/snapshot/cri.layer-digest": "sha256:" + "2" * 64,
    }
    sn.prepare("default/1/extract-1 sha256:" + "1" * 64, "", labels)
    assert dict(sn.stat("default/1/extract-1 sha256:" + "1" * 64).labels) == labels
    sn.view("v", "", {"containerd.io/gc.root": "now"})
    assert dict(sn.stat("v").labels) == {"containerd.io/gc.root": "now"}


# ------------------------------------------------------------------------------------------------------
# core only: persistence, the layer-provider hook, filters, the error table


def test_metadata_survives_a_reopen(tmp_path: Path) -> None:
    root = tmp_path / "sn"
    a = Snapshotter(root)
    chain(a, 2)
    a.prepare("ctr", "l2", {"x": "1"})
    before = a.walk()
    a.close()
    b = Snapshotter(root)
    try:
        assert b.walk() == before
        assert b.mounts("ctr")[0].type == "overlay"
        assert oct(root.stat().st_mode & 0o777) == oct(0o700)
    finally:
        b.close()


class _Provider:
    def __init__(self, result: LayerResult | None) -> None:
        self.result = result
        self.requests: list[LayerRequest] = []

    def provide_layer(self, request: LayerRequest) -> LayerResult | None:
        self.requests.append(request)
        if self.result is not None:
            (request.mountpoint / "from-provider").write_text("yes")
        return self.result


def test_layer_provider_ready_commits_under_the_ref_and_says_already_exists(tmp_path: Path) -> None:
    provider = _Provider(LayerResult({"containerd.io/snapshot/remote": "remote snapshot"}))
    s = Snapshotter(tmp_path / "sn", layer_provider=provider)
    try:
        s.prepare("plain")  # no snapshot.ref label: an ordinary rootfs, the provider is not asked
        assert provider.requests == []
        ref = "sha256:" + "a" * 64
        with pytest.raises(errors.AlreadyExists, match=f'target snapshot "{ref}": already exists'):
            s.prepare("ns/1/extract-1 " + ref, "", {"containerd.io/snapshot.ref": ref})
        (req,) = provider.requests
        assert req.ref == ref and req.parent_dirs == () and req.mountpoint == s.fs_dir(req.snapshot_id)
        info = s.stat(ref)
        assert info.kind == Kind.COMMITTED
        assert info.labels["containerd.io/snapshot/remote"] == "remote snapshot"
        assert s.usage(ref) == Usage()  # not measured for remote layers
        with pytest.raises(errors.NotFound):
            s.stat("ns/1/extract-1 " + ref)  # the active key is gone: it was committed
    finally:
        s.close()


def test_layer_provider_deferring_gives_normal_mounts(tmp_path: Path) -> None:
    provider = _Provider(None)
    s = Snapshotter(tmp_path / "sn", layer_provider=provider)
    try:
        (m,) = s.prepare("k", "", {"containerd.io/snapshot.ref": "sha256:" + "b" * 64})
        assert m.type == "bind" and len(provider.requests) == 1 and s.stat("k").kind == Kind.ACTIVE
    finally:
        s.close()


@pytest.mark.parametrize(
    ("filters", "ok"),
    [
        ([], True),
        ([""], True),
        (["name==a"], True),
        (["name==b"], False),
        (['name=="a"'], True),
        (["labels.k==v,name==a"], True),
        (["labels.k==w", "name==a"], True),
        (["labels.missing"], False),
        (["labels.missing!=x"], True),
        (["kind==active"], True),
    ],
)
def test_filter_table(filters: list[str], ok: bool) -> None:
    assert compile_filters(filters)(Info("a", Kind.ACTIVE, labels={"k": "v"})) is ok


def test_every_error_class_has_a_status() -> None:
    assert set(service.STATUS_OF) == {
        errors.NotFound,
        errors.AlreadyExists,
        errors.InvalidArgument,
        errors.FailedPrecondition,
        errors.Unavailable,
        errors.FormatError,
        errors.Unauthenticated,
    }
    assert service.status_of(errors.NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert service.status_of(RuntimeError("x")) == grpc.StatusCode.UNKNOWN
