"""Bad input never takes the daemon down: clear reasons, fallbacks that give the right content.

The real ``soci-snapshotter-grpc`` as a child process, the harness's htpasswd registry (behind the fault
proxy where containerd is involved), and for the pull-and-run cases Debian's containerd with our daemon as
its ``soci`` snapshotter (``rig_factory`` of ``test_daemon_lazy``). Each case checks that the daemon keeps
serving (a later good pull in the same daemon is lazy), that the reason is in the debug ``Status`` and the
daemon log names the object and the cause, and that the container runs with the right bytes wherever there
is a fallback:

1. a Prepare sent straight to the socket with labels that are not digests or references: ordinary mounts
   (deferred), ``bad_labels``;
2. an index whose zTOC is missing from the registry: the image is left to containerd (``bad_index``), the
   CRI pull succeeds and the container runs;
3. an index that gives a layer another layer's zTOC: ``bad_index`` naming the zTOC and the layer, deferred,
   correct content; a zTOC whose span digests do not match the blob: the layer is lazy, reads of it fail
   with EIO, never with wrong bytes;
4. a malformed config.toml: exit 1 naming file, line and key; unknown keys: a warning each, and it starts;
5. a registry that is down: the CRI pull fails cleanly, or (only the daemon's requests failing) the layers
   are deferred (``resolve_failed``) and the container runs; back up, a new image is lazy and the first
   image's context is tried again (a transient failure is not remembered);
6. ``[snapshotter] min_layer_size`` with the ``remote/soci.size`` label (sent by a direct Prepare; CRI does
   not send it): the small layer is unpacked by the daemon (``local``, ``below_min_size``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from soci_grpc import debug
from soci_grpc._proto.soci import snapshots_pb2, snapshots_pb2_grpc
from soci_grpc.layers import LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_SOCI_SIZE
from soci_grpc.snapshotter import LABEL_SNAPSHOT_REF
from tests.fs.ocigen import Entry
from tests.grpc.test_layers import (
    A_FILES,
    B_FILES,
    FAST,
    data_image,
    delete_blob,
    index_of,
    reindex,
    rewrite_ztoc,
    swap_ztocs,
    wrong_span_digests,
    ztoc_desc,
)
from tests.harness.containerd import CONTAINERD_BIN
from tests.harness.registry import Fault, Registry
from tests.integration.sociimg import Pushed, base_entries, data_entries, docker_config, push_image
from tests.integration.test_containerd_snapshots import Daemon
from tests.integration.test_daemon_lazy import Rig, cri_pull, lazy_image
from tests.integration.test_daemon_lazy import rig_factory as rig_factory  # the fixture

pytestmark = [pytest.mark.integration]
needs_root = pytest.mark.skipif(
    not Path("/dev/fuse").exists() or os.geteuid() != 0, reason="the daemon needs root and /dev/fuse"
)
needs_containerd = pytest.mark.skipif(
    not Path("/dev/fuse").exists() or os.geteuid() != 0 or not Path(CONTAINERD_BIN).exists(),
    reason="needs root, /dev/fuse and containerd",
)
_seeds = iter(range(5000, 6000))


# --------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="session", autouse=True)
def _grpc_stays_initialized() -> Iterator[None]:
    """One idle gRPC channel held open from the first test here to the end of the session.

    Closing a process's last channel shuts gRPC core down in a background thread; a fork (``ctr``,
    ``subprocess``) that races with that shutdown can hang for good in gRPC's prefork handler (seen here
    once, with the main thread in ``__run_prefork_handlers``). While a channel is open gRPC never shuts down.
    """
    ch = grpc.insecure_channel("unix:///nonexistent/soci-test-keepalive.sock")
    try:
        yield
    finally:
        ch.close()


@dataclasses.dataclass
class Prepared:
    code: grpc.StatusCode | None  # None: OK
    details: str = ""
    mounts: tuple[Any, ...] = ()


def prepare(sock: str, key: str, labels: dict[str, str], parent: str = "") -> Prepared:
    """A Prepare straight to the daemon's snapshots service, as containerd's unpacker sends it."""
    with grpc.insecure_channel("unix://" + sock) as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        req = snapshots_pb2.PrepareRequest(snapshotter="soci", key=key, parent=parent, labels=labels)
        try:
            reply = stub.Prepare(req, timeout=60)
        except grpc.RpcError as exc:
            return Prepared(exc.code(), exc.details() or "")
    return Prepared(None, mounts=tuple(reply.mounts))


def stat_labels(sock: str, name: str) -> dict[str, str]:
    with grpc.insecure_channel("unix://" + sock) as ch:
        info = snapshots_pb2_grpc.SnapshotsStub(ch).Stat(
            snapshots_pb2.StatRequest(snapshotter="soci", key=name)
        )
    return dict(info.info.labels)


def unpack_labels(img: Pushed, i: int, name: str, **extra: str) -> dict[str, str]:
    return {
        LABEL_SNAPSHOT_REF: name,
        LABEL_IMAGE_REF: img.ref,
        LABEL_MANIFEST: img.manifest,
        LABEL_LAYER: img.layers[i],
        **extra,
    }


def status_layer(sock: str, sid_or_digest: str) -> dict[str, Any]:
    """The last status record of a layer (by snapshot id or digest), with its image's state and detail."""
    found = None
    for image in debug.call(sock, "Status")["images"]:
        for x in image["layers"]:
            if sid_or_digest in (x["snapshot_id"], x["digest"]):
                found = {**x, "image_state": image["state"], "image_detail": image["detail"]}
    assert found is not None, debug.call(sock, "Status")
    return found


