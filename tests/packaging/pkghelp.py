"""Test helpers for the packages: building them once, a cached Debian root file system, booting it.

Owns:
* :func:`built_packages`: runs ``scripts/build_packages.py`` (about 1.5 minutes) into a cache directory keyed
  by everything the build reads: the working tree's files (tracked and untracked, not ignored; ``tests/``,
  ``bench/`` and ``docs/`` excepted), the build interpreter's version and its ``pip freeze``. A second
  session on the same tree (``make test`` runs the suite twice) reuses the packages; any change rebuilds.
* :func:`debian_rootfs`: a ``debootstrap --variant=minbase`` of the host's Debian release with systemd and the
  packages' run-time dependencies, built once (45-90 s, network) under ``/var/cache/soci-py-test/`` and
  reused read-only as the lower layer of an overlay.
* :class:`Machine`: boots that root file system with ``systemd-nspawn --boot`` (the flags
  e2e-feasibility.md §4 found necessary on a host whose PID 1 is not systemd) and runs commands in it with
  ``nsenter``; the context manager powers it off, kills what is left, unmounts and deletes everything.

The cache root is ``$SOCI_TEST_CACHE`` or ``/var/cache/soci-py-test``; each cache has a lock file, so two
sessions at once build it once. Will not: use the network except through debootstrap and pip, or keep more
than the three newest package builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.harness.procs import die_with_parent

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build_packages.py"
CACHE = Path(os.environ.get("SOCI_TEST_CACHE", "/var/cache/soci-py-test"))
KEEP_BUILDS = 3
ROOTFS_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3.11", "fuse3", "libisal2")
SOCKET = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"


@dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path
    build_log: str


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


KEY_IGNORES = ("tests/", "bench/", "docs/")  # not read by the build: editing a test does not rebuild


def _tree_key() -> str:
    h = hashlib.sha256()
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for rel in sorted(set(filter(None, out.split(b"\0")))):
        if rel.decode(errors="replace").startswith(KEY_IGNORES):
            continue
        p = REPO / os.fsdecode(rel)
        if p.is_file() and not p.is_symlink():
            h.update(rel + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    h.update(sys.version.encode())
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, check=True
    ).stdout
    h.update(freeze)
    return h.hexdigest()[:20]


def built_packages() -> Packages:
    """The .deb and .rpm of the working tree, built now or taken from the cache."""
    builds = CACHE / "packages"
    key = _tree_key()
    done = builds / key
    with _locked(builds / ".lock"):
        if not (done / "build.log").exists():
            shutil.rmtree(done, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=builds))
            try:
                res = subprocess.run(
                    [sys.executable, str(BUILD_SCRIPT), "--out", str(tmp)],
                    capture_output=True,
                    text=True,
                    timeout=280,
                    check=False,
                )
                if res.returncode != 0:
                    raise AssertionError(f"build_packages.py failed ({res.returncode}):\n{res.stderr}")
                (tmp / "build.log").write_text(res.stderr)
                tmp.rename(done)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        os.utime(done)
        old = sorted((p for p in builds.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for p in old[:-KEEP_BUILDS]:
            shutil.rmtree(p, ignore_errors=True)
    (deb,) = done.glob("*.deb")
    (rpm,) = done.glob("*.rpm")
    return Packages(deb, rpm, (done / "build.log").read_text())


def _host_release() -> tuple[str, str]:
    """The host's Debian codename and its main archive URL (from the deb822 apt sources)."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip('"')
    mirror = "http://deb.debian.org/debian"
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and codename in suites.group(1).split():
                mirror = uris.group(1)
                break
    return codename, mirror


def debian_rootfs() -> Path:
    """A minimal Debian root file system with systemd and the packages' dependencies (cached, read-only)."""
    codename, mirror = _host_release()
    key = hashlib.sha256(f"{codename} {mirror} {' '.join(ROOTFS_PACKAGES)}".encode()).hexdigest()[:12]
    done = CACHE / f"rootfs-{codename}-{key}"
    with _locked(CACHE / ".rootfs.lock"):
        if not (done / "etc" / "os-release").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".rootfs-{key}-", dir=CACHE))
            try:
                res = subprocess.run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={','.join(ROOTFS_PACKAGES)}",
                        codename,
                        str(tmp),
                        mirror,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=240,
                    check=False,
                )
                if res.returncode != 0:
                    tail = (res.stdout + res.stderr)[-3000:]
                    raise AssertionError(f"debootstrap failed ({res.returncode}):\n{tail}")
                (tmp / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
                for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
                    deb.unlink()
                shutil.rmtree(done, ignore_errors=True)
                tmp.rename(done)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return done


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d.name))
    return kids


