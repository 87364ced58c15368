"""The .deb installed into a booted Debian (systemd-nspawn, systemd as PID 1) and run by systemd for real.

One container for the module: the first test pays for the root file system (a cached debootstrap, see
:func:`pkghelp.debian_rootfs`), the boot and ``dpkg -i``; the tests then run in file order on that one
installation and end with its removal. The daemon's root, ``/var/lib/soci-snapshotter-grpc``, is bound to a
host directory (ext4): the container's own root is an overlay, and overlay cannot stack its upper directory
on another overlay.

``test_socket_activation_starts_the_daemon_and_stop_leaves_nothing`` NEEDS the sockact wiring in
``soci_grpc/cli/daemon.py``'s ``_serve``: the unit runs the daemon with ``--address fd://``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from soci_grpc import config as configmod
from soci_grpc._proto.soci import snapshots_pb2, snapshots_pb2_grpc
from tests.packaging import pkghelp

SERVICE = "soci-snapshotter-grpc.service"
SOCKET_UNIT = "soci-snapshotter-grpc.socket"
VARLIB = "/var/lib/soci-snapshotter-grpc"
TOOLS = ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb", "rpmbuild", "objdump")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, systemd-nspawn)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS),
        reason=f"needs {', '.join(TOOLS)} (Debian packages systemd-container, debootstrap, rpm, binutils)",
    ),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse"),
]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pkghelp.Machine]:
    packages = pkghelp.built_packages()
    rootfs = pkghelp.debian_rootfs()
    varlib = tmp_path_factory.mktemp("varlib")
    with pkghelp.Machine.boot(rootfs, binds={VARLIB: varlib}) as m:
        shutil.copy(packages.deb, m.merged / "var/tmp" / packages.deb.name)  # not /tmp: nspawn mounts a tmpfs
        res = m.run("dpkg", "-i", f"/var/tmp/{packages.deb.name}", check=False)
        if (
            res.returncode != 0 and "dependency problems" in res.stderr
        ):  # Depends the rootfs lacks: fetch them
            m.run("apt-get", "update", "-qq", timeout=240)
            m.run("apt-get", "install", "-f", "-y", "-qq", timeout=240)
        else:
            assert res.returncode == 0, res.stdout + res.stderr
        yield m


def _systemctl(m: pkghelp.Machine, *args: str) -> str:
    return m.run("systemctl", *args, check=False).stdout.strip()


def _daemons(m: pkghelp.Machine) -> dict[int, str]:
    return {
        pid: cmd
        for pid, cmd in pkghelp.pids_in_namespace_of(m.leader).items()
        if "soci-snapshotter-grpc" in cmd
    }


def _wait_inactive(m: pkghelp.Machine, unit: str) -> str:
    deadline = time.monotonic() + 60
    while (state := _systemctl(m, "is-active", unit)) in ("active", "activating", "deactivating"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return state


def _list(m: pkghelp.Machine) -> list[snapshots_pb2.ListReply]:
    with grpc.insecure_channel(f"unix:{m.path(pkghelp.SOCKET)}") as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        req = snapshots_pb2.ListRequest(snapshotter="soci")
        return list(stub.List(req, metadata=[("containerd-namespace", "default")], timeout=90))


def test_installed_enabled_and_runnable(machine: pkghelp.Machine) -> None:
    m = machine
    assert m.run("dpkg-query", "-W", "-f=${Status} ${Version}", "soci-py").stdout.startswith(
        "install ok installed"
    )
    assert _systemctl(m, "is-enabled", SOCKET_UNIT, SERVICE, "soci-snapshotter.service").split() == [
        "enabled",
        "enabled",
        "alias",
    ]
    assert _systemctl(m, "is-active", SOCKET_UNIT) == "active"
    res = m.run("systemd-analyze", "verify", SOCKET_UNIT, SERVICE, check=False)
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    version = m.run("dpkg-query", "-W", "-f=${Version}", "soci-py").stdout.split("-")[0]
    assert m.run("soci", "--version").stdout.strip() == f"soci version {version}"
    # isolated: PYTHON* variables are ignored, the distribution's packages are not on the path
    env = ["env", "PYTHONPATH=/nonexistent", "PYTHONHOME=/nonexistent"]
    out = m.run(*env, "soci-snapshotter-grpc", "--version").stdout.strip()
    assert out == f"soci-snapshotter-grpc version {version}"
    # the shipped config (all commented out) is the defaults; the CLI reads it from its default path
    assert m.run("soci-snapshotter-grpc", "config", "dump").stdout == configmod.default_toml()
    conf = m.path("/etc/soci-snapshotter-grpc/config.toml")
    assert configmod.parse(conf.read_text()) == configmod.Config()


def test_socket_activation_starts_the_daemon_and_stop_leaves_nothing(machine: pkghelp.Machine) -> None:
    """NEEDS the sockact wiring in daemon.py ``_serve``."""
    m = machine
    sock = m.path(pkghelp.SOCKET)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    m.run("systemctl", "stop", SERVICE)
    assert _wait_inactive(m, SERVICE) == "inactive" and _daemons(m) == {}
    assert _systemctl(m, "is-active", SOCKET_UNIT) == "active"

    assert _list(m) == []  # this connection waits in systemd's socket and starts the daemon
    assert _systemctl(m, "is-active", SERVICE) == "active"
    journal = m.run("journalctl", "-u", SERVICE, "-o", "cat", "--no-pager").stdout
    started = [json.loads(line) for line in journal.splitlines() if "successfully started" in line]
    assert started and started[-1]["address"] == pkghelp.SOCKET, journal
    main_pid = int(_systemctl(m, "show", "-p", "MainPID", "--value", SERVICE))
    assert main_pid > 0 and len(_daemons(m)) == 1

    # a restart: the socket outlives the daemon and starts the next one
    m.run("systemctl", "restart", SERVICE)
    assert _list(m) == []
    assert int(_systemctl(m, "show", "-p", "MainPID", "--value", SERVICE)) not in (0, main_pid)

    m.run("systemctl", "stop", SERVICE, SOCKET_UNIT)
    assert _wait_inactive(m, SERVICE) == "inactive" and _wait_inactive(m, SOCKET_UNIT) == "inactive"
    assert _daemons(m) == {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(sock))  # the file stays (RemoveOnStop=no), nothing listens
    m.run("systemctl", "start", SOCKET_UNIT)
    assert _list(m) == [] and _systemctl(m, "is-active", SERVICE) == "active"


def test_remove_then_purge_keeps_the_data(machine: pkghelp.Machine) -> None:
    m = machine
    (m.path(VARLIB) / "keep-me").write_text("user data")
    m.run("dpkg", "-r", "soci-py")
    assert _wait_inactive(m, SERVICE) in ("inactive", "unknown") and _daemons(m) == {}
    assert not m.path("/usr/bin/soci-snapshotter-grpc").exists()
    assert not m.path("/usr/lib/soci-py").exists()
    assert m.path("/etc/soci-snapshotter-grpc/config.toml").exists(), "remove keeps conffiles"
    m.run("dpkg", "-P", "soci-py")
    assert not m.path("/etc/soci-snapshotter-grpc").exists()
    assert not m.path("/etc/systemd/system/sockets.target.wants/soci-snapshotter-grpc.socket").is_symlink()
    assert not m.path("/etc/systemd/system/soci-snapshotter.service").is_symlink()
    assert (m.path(VARLIB) / "keep-me").read_text() == "user data", "purge never deletes the snapshotter root"
