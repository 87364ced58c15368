"""End to end through Debian's containerd 1.6: our daemon is its ``soci`` proxy snapshotter.

A one-layer image (static busybox and ``/etc/hello.txt``) is pushed to the htpasswd registry of the harness;
``soci-snapshotter-grpc`` runs as a child process on a socket in a temp dir (with ``NOTIFY_SOCKET`` pointing
at a datagram socket of the test), containerd (``tests/harness/containerd.py``) is configured with
``[proxy_plugins.soci]`` at that socket; then ``ctr image pull --snapshotter soci`` unpacks the layer into
our snapshots and ``ctr run --rm --snapshotter soci`` runs a container on the overlay mounts we return.
Everything is stopped by PID; the containerd harness unmounts leftovers and removes what containerd, the shim
and runc created under ``/run/containerd``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.procs import die_with_parent
from tests.harness.registry import PASSWORD, USER, RawPusher, Registry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd and runc need root"),
]

BUSYBOX = "/bin/busybox"
HELLO = "hello from a soci-py snapshot\n"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _layer() -> tuple[bytes, str]:
    """A gzip layer with bin/busybox (+ sh, cat links) and etc/hello.txt; returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", mode: int = 0o755, link: str = "") -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.linkname, ti.size = kind, mode, 1_700_000_000, link, len(data)
            tar.addfile(ti, io.BytesIO(data) if data else None)

        add("bin", tarfile.DIRTYPE)
        add("bin/busybox", tarfile.REGTYPE, Path(BUSYBOX).read_bytes())
        add("bin/sh", tarfile.SYMTYPE, link="busybox", mode=0o777)
        add("bin/cat", tarfile.SYMTYPE, link="busybox", mode=0o777)
        add("etc", tarfile.DIRTYPE)
        add("etc/hello.txt", tarfile.REGTYPE, HELLO.encode(), mode=0o644)
        for d in ("proc", "sys", "dev", "tmp"):
            add(d, tarfile.DIRTYPE)
    data = raw.getvalue()
    return gzip.compress(data, mtime=0), "sha256:" + hashlib.sha256(data).hexdigest()


def push_busybox_image(registry: Registry, repo: str) -> str:
    """Push the one-layer image as ``<repo>:v1``; returns its reference."""
    pusher = RawPusher(registry)
    blob, diff_id = _layer()
    config = json.dumps(
        {
            "architecture": ARCH,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": pusher.push_blob(repo, config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": pusher.push_blob(repo, blob),
                "size": len(blob),
            }
        ],
    }
    pusher.push_manifest(repo, "v1", manifest, manifest["mediaType"])
    return f"{registry.host}/{repo}:v1"


class Daemon:
    """``soci-snapshotter-grpc`` as a child process, JSON logs in a file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.socket = str(workdir / "run" / "soci.sock")
        self.log_path = workdir / "daemon.log"
        self.notify_path = str(workdir / "notify.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None

    def start(self, timeout: float = 20.0, config: str = "") -> Daemon:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.toml").write_text(config)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(timeout)
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path}
        argv = [sys.executable, "-m", "soci_grpc.cli.daemon", "--log-level", "debug"]
        argv += ["--root", str(self.root), "--address", "unix://" + self.socket]
        argv += ["--config", str(self.workdir / "config.toml")]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent
            )
        try:
            assert self.notify.recv(64) == b"READY=1", self.logs()
        except BaseException:
            self.stop()
            raise
        return self

    def logs(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"level": "raw", "msg": line})
        return out

    def stop(self) -> int | None:
        """SIGTERM by PID (SIGKILL after 10 s); the exit status."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        return None if proc is None else proc.returncode

    def close(self) -> None:
        self.stop()
        if self.notify is not None:
            self.notify.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "soci").start()
    try:
        yield d
    finally:
        d.close()


def test_pull_and_run_through_containerd(
    htpasswd_registry: Registry,
    daemon: Daemon,
    containerd_factory: Callable[..., Containerd],
) -> None:
    ref = push_busybox_image(htpasswd_registry, "e2e/snapshots")
    assert any(r["msg"] == "soci-snapshotter-grpc successfully started" for r in daemon.logs())
    assert oct(os.stat(daemon.socket).st_mode & 0o777) == oct(0o660)
    ctrd = containerd_factory(registries=[htpasswd_registry.host], proxy_socket=daemon.socket)

    ctrd.ctr("image", "pull", "--snapshotter", "soci", "--plain-http", "--user", f"{USER}:{PASSWORD}", ref)
    ls = ctrd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout
    assert "Committed" in ls and "sha256:" in ls, ls
    unpacked = list((daemon.root / "snapshotter" / "snapshots").glob("*/fs/etc/hello.txt"))
    assert [p.read_text() for p in unpacked] == [HELLO]

    t0 = time.monotonic()
    run = ctrd.ctr(
        "run", "--rm", "--snapshotter", "soci", ref, "t1", "/bin/busybox", "sh", "-c", "cat /etc/hello.txt"
    )
    assert run.stdout == HELLO, (run.stdout, run.stderr, ctrd.log_tail())
    assert time.monotonic() - t0 < 30
    ls = ctrd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout
    assert "Active" not in ls, ls  # --rm removed the container's snapshot

    # containerd's garbage collector removes the container's snapshot from the backend asynchronously
    deadline = time.monotonic() + 15
    while not any(r["msg"] == "removed snapshot" for r in daemon.logs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    ctrd.stop()
    rc = daemon.stop()
    assert rc == 0, daemon.log_path.read_text()[-3000:]
    assert daemon.notify is not None and daemon.notify.recv(64) == b"STOPPING=1"
    assert not os.path.exists(daemon.socket)
    logs = daemon.logs()
    msgs = [r["msg"] for r in logs]
    assert "prepare" in msgs and "commit" in msgs and "remove" in msgs
    assert not [r for r in logs if r["level"] in ("warning", "error", "fatal", "panic", "raw")], logs
