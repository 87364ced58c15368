"""The containerd client against a real containerd 1.6 (``tests/harness/containerd.py``), one per module.

Every test works in a namespace of its own, so they share the instance. What containerd stored is checked
through ``ctr`` where that is independent of the client (content, images, leases). Snapshots use
containerd's built-in ``overlayfs`` snapshotter here; the ``soci`` proxy snapshotter is exercised by
``tests/integration/test_rpull.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

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
from soci_grpc.containerd import ContainerdClient, Kind, error_from_rpc
from tests.fs.ocigen import MT_LAYER_GZIP, MT_MANIFEST, Entry, make_tar
from tests.harness.containerd import CONTAINERD_BIN, Containerd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN), reason="needs root and containerd"
    ),
]

_ns = itertools.count()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    c = Containerd()
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def client(containerd: Containerd) -> Iterator[ContainerdClient]:
    # "unix://" form of the address here; the bare path is used by ``ctr_ns``' twin in test_rpull
    with ContainerdClient("unix://" + containerd.address, f"client-test-{next(_ns)}") as c:
        yield c


def ctr(containerd: Containerd, client: ContainerdClient, *args: str) -> str:
    return containerd.ctr("--namespace", client.namespace, *args).stdout


def gc_now(client: ContainerdClient) -> None:
    """Make containerd run its garbage collector before answering (deleting a lease with ``sync``)."""
    lease = client.leases.create(expire=60)
    client.leases.delete(lease, sync=True)


# ---------------------------------------------------------------------------------------------------------
# content


def test_content_write_info_read_and_labels(containerd: Containerd, client: ContainerdClient) -> None:
    data = random.Random(1).randbytes(2_500_000)  # three WRITE messages of 1 MiB at most
    digest = sha(data)
    with client.lease():
        assert not client.content.has(digest)
        assert client.content.write("test-blob", data, digest, len(data), {"a": "1"}) is True
        info = client.content.info(digest)
        assert (info.digest, info.size, dict(info.labels)) == (digest, len(data), {"a": "1"})
        assert info.created_ns > 0
        assert client.content.has(digest)
        assert client.content.read(digest) == data
        assert client.content.read(digest, offset=1_000_000, size=10) == data[1_000_000:1_000_010]
        assert client.content.read(digest, offset=2_400_000) == data[2_400_000:]

        updated = client.content.update_labels(digest, {"b": "2", "containerd.io/gc.ref.content.x": digest})
        assert dict(updated.labels) == {"a": "1", "b": "2", "containerd.io/gc.ref.content.x": digest}
        # writing it again is a success that changes nothing
        assert client.content.write("test-blob-2", data, digest, len(data), {"c": "3"}) is False
        assert "c" not in client.content.info(digest).labels
        listing = ctr(containerd, client, "content", "ls")
        assert digest in listing and "a=1" in listing and "b=2" in listing, listing


def test_content_write_streams_an_iterable_and_verifies(client: ContainerdClient) -> None:
    data = b"0123456789" * 100_000
    digest = sha(data)
    with client.lease():
        # wrong bytes: never committed under the expected digest
        with pytest.raises(FormatError, match=f"blob {digest}: data hashes to sha256:"):
            client.content.write("iter", [data[:-1] + b"x"], digest, len(data))
        assert not client.content.has(digest)
        with pytest.raises(FormatError, match=f"got {len(data) - 5} bytes, expected {len(data)}"):
            client.content.write("iter", iter([data[:-5]]), digest, len(data))

        def failing() -> Iterator[bytes]:
            yield data[:1000]
            raise Unavailable("registry went away (test)")

        with pytest.raises(Unavailable, match="registry went away"):
            client.content.write("iter", failing(), digest, len(data))
        assert not client.content.has(digest)
        # the ingest "iter" holds partial data now; a new write under the same ref starts again at 0
        chunks = (data[i : i + 70_000] for i in range(0, len(data), 70_000))
        assert client.content.write("iter", chunks, digest, len(data)) is True
        assert client.content.read(digest) == data


def test_content_errors_name_the_call_and_the_blob(client: ContainerdClient) -> None:
    missing = sha(b"not there")
    with pytest.raises(NotFound, match=rf"containerd Content.Info {missing}: .*not found"):
        client.content.info(missing)
    with pytest.raises(NotFound, match=rf"containerd Content.Read {missing}"):
        client.content.read(missing)
    with pytest.raises(NotFound, match=rf"containerd Content.Update {missing}"):
        client.content.update_labels(missing, {"a": "b"})
    with pytest.raises(InvalidArgument, match="unsupported digest algorithm"):
        client.content.write("x", b"", "nope:00", 0)


# ---------------------------------------------------------------------------------------------------------
# leases


def test_lease_keeps_content_from_the_collector_until_it_ends(
    containerd: Containerd, client: ContainerdClient
) -> None:
    loose, kept = b"written outside any lease", b"written under a lease"
    client.content.write("loose", loose, sha(loose), len(loose))
    gc_now(client)
    assert not client.content.has(sha(loose))  # nothing holds it: the collector takes it

    with client.lease(expire=600, labels={"purpose": "test"}) as lease_id:
        assert client.lease_id == lease_id
        assert client.leases.list() == [lease_id]
        shown = ctr(containerd, client, "leases", "ls")
        assert lease_id in shown and "containerd.io/gc.expire=" in shown and "purpose=test" in shown
        client.content.write("kept", kept, sha(kept), len(kept))
        gc_now(client)
        assert client.content.has(sha(kept))
    assert client.lease_id == ""
    assert client.leases.list() == []
    gc_now(client)
    assert not client.content.has(sha(kept))


# ---------------------------------------------------------------------------------------------------------
# images


def test_images_create_get_update_delete(containerd: Containerd, client: ContainerdClient) -> None:
    m1 = b'{"schemaVersion":2}'
    m2 = b'{"schemaVersion":2,"x":1}'
    t1 = Descriptor(MT_MANIFEST, sha(m1), len(m1))
    t2 = Descriptor(MT_MANIFEST, sha(m2), len(m2))
    name = "registry.test/repo:v1"
    with pytest.raises(NotFound, match=r"containerd Images.Get registry.test/repo:v1: .*not found"):
        client.images.get(name)
    img = client.images.create(name, t1, {"one": "1"})
    assert (img.name, img.target, dict(img.labels)) == (name, t1, {"one": "1"})
    with pytest.raises(AlreadyExists, match=r"containerd Images.Create registry.test/repo:v1"):
        client.images.create(name, t2)
    # update = create or re-point: target replaced, labels merged
    img = client.images.update(name, t2, {"two": "2"})
    assert img.target == t2 and dict(img.labels) == {"one": "1", "two": "2"}
    assert client.images.get(name).target.digest == t2.digest
    assert name in ctr(containerd, client, "images", "ls", "-q")
    assert client.images.update("registry.test/repo:v2", t1).name == "registry.test/repo:v2"

    with ContainerdClient(containerd.address, client.namespace + "-other") as other, pytest.raises(NotFound):
        other.images.get(name)
    client.images.delete(name, sync=True)
    with pytest.raises(NotFound):
        client.images.get(name)
    with pytest.raises(NotFound, match=r"containerd Images\.Delete"):
        client.images.delete(name)


# ---------------------------------------------------------------------------------------------------------
# snapshots and diff


def test_snapshots_and_diff_apply(client: ContainerdClient) -> None:
    tar = make_tar([Entry("etc/", type=b"5"), Entry("etc/motd", b"applied by containerd\n")])
    blob = gzip.compress(tar, mtime=0)
    layer = Descriptor(MT_LAYER_GZIP, sha(blob), len(blob))
    sn = client.snapshots("overlayfs")
    with client.lease():
        client.content.write("layer-test", blob, layer.digest, layer.size)
        key = "extract-1-test " + sha(tar)
        mounts = sn.prepare(key, "", {"containerd.io/snapshot.ref": sha(tar)})
        assert mounts and mounts[0].source
        assert sn.stat(key).kind == Kind.ACTIVE
        assert sn.mounts(key) == mounts
        with pytest.raises(
            AlreadyExists, match=rf"containerd Snapshots.Prepare '{key}' \(snapshotter overlayfs\)"
        ):
            sn.prepare(key)
        applied = client.diff.apply(layer, mounts)
        assert applied.digest == sha(tar)
        sn.commit(sha(tar), key, {"containerd.io/snapshot.ref": sha(tar), "x": "y"})
        info = sn.stat(sha(tar))
        assert info.kind == Kind.COMMITTED and info.parent == "" and info.labels["x"] == "y"
        with pytest.raises(NotFound, match=r"Snapshots\.Stat"):
            sn.stat(key)  # the active snapshot became the committed one

        view = sn.view("view-1", sha(tar))
        assert len(view) == 1 and view[0].type == "bind" and "ro" in view[0].options
        assert (Path(view[0].source) / "etc" / "motd").read_text() == "applied by containerd\n"
        child = sn.prepare("child-1", sha(tar))
        assert child[0].type == "overlay" and any(o.startswith("lowerdir=") for o in child[0].options)
        with pytest.raises(FailedPrecondition, match=r"Snapshots\.Remove"):
            sn.remove(sha(tar))  # it has children
        sn.remove("child-1")
        sn.remove("view-1")
        sn.remove(sha(tar))
        with pytest.raises(NotFound):
            sn.stat(sha(tar))

        other = Descriptor(MT_LAYER_GZIP, sha(b"no such blob"), 12)
        scratch = sn.prepare("scratch", "")
        with pytest.raises(NotFound, match=rf"containerd Diff.Apply layer {other.digest}"):
            client.diff.apply(other, scratch)
        sn.remove("scratch")


# ---------------------------------------------------------------------------------------------------------
# errors


def test_unreachable_containerd_is_unavailable(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    with ContainerdClient(str(sock)) as c:
        with pytest.raises(Unavailable, match=rf"containerd Images.Get x/y:z \(containerd at {sock}\)"):
            c.images.get("x/y:z")
        with pytest.raises(Unavailable, match=r"Leases\.Create"), c.lease():
            pass
    with pytest.raises(InvalidArgument, match="namespace is empty"):
        ContainerdClient(str(sock), "")


class _FakeCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None: ...
    def trailing_metadata(self) -> None: ...
    def is_active(self) -> bool: ...
    def time_remaining(self) -> None: ...
    def cancel(self) -> None: ...
    def add_callback(self, callback: object) -> None: ...


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Unavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.DATA_LOSS, FormatError),
        (grpc.StatusCode.UNKNOWN, SociError),
        (grpc.StatusCode.INTERNAL, SociError),
    ],
)
def test_error_table(code: grpc.StatusCode, cls: type[SociError]) -> None:
    err = error_from_rpc(_FakeCall(code, "it broke"), "containerd Thing.Do obj")
    assert type(err) is cls
    suffix = "it broke" if cls is not SociError else f"{code.name}: it broke"
    assert str(err) == f"containerd Thing.Do obj: {suffix}"
