"""``soci image rpull``: the pure parts, the pull logic against fakes, and end to end through containerd 1.6.

End to end: Debian's docker-registry (htpasswd and token auth) holds small images built here (static busybox
plus a top layer with a whiteout; configs with ``rootfs.diff_ids``); ``soci-snapshotter-grpc`` runs as a
child process and is containerd's ``soci`` proxy snapshotter; ``soci image rpull`` runs in this process and
talks to that containerd. The daemon has no SOCI index for these images, so every layer Prepare returns
ordinary mounts and rpull downloads, applies and commits each layer; then ``ctr run --snapshotter soci``
runs a container on the result. The fakes cover what this daemon never does yet: a Prepare answering
ALREADY_EXISTS because the snapshotter provided the layer itself.

One containerd and one daemon serve the whole module; every test uses images of its own and a namespace of
its own. Everything is stopped by PID at the end (the harness unmounts leftovers).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from soci_fs.errors import AlreadyExists, FailedPrecondition, FormatError, NotFound
from soci_fs.registry.client import Descriptor, Manifest
from soci_fs.registry.reference import parse
from soci_grpc.cli import cmd_image
from soci_grpc.cli.cmd_image import (
    LABEL_IMAGE_LAYERS,
    LABEL_LAYERS_SIZE,
    MAX_LABEL,
    Puller,
    chain_ids,
    layer_labels,
)
from soci_grpc.containerd import ContainerdClient, Kind, Mount, SnapshotInfo
from tests.fs.ocigen import MT_CONFIG, MT_INDEX, MT_LAYER_GZIP, MT_MANIFEST, Entry, make_tar
from tests.grpc.clihelp import Result, run
from tests.harness.containerd import CONTAINERD_BIN, Containerd
from tests.harness.registry import PASSWORD, USER, RawPusher, Registry
from tests.integration.test_containerd_snapshots import ARCH, BUSYBOX, Daemon

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN), reason="needs root and containerd"
)
_n = itertools.count()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# pure parts


def test_chain_ids_follow_the_image_spec() -> None:
    d = [sha(b"a"), sha(b"b"), sha(b"c")]
    c1 = "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d[2]}".encode()).hexdigest()
    assert chain_ids(d) == [d[0], c1, c2]
    assert chain_ids([]) == []


def test_layer_labels_for_one_layer() -> None:
    layers = [Descriptor(MT_LAYER_GZIP, sha(bytes([i])), 1000 + i) for i in range(3)]
    labels = layer_labels(
        chain_id="sha256:chain",
        image_ref="registry.test/app:v1",
        manifest_digest="sha256:manifest",
        layers=layers,
        index=1,
        soci_index_digest="sha256:index",
    )
    assert labels == {
        "containerd.io/snapshot.ref": "sha256:chain",
        "containerd.io/snapshot/cri.image-ref": "registry.test/app:v1",
        "containerd.io/snapshot/cri.manifest-digest": "sha256:manifest",
        "containerd.io/snapshot/cri.layer-digest": layers[1].digest,
        "containerd.io/snapshot/cri.image-layers": f"{layers[1].digest},{layers[2].digest}",
        "containerd.io/snapshot/remote/soci.size": "1001",
        "containerd.io/snapshot/remote/image.layers.size": "1001,1002",
        "containerd.io/snapshot/remote/soci.index.digest": "sha256:index",
    }
    without = layer_labels(
        chain_id="c", image_ref="r", manifest_digest="m", layers=layers, index=2, soci_index_digest=""
    )
    assert "containerd.io/snapshot/remote/soci.index.digest" not in without
    assert without[LABEL_IMAGE_LAYERS] == layers[2].digest


def test_layer_lists_are_cut_to_the_label_limit_with_equal_counts() -> None:
    layers = [Descriptor(MT_LAYER_GZIP, sha(str(i).encode()), 10**9 + i) for i in range(120)]
    labels = layer_labels(chain_id="c", image_ref="r", manifest_digest="m", layers=layers, index=0)
    digests = labels[LABEL_IMAGE_LAYERS].split(",")
    sizes = labels[LABEL_LAYERS_SIZE].split(",")
    assert len(LABEL_IMAGE_LAYERS) + len(labels[LABEL_IMAGE_LAYERS]) <= MAX_LABEL
    # one more digest would not fit; every digest kept is whole
    assert len(LABEL_IMAGE_LAYERS) + len(labels[LABEL_IMAGE_LAYERS]) + 72 > MAX_LABEL
    assert digests == [x.digest for x in layers[: len(digests)]] and len(digests) < len(layers)
    assert sizes == [str(x.size) for x in layers[: len(digests)]]


def test_unpack_keys_are_unique_and_name_the_chain() -> None:
    keys = {cmd_image.unpack_key("sha256:abc") for _ in range(50)}
    assert len(keys) == 50
    assert all(re.fullmatch(r"extract-\d+-[A-Za-z0-9_-]{4} sha256:abc", k) for k in keys)


# ---------------------------------------------------------------------------------------------------------
# the pull logic against fakes (what a snapshotter with remote layers answers)


@dataclass
class FakeBlob:
    data: bytes

    def read_all(self) -> Iterator[bytes]:
        yield self.data


@dataclass
class FakeRegistry:
    manifests: dict[str, Manifest] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    blob_reads: list[str] = field(default_factory=list)

    def get_manifest(self, ref: Any, obj: str | None = None) -> Manifest:
        return self.manifests[obj or ref.object]

    def get_blob(self, ref: Any, digest: str, *, size: int | None = None) -> bytes:
        return self.blobs[digest]

    def blob(self, ref: Any, digest: str, *, size: int | None = None) -> FakeBlob:
        self.blob_reads.append(digest)
        return FakeBlob(self.blobs[digest])


class FakeContent:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.labels: dict[str, dict[str, str]] = {}

    def info(self, digest: str) -> Any:
        if digest not in self.blobs:
            raise NotFound(f"content {digest}")
        return type("Info", (), {"labels": dict(self.labels[digest])})()

    def read(self, digest: str) -> bytes:
        return self.blobs[digest]

    def write(self, ref: str, data: Any, expected: str, size: int, labels: Mapping[str, str]) -> bool:
        if expected in self.blobs:
            return False
        body = data if isinstance(data, bytes) else b"".join(data)
        assert sha(body) == expected and len(body) == size
        self.blobs[expected], self.labels[expected] = body, dict(labels)
        return True

    def update_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        self.labels[digest].update(labels)


class FakeSnapshots:
    """A snapshotter that provides the layers in ``remote`` itself (Prepare -> ALREADY_EXISTS)."""

    def __init__(self, remote: set[str], diff_of: dict[str, str]) -> None:
        self.remote = remote
        self.diff_of = diff_of
        self.committed: dict[str, str] = {}  # name -> parent
        self.active: dict[str, str] = {}
        self.prepared_labels: list[dict[str, str]] = []
        self.removed: list[str] = []
        self.vanishing = False  # Prepare says exists, but Stat never finds it

    def stat(self, key: str) -> SnapshotInfo:
        if key in self.committed:
            return SnapshotInfo(key, Kind.COMMITTED, self.committed[key])
        raise NotFound(key)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = dict(labels or {})
        self.prepared_labels.append(labels)
        ref = labels["containerd.io/snapshot.ref"]
        if self.vanishing:
            raise AlreadyExists(f"snapshot {key!r}")
        if ref in self.remote:
            self.committed[ref] = parent
            raise AlreadyExists(f"target snapshot {ref!r}: already exists")
        self.active[key] = parent
        return [Mount("bind", f"/fake/{key}", ("rw",))]

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.committed[name] = self.active.pop(key)

    def remove(self, key: str) -> None:
        self.removed.append(key)
        self.active.pop(key, None)


class FakeContainerd:
    def __init__(self, snapshots: FakeSnapshots, diff_of: dict[str, str]) -> None:
        self.content = FakeContent()
        self.sn = snapshots
        self.diff_of = diff_of
        self.applied: list[str] = []
        self.images: Any = self
        self.records: dict[str, Descriptor] = {}
        self.diff: Any = self
        self.leases_open = 0

    def snapshots(self, name: str) -> FakeSnapshots:
        assert name == "soci"
        return self.sn

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        self.leases_open += 1
        try:
            yield "lease"
        finally:
            self.leases_open -= 1

    def apply(self, desc: Descriptor, mounts: list[Mount]) -> Descriptor:
        assert desc.digest in self.content.blobs, "applied before the blob was written"
        self.applied.append(desc.digest)
        return Descriptor("application/vnd.oci.image.layer.v1.tar", self.diff_of[desc.digest], 1)

    def update(self, name: str, target: Descriptor) -> None:
        self.records[name] = target


def fake_image(n: int) -> tuple[FakeRegistry, dict[str, str], list[Descriptor], Descriptor, Descriptor]:
    reg = FakeRegistry()
    diff_of: dict[str, str] = {}
    layers = []
    for i in range(n):
        tar = f"layer {i}".encode()
        blob = gzip.compress(tar, mtime=0)
        reg.blobs[sha(blob)] = blob
        diff_of[sha(blob)] = sha(tar)
        layers.append(Descriptor(MT_LAYER_GZIP, sha(blob), len(blob)))
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": list(diff_of.values())}}).encode()
    reg.blobs[sha(config)] = config
    cdesc = Descriptor(MT_CONFIG, sha(config), len(config))
    doc = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cdesc.to_json()}
    doc["layers"] = [x.to_json() for x in layers]
    data = json.dumps(doc).encode()
    reg.manifests["v1"] = reg.manifests[sha(data)] = Manifest(MT_MANIFEST, sha(data), data)
    return reg, diff_of, layers, cdesc, Descriptor(MT_MANIFEST, sha(data), len(data))


def test_layers_the_snapshotter_provides_are_not_downloaded() -> None:
    reg, diff_of, layers, config, manifest = fake_image(3)
    chains = chain_ids(list(diff_of.values()))
    sn = FakeSnapshots({chains[0], chains[2]}, diff_of)  # the middle layer has no zTOC, say
    ctrd = FakeContainerd(sn, diff_of)
    lines: list[str] = []
    ref = parse("registry.test/app:v1")
    result = Puller(reg, ctrd, ref, soci_index_digest="sha256:" + "1" * 64, out=lines.append).run()  # type: ignore[arg-type]
    assert result.remote == [layers[0].digest, layers[2].digest]
    assert result.applied == [layers[1].digest] and result.present == []
    assert (
        result.summary()
        == "unpacked 3 layers (2 provided by the snapshotter, 1 downloaded and applied, 0 already unpacked)"
    )
    assert reg.blob_reads == [layers[1].digest] and ctrd.applied == [layers[1].digest]
    assert set(sn.committed) == set(chains) and sn.committed[chains[1]] == chains[0]
    assert [x["containerd.io/snapshot/cri.layer-digest"] for x in sn.prepared_labels] == [
        x.digest for x in layers
    ]
    assert all(
        x["containerd.io/snapshot/remote/soci.index.digest"] == "sha256:" + "1" * 64
        for x in sn.prepared_labels
    )
    # GC labels: only the downloaded layer is referenced by the manifest; the config names the top chain
    mlabels = ctrd.content.labels[manifest.digest]
    assert {k: v for k, v in mlabels.items() if k.startswith("containerd.io/gc.")} == {
        "containerd.io/gc.ref.content.config": config.digest,
        "containerd.io/gc.ref.content.l.1": layers[1].digest,
    }
    assert ctrd.content.labels[config.digest]["containerd.io/gc.ref.snapshot.soci"] == chains[2]
    assert ctrd.content.labels[layers[1].digest]["containerd.io/uncompressed"] == diff_of[layers[1].digest]
    assert mlabels["containerd.io/distribution.source.registry.test"] == "app"
    assert ctrd.records == {"registry.test/app:v1": manifest}
    assert ctrd.leases_open == 0
    assert lines == [
        f"fetching {manifest.digest[:15]}... {MT_MANIFEST}",
        f"fetching {config.digest[:15]}... {MT_CONFIG}",
        f"fetching {layers[1].digest[:15]}... {MT_LAYER_GZIP}",
    ]

    # again: every chain exists, nothing is prepared or fetched
    sn.prepared_labels.clear()
    lines.clear()
    again = Puller(reg, ctrd, ref, out=lines.append).run()  # type: ignore[arg-type]
    assert again.present == [x.digest for x in layers] and not again.applied and not again.remote
    assert sn.prepared_labels == [] and reg.blob_reads == [layers[1].digest]


def test_a_wrong_diff_id_removes_the_active_snapshot() -> None:
    reg, diff_of, layers, _, _ = fake_image(1)
    sn = FakeSnapshots(set(), diff_of)
    ctrd = FakeContainerd(sn, {layers[0].digest: sha(b"something else")})
    with pytest.raises(FormatError, match=rf"layer {layers[0].digest} of registry.test/app:v1: unpacked to"):
        Puller(reg, ctrd, parse("registry.test/app:v1"), out=lambda _: None).run()  # type: ignore[arg-type]
    assert len(sn.removed) == 1 and sn.removed[0].endswith(" " + diff_of[layers[0].digest])
    assert sn.active == {} and sn.committed == {} and ctrd.records == {}


def test_prepare_that_exists_without_a_snapshot_is_retried_then_fails() -> None:
    reg, diff_of, _, _, _ = fake_image(1)
    sn = FakeSnapshots(set(), diff_of)
    sn.vanishing = True
    ctrd = FakeContainerd(sn, diff_of)
    with pytest.raises(FailedPrecondition, match="Prepare said it exists 3 times, but Stat does not find it"):
        Puller(reg, ctrd, parse("registry.test/app:v1"), out=lambda _: None).run()  # type: ignore[arg-type]
    assert len(sn.prepared_labels) == 3


# ---------------------------------------------------------------------------------------------------------
# end to end: registry -> rpull -> containerd -> our daemon -> ctr run


HELLO_TOP = "hello from the top layer\n"
ADDED = "added by the top layer\n"


def base_layer() -> bytes:
    """Static busybox, /etc/hello.txt and /etc/gone.txt (which the top layer deletes)."""
    return make_tar(
        [
            Entry("bin/", type=b"5"),
            Entry("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755),
            Entry("bin/sh", type=b"2", linkname="busybox", mode=0o777),
            Entry("etc/", type=b"5"),
            Entry("etc/hello.txt", b"hello from the base layer\n"),
            Entry("etc/gone.txt", b"deleted above\n"),
            *(Entry(d + "/", type=b"5") for d in ("proc", "sys", "dev", "tmp")),
        ]
    )


def top_layer() -> bytes:
    return make_tar(
        [
            Entry("etc/", type=b"5"),
            Entry("etc/hello.txt", HELLO_TOP.encode()),
            Entry("etc/.wh.gone.txt", b""),
            Entry("etc/added.txt", ADDED.encode()),
        ]
    )


@dataclass(frozen=True)
class Pushed:
    ref: str
    manifest: Descriptor
    config: Descriptor
    layers: list[Descriptor]
    diff_ids: list[str]


def push_image(registry: Registry, repo: str, tag: str, tars: list[bytes], *, arch: str = ARCH) -> Pushed:
    """gzip layers and a config with ``rootfs.diff_ids``; ``tag`` may be empty (pushed by digest only)."""
    pusher = RawPusher(registry)
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    diff_ids = [sha(t) for t in tars]
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    cdesc = Descriptor(MT_CONFIG, pusher.push_blob(repo, config), len(config))
    layers = [Descriptor(MT_LAYER_GZIP, pusher.push_blob(repo, b), len(b)) for b in blobs]
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": cdesc.to_json(),
        "layers": [x.to_json() for x in layers],
    }
    data = json.dumps(doc).encode()
    mdig = pusher.push_manifest(repo, tag or sha(data), data, MT_MANIFEST)
    return Pushed(
        f"{registry.host}/{repo}:{tag}", Descriptor(MT_MANIFEST, mdig, len(data)), cdesc, layers, diff_ids
    )


@dataclass
class Rig:
    registry: Registry
    containerd: Containerd
    daemon: Daemon
    config: Path

    def rpull(self, ns: str, *args: str, user: str = f"{USER}:{PASSWORD}") -> Result:
        argv = ["--address", self.containerd.address, "--namespace", ns, "image", "rpull"]
        argv += ["--plain-http", "--config", str(self.config), "--user", user, *args]
        return run(*argv)

    def client(self, ns: str) -> ContainerdClient:
        return ContainerdClient(self.containerd.address, ns)

    def snapshot_names(self, ns: str) -> list[str]:
        out = self.containerd.ctr("--namespace", ns, "snapshots", "--snapshotter", "soci", "ls").stdout
        return sorted(line.split()[0] for line in out.splitlines()[1:] if line.strip())

    def prepares(self) -> int:
        return sum(1 for r in self.daemon.logs() if r["msg"] == "prepare")


@pytest.fixture(scope="module")
def rig(htpasswd_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("rpull")
    config = workdir / "soci-cli.toml"
    config.write_text("")  # the defaults, whatever /etc holds on this machine
    daemon = Daemon(workdir / "soci")
    ctrd: Containerd | None = None
    try:
        daemon.start()
        ctrd = Containerd(registries=[htpasswd_registry.host], proxy_socket=daemon.socket)
        ctrd.start()
        yield Rig(htpasswd_registry, ctrd, daemon, config)
    finally:
        if ctrd is not None:
            ctrd.cleanup()
        daemon.close()


def fetching(desc: Descriptor) -> str:
    return f"fetching {desc.digest[:15]}... {desc.media_type}"


@ROOT_ONLY
@pytest.mark.integration
def test_rpull_unpacks_through_containerd_and_ctr_runs_it(rig: Rig) -> None:
    img = push_image(rig.registry, "rpull/app", "v1", [base_layer(), top_layer()])
    ns = f"rpull-{next(_n)}"
    chains = chain_ids(img.diff_ids)
    r = rig.rpull(ns, img.ref)
    assert r.rc == 0, r.err
    assert r.err == ""
    assert r.text.splitlines() == [
        fetching(img.manifest),
        fetching(img.config),
        fetching(img.layers[0]),
        fetching(img.layers[1]),
        "unpacked 2 layers (0 provided by the snapshotter, 2 downloaded and applied, 0 already unpacked)",
    ]

    with rig.client(ns) as c:
        assert c.images.get(img.ref).target == img.manifest
        m = c.content.info(img.manifest.digest).labels
        assert m["containerd.io/gc.ref.content.config"] == img.config.digest
        assert m["containerd.io/gc.ref.content.l.0"] == img.layers[0].digest
        assert m["containerd.io/gc.ref.content.l.1"] == img.layers[1].digest
        assert m[f"containerd.io/distribution.source.{rig.registry.host}"] == "rpull/app"
        assert c.content.info(img.config.digest).labels["containerd.io/gc.ref.snapshot.soci"] == chains[1]
        for layer, diff_id in zip(img.layers, img.diff_ids, strict=True):
            assert c.content.info(layer.digest).labels["containerd.io/uncompressed"] == diff_id
        sn = c.snapshots("soci")
        top = sn.stat(chains[1])
        assert (top.kind, top.parent) == (Kind.COMMITTED, chains[0])
        assert top.labels["containerd.io/snapshot/cri.image-ref"] == img.ref
        assert top.labels["containerd.io/snapshot/cri.manifest-digest"] == img.manifest.digest
        assert top.labels["containerd.io/snapshot/cri.layer-digest"] == img.layers[1].digest
        assert top.labels["containerd.io/snapshot/remote/soci.size"] == str(img.layers[1].size)
        base = sn.stat(chains[0]).labels
        assert base["containerd.io/snapshot/cri.image-layers"] == ",".join(x.digest for x in img.layers)
        assert base["containerd.io/snapshot/remote/image.layers.size"] == ",".join(
            str(x.size) for x in img.layers
        )
        assert c.leases.list() == []  # the pull's lease is gone; the image record holds everything now
        c.leases.delete(c.leases.create(expire=60), sync=True)  # run containerd's garbage collector
        assert all(c.content.has(x.digest) for x in [img.manifest, img.config, *img.layers])
        assert sn.stat(chains[0]).kind == sn.stat(chains[1]).kind == Kind.COMMITTED

    # ctr run finds the image unpacked under the chain IDs it computes itself: no new snapshots appear
    assert rig.snapshot_names(ns) == sorted(chains)
    script = (
        "cat /etc/hello.txt /etc/added.txt; test -e /etc/gone.txt && echo gone-visible || echo gone-hidden"
    )
    cid = f"rpull-run-{next(_n)}"
    out = rig.containerd.ctr(
        "--namespace",
        ns,
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        img.ref,
        cid,
        "/bin/busybox",
        "sh",
        "-c",
        script,
    )
    assert out.stdout == HELLO_TOP + ADDED + "gone-hidden\n", (out.stdout, out.stderr)
    assert rig.snapshot_names(ns) == sorted(chains)

    # a second rpull changes nothing: no Prepare reaches the daemon, no layer is fetched
    prepares = rig.prepares()
    again = rig.rpull(ns, img.ref)
    assert again.rc == 0, again.err
    assert again.text.splitlines() == [
        fetching(img.manifest),
        fetching(img.config),
        "unpacked 2 layers (0 provided by the snapshotter, 0 downloaded and applied, 2 already unpacked)",
    ]
    assert rig.prepares() == prepares
    # (warnings are the daemon's business: it may try a lazy mount first and leave the layer to containerd)
    bad = [x for x in rig.daemon.logs() if x["level"] in ("error", "fatal", "panic", "raw")]
    assert not bad, bad


@ROOT_ONLY
@pytest.mark.integration
def test_rpull_an_image_index_picks_the_platform(rig: Rig) -> None:
    layer = make_tar([Entry("etc/", type=b"5"), Entry("etc/index.txt", b"from an image index\n")])
    other = push_image(rig.registry, "rpull/multi", "", [layer], arch="s390x")
    mine = push_image(rig.registry, "rpull/multi", "", [layer])
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {**other.manifest.to_json(), "platform": {"os": "linux", "architecture": "s390x"}},
            {**mine.manifest.to_json(), "platform": {"os": "linux", "architecture": ARCH}},
        ],
    }
    data = json.dumps(index).encode()
    idesc = Descriptor(
        MT_INDEX, RawPusher(rig.registry).push_manifest("rpull/multi", "v1", data, MT_INDEX), len(data)
    )
    ref = f"{rig.registry.host}/rpull/multi:v1"
    soci_index = "sha256:" + "5" * 64

    ns = f"rpull-{next(_n)}"
    r = rig.rpull(ns, "--soci-index-digest", soci_index, ref)
    assert r.rc == 0, r.err
    lines = r.text.splitlines()
    assert lines[:4] == [
        fetching(idesc),
        fetching(mine.manifest),
        fetching(mine.config),
        fetching(mine.layers[0]),
    ]
    assert re.fullmatch(
        r"unpacked 1 layers \(\d provided by the snapshotter, \d downloaded and applied, "
        r"0 already unpacked\)",
        lines[-1],
    )
    with rig.client(ns) as c:
        assert c.images.get(ref).target == idesc
        assert c.content.info(idesc.digest).labels["containerd.io/gc.ref.content.m.0"] == mine.manifest.digest
        labels = c.snapshots("soci").stat(mine.diff_ids[0]).labels
        assert labels["containerd.io/snapshot/remote/soci.index.digest"] == soci_index
        assert labels["containerd.io/snapshot/cri.manifest-digest"] == mine.manifest.digest

    ns = f"rpull-{next(_n)}"
    r = rig.rpull(ns, "--platform", "linux/s390x", ref)
    assert r.rc == 0, r.err
    assert fetching(other.manifest) in r.text.splitlines()
    with rig.client(ns) as c:
        assert (
            c.content.info(idesc.digest).labels["containerd.io/gc.ref.content.m.0"] == other.manifest.digest
        )

    r = rig.rpull(ns, "--platform", "windows/amd64", ref)
    assert r.rc == 3
    assert f"image {ref}: no manifest for platform windows/amd64 in its image index {idesc.digest}" in r.err


@ROOT_ONLY
@pytest.mark.integration
def test_rpull_from_a_token_registry(rig: Rig, token_registry: Registry) -> None:
    layer = make_tar([Entry("etc/", type=b"5"), Entry("etc/token.txt", b"behind a token server\n")])
    img = push_image(token_registry, "rpull/token", "v1", [layer])
    ns = f"rpull-{next(_n)}"
    r = rig.rpull(ns, img.ref)
    assert r.rc == 0, r.err
    assert r.text.splitlines()[-1].startswith("unpacked 1 layers (")
    with rig.client(ns) as c:
        assert c.images.get(img.ref).target == img.manifest


@ROOT_ONLY
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_rpull_with_bad_credentials_says_so_without_the_password(
    rig: Rig, token_registry: Registry, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = rig.registry if kind == "htpasswd" else token_registry
    img = push_image(registry, f"rpull/creds-{kind}", "v1", [make_tar([Entry("a.txt", b"a\n")])])
    ns = f"rpull-{next(_n)}"
    wrong = "Wr0ng-pa55word-Xyz"
    r = rig.rpull(ns, img.ref, user=f"{USER}:{wrong}")
    assert r.rc == 4, (r.rc, r.err)
    assert r.err.startswith(
        f"soci: registry {registry.host} refused the request (credentials from --user {USER})"
    )
    assert wrong not in r.err and wrong not in r.text and PASSWORD not in r.err
    blob = base64.b64encode(f"{USER}:{wrong}".encode()).decode().rstrip("=")
    logged = "\n".join(x.getMessage() for x in caplog.records)
    assert "rpull/creds" in logged and wrong not in logged and blob not in logged
    with rig.client(ns) as c:
        assert c.leases.list() == []
        with pytest.raises(NotFound):
            c.images.get(img.ref)


@ROOT_ONLY
@pytest.mark.integration
def test_rpull_unknown_image_is_not_found(rig: Rig) -> None:
    ns = f"rpull-{next(_n)}"
    for ref in (f"{rig.registry.host}/rpull/nothing:v1", f"{rig.registry.host}/rpull/app:no-such-tag"):
        r = rig.rpull(ns, ref)
        assert r.rc == 3, (r.rc, r.err)
        obj = ref.split("/", 1)[1]
        assert r.err.startswith(
            f"soci: manifest {rig.registry.host}/{obj} on {rig.registry.host}: not found"
        ), r.err
        assert r.text == ""


def test_rpull_without_containerd_is_unavailable(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    sock = tmp_path / "containerd.sock"
    r = run("--address", str(sock), "image", "rpull", "--config", str(config), "127.0.0.1:1/x/y:z")
    assert r.rc == 5
    assert r.err.startswith("soci: containerd Leases.Create ") and f"(containerd at {sock})" in r.err, r.err
    r = run("image", "rpull", "--soci-index-digest", "nope", "127.0.0.1:1/x/y:z")
    assert r.rc == 2 and "invalid --soci-index-digest 'nope'" in r.err
    r = run("image")
    assert r.rc == 2 and "rpull" in r.err
