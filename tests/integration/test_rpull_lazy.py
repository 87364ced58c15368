"""``soci image rpull`` of SOCI-enabled images: the daemon provides the layers lazily, containerd runs them.

Real parts: Debian's docker-registry with htpasswd auth behind the recording
:class:`~tests.harness.registry.FaultProxy`, our ``soci-snapshotter-grpc`` (its own credentials from a Docker
config named by ``docker_config``) as containerd's ``soci`` proxy snapshotter, containerd 1.6, and
``soci image rpull`` (credentials from ``--user``) run in this process against containerd's socket. For an
indexed image every layer Prepare is answered by the daemon (ALREADY_EXISTS), so rpull downloads no layer;
the debug service reports the layers ``lazy`` and the registry saw only range reads of a small part of the
data layer. ``--soci-index-digest`` reaches the daemon as a label and picks the index; an image without an
index is downloaded and applied by rpull (the daemon defers it) and runs as well.

One registry proxy, daemon and containerd serve the module; every test pushes images of its own (data
layers with their own seed, so no layer is shared through the daemon's cache).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from soci_grpc import debug
from tests.fs.ocigen import Entry
from tests.grpc.clihelp import Result, run
from tests.harness.containerd import CONTAINERD_BIN, Containerd
from tests.harness.registry import PASSWORD, USER, FaultProxy, Registry
from tests.integration.sociimg import Pushed, base_entries, data_entries, docker_config, push_image
from tests.integration.test_containerd_snapshots import Daemon
from tests.integration.test_daemon_lazy import FAST, blob_bytes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN), reason="needs root and containerd"
    ),
]

NAMESPACE = "default"
FILES, FILE_SIZE = 200, 16384  # a 3.2 MB data layer
_seed = itertools.count(1000)
_cid = itertools.count()


@dataclass
class RpullRig:
    proxy: FaultProxy
    daemon: Daemon
    containerd: Containerd
    cli_config: Path

    def rpull(self, ref: str, *args: str) -> Result:
        """``soci image rpull --plain-http --namespace default --address <containerd> --user ... REF``."""
        argv = [
            "image",
            "rpull",
            "--plain-http",
            "--namespace",
            NAMESPACE,
            "--address",
            self.containerd.address,
        ]
        argv += ["--user", f"{USER}:{PASSWORD}", "--config", str(self.cli_config), *args, ref]
        return run(*argv)

    def image(self, manifest: str) -> dict[str, Any]:
        images = debug.call(self.daemon.socket, "Status")["images"]
        return next(i for i in images if i["manifest"] == manifest)

    def run(self, ref: str, script: str) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm --snapshotter soci REF <id> /bin/sh -c script`` in the rpull namespace."""
        cid = f"rpull-lazy-{next(_cid)}"
        return self.containerd.ctr(
            "-n",
            NAMESPACE,
            "run",
            "--rm",
            "--snapshotter",
            "soci",
            ref,
            cid,
            "/bin/sh",
            "-c",
            script,
            check=False,
        )


@pytest.fixture(scope="module")
def rig(htpasswd_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RpullRig]:
    workdir = tmp_path_factory.mktemp("rpull-lazy")
    cli_config = workdir / "soci-cli.toml"
    cli_config.write_text("")  # rpull's own settings: the defaults, whatever /etc holds here
    proxy = FaultProxy(htpasswd_registry).start()
    daemon = Daemon(workdir / "soci")
    ctrd: Containerd | None = None
    try:
        cfg = docker_config(workdir / "docker" / "config.json", proxy.host)  # the daemon's own credentials
        daemon.start(config=f'docker_config = "{cfg}"\n' + FAST)
        ctrd = Containerd(workdir / "containerd", registries=[proxy.host], proxy_socket=daemon.socket)
        ctrd.start()
        yield RpullRig(proxy, daemon, ctrd, cli_config)
    finally:
        if ctrd is not None:
            ctrd.cleanup()
        daemon.close()
        proxy.stop()


def base_layer(seed: int) -> list[Entry]:
    """busybox with a file naming ``seed``: a base layer (chain ID) no other image of the module shares, so
    each rpull has every layer to unpack."""
    return [*base_entries(), Entry(f"etc/image-{seed}.txt", f"{seed}\n".encode(), mode=0o644)]