def log_messages(d: Daemon, level: str = "warning") -> list[str]:
    return [str(r.get("msg")) for r in d.logs() if r.get("level") == level]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_of(entries: list[Entry], name: str) -> bytes:
    return next(e.data for e in entries if e.name == name)


def run_in(rig: Rig, ref: str, name: str, script: str) -> subprocess.CompletedProcess[str]:
    return rig.run(
        ref,
        name,
        "/bin/sh",
        "-c",
        script,
        check=False,
    )


def on_proxy(img: Pushed, rig: Rig) -> Pushed:
    return dataclasses.replace(img, ref=img.ref.replace(rig.proxy.upstream.host, rig.proxy.host))


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Any:
    started: list[Daemon] = []

    def make(config: str = "") -> Daemon:
        d = Daemon(tmp_path / f"soci{len(started)}")
        started.append(d)
        return d.start(config=config)

    try:
        yield make
    finally:
        for d in started:
            d.close()


def registry_daemon(
    make: Callable[..., Daemon], registry: Registry, tmp_path: Path, extra: str = ""
) -> Daemon:
    """A daemon that finds the registry's credentials in a Docker config (no CRI proxy, no containerd)."""
    cfg = docker_config(tmp_path / "docker" / "config.json", registry.host)
    return make(f"docker_config = '{cfg}'\n" + FAST + extra)


# --------------------------------------------------------------------------------------------------------
# 1. labels that are not digests, straight over gRPC