def _is_container_init(pid: int) -> bool:
    """``pid`` is systemd as PID 1 of a new PID namespace (not nspawn's child still setting up)."""
    try:
        other = os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        return other and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def pids_in_namespace_of(leader: int) -> dict[int, str]:
    """Every process in ``leader``'s PID namespace: host pid -> command line."""
    try:
        ns = os.readlink(f"/proc/{leader}/ns/pid")
    except OSError:
        return {}
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.readlink(d / "ns" / "pid") == ns:
                found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
    return found


class Machine:
    """A booted systemd-nspawn container over an overlay of a read-only root file system."""

    def __init__(self, scratch: Path, nspawn: subprocess.Popen[bytes], leader: int, merged: Path) -> None:
        self.scratch = scratch
        self.nspawn = nspawn
        self.leader = leader
        self.merged = merged

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all its namespaces) and return its output."""
        res = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def path(self, inside: str) -> Path:
        """A path inside the running container, as the host reaches it (through ``/proc/<pid>/root``)."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def log(self) -> str:
        return (self.scratch / "nspawn.log").read_text(errors="replace")

    @classmethod
    @contextlib.contextmanager
    def boot(cls, rootfs: Path, *, binds: dict[str, Path] | None = None) -> Iterator[Machine]:
        """Boot ``rootfs`` (left unchanged: writes go to an overlay upper dir); clean up on the way out."""
        scratch = Path(tempfile.mkdtemp(prefix="soci-nspawn-"))
        merged = scratch / "merged"
        for d in ("upper", "work", "merged"):
            (scratch / d).mkdir()
        nspawn = None
        leader = 0
        mounted = False
        try:
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    f"lowerdir={rootfs},upperdir={scratch / 'upper'},workdir={scratch / 'work'}",
                    str(merged),
                ],
                check=True,
                capture_output=True,
            )
            mounted = True
            name = f"soci-pkg-{os.getpid()}-{scratch.name[-6:]}".replace("_", "-")
            cmd = ["systemd-nspawn", "-D", str(merged), "--boot", "--register=no", "--keep-unit"]
            cmd += ["--console=read-only", f"--machine={name}", "--bind=/dev/fuse"]
            cmd += [f"--bind={host}:{inside}" for inside, host in (binds or {}).items()]
            with open(scratch / "nspawn.log", "wb") as out:
                nspawn = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            deadline = time.monotonic() + 60
            while not leader:
                kids = [k for k in _children(nspawn.pid) if _is_container_init(k)]
                if kids:
                    leader = kids[0]
                elif nspawn.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"systemd-nspawn did not start:\n{(scratch / 'nspawn.log').read_text()}"
                    )
                else:
                    time.sleep(0.05)
            machine = cls(scratch, nspawn, leader, merged)
            deadline = time.monotonic() + 90
            while True:  # systemd answers once its private bus socket exists; until then systemctl fails
                res = machine.run("systemctl", "is-system-running", "--wait", check=False, timeout=90)
                state = res.stdout.strip()
                if state in ("running", "degraded"):
                    break
                if nspawn.poll() is not None or time.monotonic() > deadline:
                    why = f"state {state!r}, {res.stderr.strip()}"
                    raise AssertionError(f"container did not boot ({why}):\n{machine.log()[-3000:]}")
                time.sleep(0.1)
            yield machine
        finally:
            if nspawn is not None:
                if nspawn.poll() is None and leader:
                    subprocess.run(
                        ["nsenter", "-t", str(leader), "-a", "systemctl", "poweroff"],
                        capture_output=True,
                        timeout=30,
                        check=False,
                    )
                try:
                    nspawn.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)  # PID 1 of the container: its namespace dies with it
                    nspawn.kill()
                    nspawn.wait(timeout=30)
            if mounted:
                res = subprocess.run(["umount", str(merged)], capture_output=True, check=False)
                if res.returncode != 0:
                    subprocess.run(["umount", "-l", str(merged)], capture_output=True, check=False)
            shutil.rmtree(scratch, ignore_errors=True)