def soci_image(rig: RpullRig, work: Path) -> tuple[Pushed, int]:
    """busybox + a data layer of its own + a small top layer, SOCI-converted and pushed; (image, seed)."""
    seed = next(_seed)
    top = [Entry("etc/", type=b"5"), Entry("etc/top.txt", b"top layer\n")]
    layers = [base_layer(seed), data_entries("data", FILES, FILE_SIZE, seed=seed), top]
    img = push_image(rig.proxy.upstream, work, layers, name="rpull")
    img.ref = img.ref.replace(rig.proxy.upstream.host, rig.proxy.host)
    return img, seed


def file_digest(seed: int, i: int) -> str:
    entry = next(
        e for e in data_entries("data", FILES, FILE_SIZE, seed=seed) if e.name == f"data/f{i:04d}.bin"
    )
    return hashlib.sha256(entry.data).hexdigest()


def assert_no_secrets(rig: RpullRig, r: Result) -> None:
    blob = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    logged = rig.daemon.log_path.read_text(errors="replace")
    for text in (logged, r.text, r.err):
        assert PASSWORD not in text and blob not in text


def test_rpull_of_a_soci_image_is_served_lazily(rig: RpullRig, tmp_path: Path) -> None:
    img, seed = soci_image(rig, tmp_path)
    r = rig.rpull(img.ref)
    assert r.rc == 0, r.err
    lines = r.text.splitlines()
    assert (
        lines[-1]
        == "unpacked 3 layers (3 provided by the snapshotter, 0 downloaded and applied, 0 already unpacked)"
    ), r.text
    assert not any(line.startswith(f"fetching {d[:15]}...") for d in img.layers for line in lines), r.text

    st = rig.image(img.manifest)
    assert st["state"] == "indexed" and st["index_digest"] == img.index_digest, st
    assert [(x["digest"], x["mode"]) for x in st["layers"]] == [(d, "lazy") for d in img.layers], st

    out = rig.run(img.ref, "sha256sum /data/f0100.bin")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.split() == [file_digest(seed, 100), "/data/f0100.bin"], out.stdout
    # only range reads of a small part of the data layer, never a whole-blob GET (which counts as 1 TiB)
    fetched = blob_bytes(rig.proxy, img.layers[1])
    assert 0 < fetched < img.layer_sizes[1] // 5, (fetched, img.layer_sizes[1])
    data = next(x for x in rig.image(img.manifest)["layers"] if x["digest"] == img.layers[1])
    assert 0 < data["fetched_percent"] < 20, data
    assert_no_secrets(rig, r)


def test_rpull_with_an_explicit_soci_index_digest(rig: RpullRig, tmp_path: Path) -> None:
    img, seed = soci_image(rig, tmp_path)
    r = rig.rpull(img.ref, "--soci-index-digest", img.index_digest)
    assert r.rc == 0, r.err
    assert r.text.splitlines()[-1].startswith("unpacked 3 layers (3 provided by the snapshotter"), r.text
    st = rig.image(img.manifest)
    assert (st["index_digest"], st["index_found_by"]) == (img.index_digest, "--index-digest"), st
    assert {x["mode"] for x in st["layers"]} == {"lazy"}, st
    out = rig.run(img.ref, "sha256sum /data/f0042.bin; cat /etc/top.txt")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout == f"{file_digest(seed, 42)}  /data/f0042.bin\ntop layer\n"
    assert blob_bytes(rig.proxy, img.layers[1]) < img.layer_sizes[1] // 5
    assert_no_secrets(rig, r)


def test_rpull_of_an_image_without_an_index_is_left_to_containerd(rig: RpullRig, tmp_path: Path) -> None:
    layers = [base_layer(next(_seed))]
    img = push_image(rig.proxy.upstream, tmp_path, layers, name="rpull-plain", soci=False)
    img.ref = img.ref.replace(rig.proxy.upstream.host, rig.proxy.host)
    r = rig.rpull(img.ref)
    assert r.rc == 0, r.err
    assert r.text.splitlines()[-1] == (
        "unpacked 1 layers (0 provided by the snapshotter, 1 downloaded and applied, 0 already unpacked)"
    ), r.text
    st = rig.image(img.manifest)
    assert st["state"] == "no_index", st
    assert [(x["mode"], x["reason"]) for x in st["layers"]] == [("deferred", "no_index")], st
    out = rig.run(img.ref, "cat /etc/hello.txt")
    assert (out.returncode, out.stdout) == (0, "hello from a lazily loaded layer\n"), out.stderr
    assert_no_secrets(rig, r)
