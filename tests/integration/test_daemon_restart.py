"""Restart: the daemon is killed (SIGKILL) while a container runs on lazily loaded layers, and started again.

What must hold (issue: restart): the remote snapshots come back from what the daemon stored (manifest, SOCI
index and zTOCs in ``<root>/content``, labels in the snapshot metadata) without asking the registry; reads
that need spans not fetched before work again (the daemon's own credentials, here a Docker config); a new
container from the same image starts; a registry that is down at startup does not stop the daemon, and a
snapshot that cannot be restored then is restored in the background once the registry is back.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from soci_fs.index import parse_index
from soci_fs.store import ContentStore
from tests.harness.containerd import CONTAINERD_BIN
from tests.harness.registry import Fault
from tests.integration.sociimg import data_entries, docker_config
from tests.integration.test_daemon_lazy import Rig, lazy_image, plain_cri_pull

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN), reason="needs root and containerd"
    ),
]

DATA = {e.name: e.data for e in data_entries("data", 200, 16384)}


def sha(name: str) -> str:
    return hashlib.sha256(DATA[name]).hexdigest()


def kill9(rig: Rig) -> None:
    proc = rig.daemon.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    rig.daemon.proc = None


def restart(rig: Rig, config: str) -> None:
    """Start the daemon again on the same root and socket (a new notify socket for READY)."""
    d = rig.daemon
    d.stop()
    if d.notify is not None:
        d.notify.close()
        d.notify = None
    Path(d.notify_path).unlink(missing_ok=True)
    d.start(config=config)


def drop_ztoc(rig: Rig, index_digest: str, layer: str) -> None:
    """Delete the stored zTOC of ``layer`` from the daemon's content store."""
    content = ContentStore(rig.daemon.root / "content")
    idx = parse_index(content.read(index_digest, None), "index")
    ref = idx.ztoc_for_layer(layer)
    assert ref is not None
    content.delete(ref.descriptor.digest)


def wait_for(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def lazy_layers(rig: Rig, manifest: str) -> list[dict]:
    return [x for x in rig.image(manifest)["layers"] if x["mode"] == "lazy"]


def test_kill9_while_a_container_runs_then_restart(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    cfg_path = tmp_path / "docker" / "config.json"
    rig = rig_factory(f'docker_config = "{cfg_path}"\n', cri_keychain=False)
    docker_config(cfg_path, rig.proxy.host)
    config = (rig.daemon.workdir / "config.toml").read_text()
    img = lazy_image(rig.proxy.host, rig.proxy.upstream, tmp_path)
    plain_cri_pull(rig, img.ref)
    assert len(lazy_layers(rig, img.manifest)) == 3

    ctr = rig.containerd
    ctr.ctr(
        "-n", "k8s.io", "run", "-d", "--snapshotter", "soci", img.ref, "long1", "/bin/busybox", "sleep", "600"
    )
    try:
        kill9(rig)
        restart(rig, config)
        st = rig.image(img.manifest)
        assert {(x["mode"], x["detail"]) for x in st["layers"]} == {("lazy", "restored")}, st

        # new reads of spans never fetched before, straight through a restored snapshot directory
        data_layer = next(x for x in st["layers"] if x["digest"] == img.layers[1])
        got = Path(data_layer["mountpoint"], "data", "f0150.bin").read_bytes()
        assert hashlib.sha256(got).hexdigest() == sha("data/f0150.bin")

        # and a new container from the same image (containerd reconnects to the restarted daemon within
        # its dial backoff; under systemd the socket unit keeps the socket, so there is no refused window)
        def started_again() -> bool:
            run = rig.run(
                img.ref,
                "again1",
                "/bin/sha256sum",
                "/data/f0160.bin",
                check=False,
            )
            if run.returncode != 0 and run.stderr.rstrip().endswith("unavailable"):
                return False  # containerd's channel to the daemon is still reconnecting
            assert sha("data/f0160.bin") in run.stdout, (run.stdout, run.stderr)
            return True

        wait_for(started_again, timeout=60)
    finally:
        ctr.ctr("-n", "k8s.io", "task", "delete", "--force", "long1", check=False)
        ctr.ctr("-n", "k8s.io", "container", "rm", "long1", check=False)


def test_registry_down_at_startup(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    cfg_path = tmp_path / "docker" / "config.json"
    rig = rig_factory(f'docker_config = "{cfg_path}"\n', cri_keychain=False)
    docker_config(cfg_path, rig.proxy.host)
    config = (rig.daemon.workdir / "config.toml").read_text()
    img = lazy_image(rig.proxy.host, rig.proxy.upstream, tmp_path)
    plain_cri_pull(rig, img.ref)
    st = rig.image(img.manifest)
    data_mp = next(x["mountpoint"] for x in st["layers"] if x["digest"] == img.layers[1])

    rig.daemon.stop()
    # the restart must reach the registry for this image: its stored zTOC for the data layer is gone
    drop_ztoc(rig, img.index_digest, img.layers[1])
    down = rig.proxy.add(Fault("status", path="/v2/", method=None, times=-1, status=503))
    restart(rig, config)  # READY although the registry answers 503
    st = rig.image(img.manifest)
    modes = {x["digest"]: x["mode"] for x in st["layers"]}
    assert "degraded" in modes.values(), st
    with pytest.raises(OSError):
        Path(data_mp, "data", "f0170.bin").read_bytes()  # not served (yet)

    down.times = 0  # the registry is back: the background retry restores the snapshot
    wait_for(lambda: {x["mode"] for x in rig.image(img.manifest)["layers"]} == {"lazy"}, timeout=60)
    got = Path(data_mp, "data", "f0170.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == sha("data/f0170.bin")