@needs_root
def test_prepare_with_invalid_digest_labels_is_deferred(
    daemon_factory: Callable[..., Daemon], htpasswd_registry: Registry, tmp_path: Path
) -> None:
    img = data_image(htpasswd_registry, tmp_path, name="labels")
    d = registry_daemon(daemon_factory, htpasswd_registry, tmp_path)
    bad = [
        ("bl/1/extract-1 a", {LABEL_LAYER: "sha256:xyz"}, "cri.layer-digest='sha256:xyz'"),
        ("bl/1/extract-2 b", {LABEL_MANIFEST: "not-a-digest"}, "cri.manifest-digest='not-a-digest'"),
        ("bl/1/extract-3 c", {LABEL_IMAGE_REF: "NOT A REF"}, "invalid reference 'NOT A REF'"),
    ]
    for key, change, named in bad:
        got = prepare(d.socket, key, {**unpack_labels(img, 0, f"bl/1/name-{key[-1]}"), **change})
        assert got.code is None, got  # ordinary mounts: containerd unpacks the layer itself
        ((m),) = got.mounts
        assert m.type == "bind" and m.source.endswith("/fs") and list(m.options) == ["rw", "rbind"]
        sid = Path(m.source).parent.name
        st = status_layer(d.socket, sid)
        assert (st["mode"], st["reason"]) == ("deferred", "bad_labels") and named in st["detail"], st
        assert any(named in w and "leaving it to containerd" in w for w in log_messages(d)), named

    # the same daemon still serves a good Prepare lazily
    good = prepare(d.socket, "bl/1/extract-4 d", unpack_labels(img, 0, "bl/1/good"))
    assert (good.code, good.details) == (
        grpc.StatusCode.ALREADY_EXISTS,
        'target snapshot "bl/1/good": already exists',
    )
    assert stat_labels(d.socket, "bl/1/good")["containerd.io/snapshot/remote"] == "remote snapshot"
    assert status_layer(d.socket, img.layers[0])["mode"] == "lazy"
    assert d.proc is not None and d.proc.poll() is None


# --------------------------------------------------------------------------------------------------------
# 6. min_layer_size with the soci.size label


@needs_root
def test_min_layer_size_with_the_size_label_unpacks_locally(
    daemon_factory: Callable[..., Daemon], htpasswd_registry: Registry, tmp_path: Path
) -> None:
    img = data_image(htpasswd_registry, tmp_path, name="minsize")
    limit = img.layer_sizes[1]  # layer 0 is smaller, layer 1 is at the limit
    d = registry_daemon(
        daemon_factory, htpasswd_registry, tmp_path, f"[snapshotter]\nmin_layer_size = {limit}\n"
    )
    small = prepare(
        d.socket,
        "ms/1/extract-1 x",
        unpack_labels(img, 0, "ms/1/l0", **{LABEL_SOCI_SIZE: str(img.layer_sizes[0])}),
    )
    assert small.code == grpc.StatusCode.ALREADY_EXISTS, small
    st = status_layer(d.socket, img.layers[0])
    assert (st["mode"], st["reason"]) == ("local", "below_min_size"), st
    assert st["detail"] == f"layer is {img.layer_sizes[0]} bytes, below min_layer_size {limit}"
    fs = Path(st["mountpoint"])
    assert len(list((fs / "a").iterdir())) == A_FILES and not fs.is_mount()
    labels = stat_labels(d.socket, "ms/1/l0")
    assert labels["containerd.io/snapshot/remote/has.soci.index.digest"] == "true"
    assert "containerd.io/snapshot/remote" not in labels

    big = prepare(
        d.socket,
        "ms/1/extract-2 y",
        unpack_labels(img, 1, "ms/1/l1", **{LABEL_SOCI_SIZE: str(img.layer_sizes[1])}),
        parent="ms/1/l0",
    )
    assert big.code == grpc.StatusCode.ALREADY_EXISTS, big
    assert status_layer(d.socket, img.layers[1])["mode"] == "lazy"
    assert any(
        f"layer {img.layers[0]}: layer is" in m and "unpacking it locally" in m
        for m in log_messages(d, "info")
    )


# --------------------------------------------------------------------------------------------------------
# 4. config.toml


