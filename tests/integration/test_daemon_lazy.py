"""Lazy pulls end to end: Debian's containerd 1.6 with our daemon as its ``soci`` snapshotter.

containerd's CRI plugin (``disable_snapshot_annotations = false``, snapshotter ``soci``) pulls a SOCI-enabled
image the way the kubelet asks it to (a CRI ``PullImage``, here through the daemon's CRI proxy, so the
credentials reach the daemon only that way); the daemon answers ALREADY_EXISTS for layers it serves, runc
runs a container on them, and the registry (behind the harness's recording proxy) saw range requests for a
small part of the image. The debug service reports per layer what happened.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from soci_grpc import debug
from soci_grpc._proto.cri import api_pb2
from soci_grpc.layers import unmount_all_under
from tests.fs.ocigen import Entry
from tests.grpc.clihelp import SOCI_EXE
from tests.harness.containerd import CONTAINERD_BIN, Containerd
from tests.harness.registry import PASSWORD, USER, FaultProxy, Registry, free_port
from tests.integration.sociimg import Pushed, base_entries, data_entries, docker_config, push_image
from tests.integration.test_containerd_snapshots import Daemon

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN), reason="needs root and containerd"
    ),
]

CRI = "runtime.v1.ImageService"
FAST = """
[http]
MaxRetries = 1
MinWaitMsec = 10
MaxWaitMsec = 50
DialTimeoutMsec = 1000
[blob]
fetching_timeout_sec = 10
max_retries = 1
[background_fetch]
disable = true
"""


def blob_bytes(p: FaultProxy, digest: str) -> int:
    """Bytes of ``digest`` requested from the registry (ranged GETs; a whole-blob GET counts its size)."""
    total = 0
    for e in list(p.log):
        if e["method"] == "GET" and e["path"].endswith("/blobs/" + digest):
            if e["range"]:
                a, b = e["range"].removeprefix("bytes=").split("-")
                total += int(b) + 1 - int(a)
            else:
                total += 1 << 40  # a whole-blob GET: never "a small fraction"
    return total


def cri_pull(socket: str, ref: str, *, user: str = USER, password: str = PASSWORD) -> str:
    """A kubelet-style ``PullImage`` on ``socket``; the image id."""
    req = api_pb2.PullImageRequest(
        image=api_pb2.ImageSpec(image=ref), auth=api_pb2.AuthConfig(username=user, password=password)
    )
    with grpc.insecure_channel("unix://" + socket) as ch:
        raw = ch.unary_unary(f"/{CRI}/PullImage")(req.SerializeToString(), timeout=120)
    return api_pb2.PullImageResponse.FromString(raw).image_ref


def plain_cri_pull(rig: Rig, ref: str) -> str:
    """``PullImage`` straight to containerd's CRI (not through our proxy): the daemon gets no credentials."""
    return cri_pull(rig.containerd.address, ref)


