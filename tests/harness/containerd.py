"""A real containerd for tests: Debian's containerd 1.6, a child process with its own root, state, sockets.

Owns:
* ``Containerd``: writes a version-2 config into a temp dir (root, state, gRPC and ttrpc sockets there too),
  optionally declares the proxy snapshotter ``soci`` at a given socket, enables the CRI plugin with
  ``disable_snapshot_annotations = false`` and a chosen default snapshotter, points CRI's registry
  ``config_path`` at a ``certs.d`` directory with one plain-http ``hosts.toml`` per harness registry, and sets
  ``sandbox_image`` to a name that is never pulled from outside. ``start()`` waits until both the containerd
  API (``ctr version``) and CRI's image service answer; ``stop()`` ends it by PID (SIGTERM, then SIGKILL),
  kills shims started for this instance, unmounts anything left under its dirs and removes what
  containerd, the shim and runc left under ``/run/containerd`` for it.
* ``containerd_factory``: a pytest fixture; ``containerd_factory(registries=[...], proxy_socket=...,
  snapshotter=...)`` starts one, and all are stopped at teardown.

Will not: touch the host's containerd (its own sockets and dirs only), pull anything from the internet, or
set up CNI (no pods; image calls need none; containerd logs that it found no network config).

Limit: what is left under ``/run/containerd`` is attributed to an instance by comparing the listing before
its start with the one after its stop, so two instances must not run in parallel (the suite does not).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.harness.procs import die_with_parent, stop_process

CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"
RUN_DIR = Path("/run/containerd")
CRI_IMAGE_FS_INFO = "/runtime.v1.ImageService/ImageFsInfo"
DEFAULT_SANDBOX_IMAGE = "127.0.0.1:1/soci-test/pause:never"  # a closed local port: never fetched
_DISABLED = (
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _q(s: str) -> str:
    """A TOML basic string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Containerd:
    """One containerd child process. Hosts in ``registries`` (``host:port``) are reached over plain http."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        registries: Iterable[str] = (),
        proxy_socket: str | None = None,
        snapshotter: str = "overlayfs",
        sandbox_image: str = DEFAULT_SANDBOX_IMAGE,
        log_level: str = "info",
    ) -> None:
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="soci-containerd-"))
        self.registries = tuple(registries)
        self.proxy_socket = proxy_socket
        self.snapshotter = snapshotter
        self.sandbox_image = sandbox_image
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.certs_dir = self.workdir / "certs.d"
        self.address = str(self.workdir / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self._run_before: set[Path] | None = None

    # ---- configuration

    def config(self) -> str:
        lines = [
            "version = 2",
            f"root = {_q(str(self.root))}",
            f"state = {_q(str(self.state))}",
            "disabled_plugins = [" + ", ".join(_q(p) for p in _DISABLED) + "]",
            "",
            "[grpc]",
            f"  address = {_q(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {_q(self.ttrpc_address)}",
            "",
            "[debug]",
            f"  level = {_q(self.log_level)}",
            "",
        ]
        if self.proxy_socket:
            lines += [
                "[proxy_plugins]",
                "  [proxy_plugins.soci]",
                '    type = "snapshot"',
                f"    address = {_q(self.proxy_socket)}",
                "",
            ]
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        lines += [
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_q(str(self.workdir / 'opt'))}",
            "",
            cri,
            f"  sandbox_image = {_q(self.sandbox_image)}",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"  [{cri[1:-1]}.containerd]",
            f"    snapshotter = {_q(self.snapshotter)}",
            "    disable_snapshot_annotations = false",
            f"  [{cri[1:-1]}.cni]",
            f"    conf_dir = {_q(str(self.workdir / 'cni' / 'net.d'))}",
            f"    bin_dir = {_q(str(self.workdir / 'cni' / 'bin'))}",
            f"  [{cri[1:-1]}.registry]",
            f"    config_path = {_q(str(self.certs_dir))}",
            "",
        ]
        return "\n".join(lines)

    def write_hosts(self) -> None:
        """One ``certs.d/<host:port>/hosts.toml`` per registry: plain http, pull and resolve."""
        for host in self.registries:
            d = self.certs_dir / host
            d.mkdir(parents=True, exist_ok=True)
            url = f"http://{host}"
            (d / "hosts.toml").write_text(
                f"server = {_q(url)}\n\n"
                f"[host.{_q(url)}]\n"
                '  capabilities = ["pull", "resolve", "push"]\n'
                "  skip_verify = true\n"
            )

    # ---- lifecycle

    def start(self, timeout: float = 20.0) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs_dir.mkdir(exist_ok=True)
        self.write_hosts()
        self.config_path.write_text(self.config())
        self._run_before = _listing(RUN_DIR)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [CONTAINERD_BIN, "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        api_up = False
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.address):
                if not api_up:
                    api_up = self.ctr("version", check=False, timeout=5).returncode == 0
                if api_up and self._cri_answers():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"containerd not ready after {timeout} s:\n{self.log_tail()}")

    def _cri_answers(self) -> bool:
        with grpc.insecure_channel("unix://" + self.address) as ch:
            try:
                ch.unary_unary(CRI_IMAGE_FS_INFO)(b"", timeout=2)
            except grpc.RpcError:
                return False
        return True

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <this> <args>``."""
        return subprocess.run(
            [CTR_BIN, "--address", self.address, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            preexec_fn=die_with_parent,
        )

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop containerd and its shims, then remove what they left (mounts, /run/containerd entries)."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout=10)
        for pid in self._shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _unmount_under(self.workdir)
        if self._run_before is not None:
            _remove_new(RUN_DIR, self._run_before)
            self._run_before = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _shim_pids(self) -> list[int]:
        """Shims of this instance: their command line names this instance's socket."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and self.address.encode() in argv:
                out.append(int(entry.name))
        return out


def _listing(top: Path, depth: int = 2) -> set[Path]:
    found: set[Path] = set()
    if not top.exists():
        return found
    found.add(top)
    if depth:
        try:
            children = list(top.iterdir())
        except OSError:
            return found
        for c in children:
            found |= _listing(c, depth - 1) if c.is_dir() and not c.is_symlink() else {c}
    return found


def _remove_new(top: Path, before: set[Path]) -> None:
    """Remove entries under ``top`` (two levels) that were not there before, deepest first; then empty dirs
    that were created."""
    after = _listing(top)
    for p in sorted(after - before, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _unmount_under(top: Path) -> None:
    prefix = str(top.resolve()) + "/"
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix):
                targets.append(mp)
    for mp in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


@pytest.fixture
def containerd_factory() -> Iterator[Callable[..., Containerd]]:
    """Factory: ``containerd_factory(registries=[host, ...], proxy_socket=None, snapshotter="overlayfs")``."""
    started: list[Containerd] = []

    def make(**kw: Any) -> Containerd:
        c = Containerd(**kw)
        started.append(c)
        return c.start()

    try:
        yield make
    finally:
        for c in started:
            c.cleanup()