def test_malformed_config_exits_naming_file_line_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('debug = true\n[snapshotter]\nmin_layer_size = "big"\n')
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "soci_grpc.cli.daemon",
            "--config",
            str(cfg),
            "--root",
            str(tmp_path / "root"),
            "--address",
            "unix://" + str(tmp_path / "s.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 1
    assert p.stderr.endswith(
        f'soci-snapshotter-grpc: config file at "{cfg}": failed to parse config: line 3: '
        "snapshotter.min_layer_size: expected an integer, got a string\n"
    ), p.stderr
    assert (
        "Traceback" not in p.stderr
        and not (tmp_path / "root").exists()
        and not (tmp_path / "s.sock").exists()
    )


@needs_root
def test_unknown_keys_are_warnings_and_the_daemon_starts(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(
        "surprise = 1\n[snapshotter]\nmin_layer_size = 10\nmin_layer_sizes = 5\n[no_such_table]\nx = 1\n"
    )
    cfg = d.workdir / "config.toml"
    warned = log_messages(d)
    assert f"config file {cfg}, line 1: unknown key surprise ignored" in warned
    assert f"config file {cfg}, line 4: unknown key snapshotter.min_layer_sizes ignored" in warned
    assert f"config file {cfg}, line 5: unknown table no_such_table ignored" in warned
    assert debug.call(d.socket, "Status")["images"] == []
    assert d.stop() == 0


# --------------------------------------------------------------------------------------------------------
# 2, 3: broken indexes; pulled and run through containerd


def base_and_data(
    registry: Registry, work: Path, name: str, *, layers: int = 1
) -> tuple[Pushed, list[list[Entry]]]:
    s = next(_seeds)
    data = [data_entries(f"d{i}", (A_FILES, B_FILES)[i], 16384, seed=s * 10 + i) for i in range(layers)]
    return push_image(registry, work, [base_entries(), *data], name=name), data


@pytest.mark.expect_log
@needs_containerd
def test_index_with_a_missing_ztoc_falls_back_to_containerd(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = rig_factory()
    img, data = base_and_data(rig.proxy.upstream, tmp_path, "noztoc")
    zdig = ztoc_desc(index_of(img), img.layers[1])["digest"]
    delete_blob(rig.proxy.upstream, img.repo, zdig)
    img = on_proxy(img, rig)
    cri_pull(rig.daemon.socket, img.ref)

    st = rig.image(img.manifest)
    assert st["state"] == "bad_index" and st["index_digest"] == img.index_digest, st
    assert f"zTOC {zdig} of layer {img.layers[1]}, listed in the SOCI index" in st["detail"]
    assert [(x["mode"], x["reason"]) for x in st["layers"]] == [("deferred", "bad_index")] * 2
    assert any(
        zdig in w and img.layers[1] in w and "left to containerd" in w for w in log_messages(rig.daemon)
    )

    want = sha(file_of(data[0], "d0/f0007.bin"))
    run = run_in(rig, img.ref, "noztoc1", "sha256sum /d0/f0007.bin; cat /etc/hello.txt")
    assert f"{want}  /d0/f0007.bin\nhello from a lazily loaded layer\n" == run.stdout, (
        run.stdout,
        run.stderr,
    )

    good = lazy_image(rig.proxy.host, rig.proxy.upstream, tmp_path)
    cri_pull(rig.daemon.socket, good.ref)
    assert {x["mode"] for x in rig.image(good.manifest)["layers"]} >= {"lazy"}


@pytest.mark.expect_log
@needs_containerd
def test_ztoc_of_another_layer_and_wrong_span_digests(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = rig_factory()
    upstream = rig.proxy.upstream

    # layer 1 and 2 swap zTOCs: their sizes differ, so the index is refused and the image left to containerd
    img, data = base_and_data(upstream, tmp_path, "swap", layers=2)
    bad = on_proxy(reindex(img, swap_ztocs(img.layers[1], img.layers[2]), "swapped"), rig)
    cri_pull(rig.daemon.socket, bad.ref)
    st = rig.image(bad.manifest)
    assert st["state"] == "bad_index" and st["detail"].startswith("zTOC sha256:"), st
    assert re.search(rf"but layer ({img.layers[1]}|{img.layers[2]}) is \d+ bytes", st["detail"])
    assert [(x["mode"], x["reason"]) for x in st["layers"]] == [("deferred", "bad_index")] * 3
    assert any(f"SOCI index {bad.index_digest} cannot be used: zTOC" in w for w in log_messages(rig.daemon))
    want = [sha(file_of(data[0], "d0/f0003.bin")), sha(file_of(data[1], "d1/f0030.bin"))]
    run = run_in(rig, bad.ref, "swap1", "sha256sum /d0/f0003.bin /d1/f0030.bin")
    assert run.stdout == f"{want[0]}  /d0/f0003.bin\n{want[1]}  /d1/f0030.bin\n", (run.stdout, run.stderr)

    # span digests that do not match the blob: served lazily, but reads fail (EIO), never wrong bytes
    img2, data2 = base_and_data(upstream, tmp_path, "spans", layers=2)
    spans = on_proxy(reindex(img2, rewrite_ztoc(img2, img2.layers[1], wrong_span_digests), "spans"), rig)
    cri_pull(rig.daemon.socket, spans.ref)
    st = rig.image(spans.manifest)
    # (the base layer is the swapped image's, already unpacked: containerd does not ask for it again)
    assert [(x["digest"], x["mode"]) for x in st["layers"]] == [(d, "lazy") for d in img2.layers[1:]], st
    good = sha(file_of(data2[1], "d1/f0030.bin"))
    run = run_in(rig, spans.ref, "spans1", "sha256sum /d1/f0030.bin /d0/f0003.bin")
    assert run.stdout == f"{good}  /d1/f0030.bin\n", (run.stdout, run.stderr)
    assert "can't read '/d0/f0003.bin': Input/output error" in run.stderr, run.stderr
    errors = log_messages(rig.daemon, "error")
    assert any(f"layer {img2.layers[1]} span" in e and "span digests do not match" in e for e in errors)
    assert debug.call(rig.daemon.socket, "Status")["pid"] == rig.daemon.proc.pid  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------------
# 5. the registry is down, then back


@pytest.mark.expect_log
@needs_containerd
def test_registry_down_is_not_remembered(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory()
    img, data = base_and_data(rig.proxy.upstream, tmp_path, "down")
    img = on_proxy(img, rig)

    # everything answers 503: containerd's pull fails cleanly, the daemon is not even asked and stays up
    rig.proxy.add(Fault("status", path="", method=None, times=-1, status=503))
    with pytest.raises(grpc.RpcError) as exc:
        cri_pull(rig.daemon.socket, img.ref)
    assert "503" in str(exc.value.details())
    assert debug.call(rig.daemon.socket, "Status")["images"] == []
    rig.proxy.clear()

    # only the daemon's request for the SOCI index fails: its layers are left to containerd, the pull and
    # the container work
    rig.proxy.add(Fault("status", path=re.escape(f"/manifests/{img.index_digest}"), method=None, times=-1))
    cri_pull(rig.daemon.socket, img.ref)
    st = rig.image(img.manifest)
    assert st["state"] == "error" and "status 503" in st["detail"], st
    assert [(x["mode"], x["reason"]) for x in st["layers"]] == [("deferred", "resolve_failed")] * 2
    assert all("tried again at the next pull of this image" in x["detail"] for x in st["layers"])
    assert any(img.index_digest in w and "503" in w for w in log_messages(rig.daemon))
    want = sha(file_of(data[0], "d0/f0011.bin"))
    run = run_in(rig, img.ref, "down1", "sha256sum /d0/f0011.bin")
    assert run.stdout == f"{want}  /d0/f0011.bin\n", (run.stdout, run.stderr)

    # the registry is back: a new image is lazy, and the first image's context is tried again
    rig.proxy.clear()
    good = lazy_image(rig.proxy.host, rig.proxy.upstream, tmp_path)
    cri_pull(rig.daemon.socket, good.ref)
    assert {x["mode"] for x in rig.image(good.manifest)["layers"]} >= {"lazy"}
    again = prepare(rig.daemon.socket, "retry/1/extract-1 z", unpack_labels(img, 0, "retry/1/l0"))
    assert again.code == grpc.StatusCode.ALREADY_EXISTS, again
    st = rig.image(img.manifest)
    assert st["state"] == "indexed" and st["detail"] == "" and st["index_digest"] == img.index_digest
    assert ("lazy", "") in [(x["mode"], x["reason"]) for x in st["layers"]]