@dataclass
class Rig:
    proxy: FaultProxy
    daemon: Daemon
    containerd: Containerd

    def run(self, ref: str, name: str, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm --snapshotter soci`` in containerd's ``k8s.io`` namespace (where CRI pulls)."""
        return self.containerd.ctr(
            "-n", "k8s.io", "run", "--rm", "--snapshotter", "soci", ref, name, *cmd, **kw
        )

    def status(self) -> dict[str, Any]:
        return debug.call(self.daemon.socket, "Status")

    def image(self, manifest: str) -> dict[str, Any]:
        return next(i for i in self.status()["images"] if i["manifest"] == manifest)


@pytest.fixture
def rig_factory(
    tmp_path: Path,
    htpasswd_registry: Registry,
    fault_proxy: Callable[..., FaultProxy],
    containerd_factory: Callable[..., Containerd],
) -> Iterator[Callable[..., Rig]]:
    daemons: list[Daemon] = []

    def make(top: str = "", tables: str = "", *, cri_keychain: bool = True) -> Rig:
        """``top``: top-level config keys (they must come before any table)."""
        proxy = fault_proxy(htpasswd_registry)
        d = Daemon(tmp_path / f"soci{len(daemons)}")
        ctrd_dir = tmp_path / f"containerd{len(daemons)}"
        ctrd_dir.mkdir()
        if cri_keychain:
            sock = ctrd_dir / "containerd.sock"
            tables += f'\n[cri_keychain]\nenable_keychain = true\nimage_service_path = "{sock}"\n'
        # the daemon first: containerd dials its proxy snapshotter once at start and then backs off
        d.start(config=top + FAST + tables)
        daemons.append(d)
        ctrd = containerd_factory(
            workdir=ctrd_dir, registries=[proxy.host], proxy_socket=d.socket, snapshotter="soci"
        )
        return Rig(proxy, d, ctrd)

    try:
        yield make
    finally:
        for d in daemons:
            d.close()
            # a daemon that was killed (or failed to start again) leaves its dead FUSE and bind mounts
            unmount_all_under(d.root)


def lazy_image(registry_host: str, registry: Registry, work: Path, **kw: Any) -> Pushed:
    """base (busybox) + 3.2 MB of data + a small top layer that deletes one data file (a whiteout)."""
    top = [
        Entry("data/", type=b"5"),
        Entry("data/.wh.f0001.bin"),
        Entry("etc/", type=b"5"),
        Entry("etc/top.txt", b"top layer\n"),
    ]
    img = push_image(
        registry, work, [base_entries(), data_entries("data", 200, 16384), top], name="lazy", **kw
    )
    img.ref = img.ref.replace(registry.host, registry_host)
    return img


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The daemon's /metrics as ``{(name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_cri_pull_is_lazy_and_the_container_runs(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    port = free_port()
    rig = rig_factory(f'metrics_address = "127.0.0.1:{port}"\n')
    img = lazy_image(rig.proxy.host, rig.proxy.upstream, tmp_path, min_layer_size=4096)
    t0 = time.monotonic()
    image_id = cri_pull(rig.daemon.socket, img.ref)  # through our CRI proxy: credentials recorded
    assert image_id.startswith("sha256:")

    st = rig.image(img.manifest)
    assert st["state"] == "indexed" and st["index_digest"] == img.index_digest
    modes = {x["digest"]: (x["mode"], x["reason"]) for x in st["layers"]}
    assert modes == {
        img.layers[0]: ("lazy", ""),
        img.layers[1]: ("lazy", ""),
        img.layers[2]: ("local", "no_ztoc"),  # below the convert's min layer size: unpacked here
    }, st
    # containerd downloaded nothing: no whole-blob GET of any layer; the data layer was barely touched
    assert blob_bytes(rig.proxy, img.layers[1]) < img.layer_sizes[1] // 10

    data = next(e for e in data_entries("data", 200, 16384) if e.name == "data/f0100.bin").data
    want = hashlib.sha256(data).hexdigest()
    run = rig.run(
        img.ref,
        "lazy1",
        "/bin/sh",
        "-c",
        "sha256sum /data/f0100.bin; cat /etc/hello.txt /etc/top.txt; ls /data/f0001.bin",
        check=False,
    )
    assert want in run.stdout, (run.stdout, run.stderr)
    assert "hello from a lazily loaded layer\ntop layer\n" in run.stdout
    assert "No such file" in run.stderr or "No such file" in run.stdout  # the whiteout hides it
    elapsed = time.monotonic() - t0
    fetched = blob_bytes(rig.proxy, img.layers[1])
    assert fetched < img.layer_sizes[1] // 5, (fetched, img.layer_sizes[1])
    st = rig.image(img.manifest)
    data_layer = next(x for x in st["layers"] if x["digest"] == img.layers[1])
    assert 0 < data_layer["fetched_percent"] < 20 and data_layer["fuse_path"]
    assert elapsed < 120
    assert PASSWORD not in rig.daemon.log_path.read_text()

    m = scrape(port)
    assert total(m, "soci_fuse_operations_total", operation="read") > 0
    assert total(m, "soci_fuse_operations_total", operation="lookup") > 0
    assert total(m, "soci_fetched_bytes_total") > 0
    assert total(m, "soci_fallbacks_total", reason="no_ztoc") == 1
    assert total(m, "soci_credential_source_hits_total", source="cri") > 0
    assert total(m, "soci_registry_responses_total", status="206") > 0
    assert total(m, "soci_mounted_layers", mode="lazy") == 2
    assert total(m, "soci_mounted_layers", mode="local") == 1

    # the operator's view: soci debug images asks the daemon
    out = subprocess.run(
        [str(SOCI_EXE), "debug", "images", "--snapshotter-address", rig.daemon.socket],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"image {img.ref} manifest {img.manifest}: indexed, SOCI index {img.index_digest}" in out, out
    assert f"layer {img.layers[1]} snapshot " in out and ": lazy; fetched " in out
    assert f"layer {img.layers[2]} snapshot " in out and ": local (no_ztoc: " in out
    assert "mounted at " in out and "served from " in out and "cache: " in out

    # SIGTERM: everything the daemon mounted is unmounted
    assert rig.daemon.stop() == 0
    root = str(rig.daemon.root)
    left = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if root in line]
    assert left == []


def test_image_without_index_is_left_to_containerd(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory()
    img = push_image(rig.proxy.upstream, tmp_path, [base_entries()], name="plain", soci=False)
    img.ref = img.ref.replace(rig.proxy.upstream.host, rig.proxy.host)
    cri_pull(rig.daemon.socket, img.ref)
    st = rig.image(img.manifest)
    assert st["state"] == "no_index" and "no SOCI index" in st["detail"]
    assert [(x["mode"], x["reason"]) for x in st["layers"]] == [("deferred", "no_index")]
    run = rig.run(
        img.ref,
        "plain1",
        "/bin/cat",
        "/etc/hello.txt",
    )
    assert run.stdout == "hello from a lazily loaded layer\n"


def test_docker_config_credentials_alone(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    """No CRI keychain: the daemon reads the Docker config; containerd gets the credentials from CRI."""
    cfg = tmp_path / "docker" / "config.json"
    rig = rig_factory(f'docker_config = "{cfg}"\n', cri_keychain=False)
    docker_config(cfg, rig.proxy.host)
    img = lazy_image(rig.proxy.host, rig.proxy.upstream, tmp_path)
    plain_cri_pull(rig, img.ref)
    st = rig.image(img.manifest)
    assert {x["mode"] for x in st["layers"]} == {"lazy"}, st
    run = rig.run(
        img.ref,
        "dc1",
        "/bin/cat",
        "/etc/top.txt",
        check=False,
    )
    assert run.stdout == "top layer\n", (run.stderr, rig.status())
