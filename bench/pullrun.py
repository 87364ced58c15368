"""Pull an image and run it to its first output line: the timing code shared by the bench and ``make demo``.

Owns:

* :func:`soci_convert` / :func:`soci_push`: ``soci convert --standalone --format oci-dir`` of a layout and
  ``soci push --plain-http --oci-layout`` of the result (credentials from a Docker config directory, never
  ``--user``);
* :class:`Daemon`: ``.venv/bin/soci-snapshotter-grpc`` as a child process with its own root, socket and
  config (ready when it sends ``READY=1`` to a notify socket), and its memory (``VmRSS``/``VmHWM`` of the
  daemon and its descendants, from ``/proc``);
* :class:`Node`: a fresh containerd (``tests/harness/containerd.py``), with the daemon as proxy snapshotter
  ``soci`` when lazy, that pulls an image and runs it (``ctr run --rm REF ID /entrypoint.sh``), timing from
  the start of the pull to the first line the container prints and to its ``demo: done`` line. Overlayfs:
  ``ctr image pull --plain-http``; lazy: ``soci image rpull --plain-http --snapshotter soci``. Bytes
  fetched come from the registry's log (``http.response.written`` of every GET in the window);
* :class:`NetnsRegistry`: the harness registry started inside a :class:`bench.netlimit.NetNS`;
* :func:`cleanup_under`: unmount whatever is left under a work directory (deepest first);
* :func:`sigterm_as_interrupt`: SIGTERM raises ``KeyboardInterrupt``, so ``finally`` blocks clean up.

Every process is started with ``die_with_parent`` and stopped by PID. Will not: build images
(``scripts/demo_image.py`` does), start registries other than through the harness, or touch containerd or
snapshotter state outside the work directory it is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.netlimit import NetNS
from scripts.demo_image import DONE_PREFIX
from soci_fs.errors import FailedPrecondition, Unavailable
from tests.harness.containerd import CTR_BIN, Containerd
from tests.harness.procs import die_with_parent, stop_process
from tests.harness.registry import REGISTRY_BIN, Registry

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
SOCI = VENV_BIN / "soci"
DAEMON = VENV_BIN / "soci-snapshotter-grpc"
RUN_TIMEOUT = 900.0

_RESPONSE = re.compile(
    r'msg="response completed".*?http\.request\.method=(\w+).*?http\.request\.uri="([^"]*)"'
)
_WRITTEN = re.compile(r"http\.response\.written=(\d+)")
_STATUS = re.compile(r"http\.response\.status=(\d+)")


class LazyUnavailable(FailedPrecondition):
    """The lazy path cannot run here (``soci image rpull`` is missing or the daemon cannot serve it)."""


# --------------------------------------------------------------------------------------------------------
# processes and cleanup


def sigterm_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, so cleanup in ``finally`` runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def cleanup_under(top: Path) -> None:
    """Lazily unmount every mount point under ``top``, deepest first."""
    prefix = str(Path(top).resolve()) + "/"
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix):
                targets.append(mp)
    for mp in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def _run(argv: list[str], *, env: Mapping[str, str] | None = None, timeout: float = RUN_TIMEOUT) -> str:
    res = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        check=False,
        preexec_fn=die_with_parent,
    )
    if res.returncode != 0:
        out = (res.stderr.strip() or res.stdout.strip())[-3000:]
        raise FailedPrecondition(
            f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''}: exit {res.returncode}: {out}"
        )
    return res.stdout


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (kB) of ``pid`` and, summed, of its whole process tree."""
    out = {"rss_kb": 0, "hwm_kb": 0, "tree_rss_kb": 0, "tree_hwm_kb": 0}
    for p in _tree(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        vals = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", text, re.M)}
        out["tree_rss_kb"] += vals.get("VmRSS", 0)
        out["tree_hwm_kb"] += vals.get("VmHWM", 0)
        if p == pid:
            out["rss_kb"], out["hwm_kb"] = vals.get("VmRSS", 0), vals.get("VmHWM", 0)
    return out


# --------------------------------------------------------------------------------------------------------
# soci CLI


def soci_convert(
    layout: Path, dest: Path, *, min_layer_size: int | None = None, root: Path, echo: bool = False
) -> Path:
    """``soci convert --standalone --format oci-dir LAYOUT DEST``; returns ``dest``. ``echo`` prints its
    output (a line per layer and its zTOC)."""
    argv = [str(SOCI), "--root", str(root), "convert", "--standalone", "--format", "oci-dir"]
    if min_layer_size is not None:
        argv += ["--min-layer-size", str(min_layer_size)]
    out = _run([*argv, str(layout), str(dest)])
    if echo:
        print(out, end="", flush=True)
    return dest


def soci_push(converted: Path, ref: str, *, root: Path, docker_config: Path | None = None) -> None:
    """``soci push --plain-http --oci-layout CONVERTED REF``, credentials from ``docker_config`` (a dir)."""
    env = dict(os.environ)
    if docker_config is not None:
        env["DOCKER_CONFIG"] = str(docker_config)
    _run(
        [
            str(SOCI),
            "--root",
            str(root),
            "push",
            "--plain-http",
            "--quiet",
            "--oci-layout",
            str(converted),
            ref,
        ],
        env=env,
    )


def skopeo_push(layout: Path, tag: str, ref: str, *, docker_config: Path | None = None) -> None:
    """``skopeo copy oci:LAYOUT:TAG docker://REF`` over plain http: the image as it was before conversion,
    which is what a pull without SOCI downloads. Credentials from ``docker_config`` (a dir), if given."""
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if docker_config is not None:
        argv += ["--dest-authfile", str(docker_config / "config.json")]
    _run([*argv, f"oci:{layout}:{tag}", f"docker://{ref}"])


def rpull_missing() -> str:
    """Why the lazy path cannot run ("" when ``soci image rpull`` is there)."""
    if not SOCI.exists():
        return f"{SOCI} is missing (run make venv)"
    res = subprocess.run([str(SOCI), "image", "rpull", "--help"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return (
            "`soci image rpull` is not available yet (soci_grpc/cli/cmd_image.py): "
            + (res.stderr.strip().splitlines() or ["no output"])[-1]
        )
    return ""


def write_docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    """A Docker config directory with ``auths`` for ``host`` (mode 0600); returns the directory."""
    import base64

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {host: {"auth": auth}}}, f)
    return directory


# --------------------------------------------------------------------------------------------------------
# registry


def registry_window(registry: Registry) -> int:
    """The registry log's current size: pass it to :func:`fetched_since` after the work."""
    try:
        return registry.log_path.stat().st_size
    except OSError:
        return 0


def fetched_since(registry: Registry, offset: int) -> dict[str, int]:
    """Bytes the registry sent for GETs logged after ``offset``: ``bytes`` in all, ``blob_bytes`` (of which
    ``range_bytes`` answered ranged requests: 206, the spans of a lazy pull), ``manifest_bytes``, and the
    number of GET ``requests``."""
    out = {"bytes": 0, "blob_bytes": 0, "range_bytes": 0, "manifest_bytes": 0, "requests": 0}
    with open(registry.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        m = _RESPONSE.search(line)
        if not m or m.group(1) != "GET":
            continue
        w = _WRITTEN.search(line)
        n = int(w.group(1)) if w else 0
        out["requests"] += 1
        out["bytes"] += n
        if "/blobs/" in m.group(2):
            out["blob_bytes"] += n
            st = _STATUS.search(line)
            if st and st.group(1) == "206":
                out["range_bytes"] += n
        elif "/manifests/" in m.group(2):
            out["manifest_bytes"] += n
    return out


class NetnsRegistry(Registry):
    """The harness registry, run inside ``netns`` and listening on the namespace's address."""

    def __init__(self, workdir: Path, netns: NetNS, **kw: Any) -> None:
        super().__init__(workdir, **kw)
        self.netns = netns

    @property
    def host(self) -> str:
        return f"{self.netns.ns_ip}:{self.port}"

    def _config(self) -> str:
        return (
            super()._config().replace(f"addr: 127.0.0.1:{self.port}", f"addr: {self.netns.ns_ip}:{self.port}")
        )

    def start(self, timeout: float = 10.0) -> NetnsRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = 5000
        cfg = self.workdir / "config.yml"
        cfg.write_text(self._config())
        with self.log_path.open("ab") as log_file:
            self.proc = self.netns.popen(
                [REGISTRY_BIN, "serve", str(cfg)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        if not self._wait_ready(timeout):
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise Unavailable(f"docker-registry in namespace {self.netns.name} did not start:\n{tail}")
        return self


# --------------------------------------------------------------------------------------------------------
# the daemon


class Daemon:
    """``soci-snapshotter-grpc`` as a child process; JSON logs in ``daemon.log``."""

    def __init__(self, workdir: Path, config: str = "") -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.socket = str(self.workdir / "run" / "soci.sock")
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "daemon.log"
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Daemon:
        """Start and wait for ``READY=1``.

        Raises:
            LazyUnavailable: the daemon is missing or exited before it was ready (its log tail is included).
        """
        if not DAEMON.exists():
            raise LazyUnavailable(f"{DAEMON} is missing (run make venv)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        notify_path = str(self.workdir / "notify.sock")
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as notify:
            notify.bind(notify_path)
            notify.settimeout(0.2)
            argv = [str(DAEMON), "--log-level", "info", "--root", str(self.root)]
            argv += ["--address", "unix://" + self.socket, "--config", str(self.config_path)]
            env = {**os.environ, "NOTIFY_SOCKET": notify_path}
            with self.log_path.open("ab") as log_file:
                self.proc = subprocess.Popen(
                    argv,
                    stdout=log_file,
                    stderr=log_file,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    preexec_fn=die_with_parent,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if notify.recv(64) == b"READY=1":
                        return self
                if self.proc.poll() is not None:
                    break
            self.stop()
        raise LazyUnavailable(f"soci-snapshotter-grpc did not become ready:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        return memory_kb(self.pid)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, timeout=15)


# --------------------------------------------------------------------------------------------------------
# a node: containerd (+ daemon) that pulls and runs


@dataclass
class RunResult:
    """One pull-and-run. Times are seconds from the start of the pull."""

    mode: str  # "overlayfs" or "lazy"
    ref: str
    pull_s: float = 0.0
    first_output_s: float = 0.0
    done_s: float = 0.0
    exit_s: float = 0.0
    output: list[str] = field(default_factory=list)
    fetched: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)


class Node:
    """A fresh containerd in ``workdir`` (with the daemon as ``soci`` when ``lazy``) for pulls and runs.

    Args:
        workdir: everything (containerd root/state, daemon root) lives here; removed by :meth:`close`.
        registry_hosts: hosts the containerd config knows (plain http).
        lazy: start :class:`Daemon` with ``daemon_config`` and declare it as proxy snapshotter ``soci``.
        docker_config: Docker config directory for ``soci image rpull``'s credentials (lazy).
        user: ``user:password`` for ``ctr image pull`` (overlayfs); ``ctr`` reads no Docker config.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        registry_hosts: list[str],
        lazy: bool,
        daemon_config: str = "",
        docker_config: Path | None = None,
        user: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.lazy = lazy
        self.registry_hosts = registry_hosts
        self.docker_config = docker_config
        self.user = user
        self.daemon: Daemon | None = Daemon(self.workdir / "soci", daemon_config) if lazy else None
        self.containerd: Containerd | None = None
        self._runs = 0

    def start(self) -> Node:
        try:
            if self.lazy:
                why = rpull_missing()
                if why:
                    raise LazyUnavailable(why)
                assert self.daemon is not None
                self.daemon.start()
            self.containerd = Containerd(
                self.workdir / "containerd",
                registries=self.registry_hosts,
                proxy_socket=self.daemon.socket if self.daemon else None,
            ).start()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """containerd (and its shims), then the daemon, then leftover mounts; the work directory goes."""
        try:
            if self.containerd is not None:
                self.containerd.stop()
        finally:
            try:
                if self.daemon is not None:
                    self.daemon.stop()
            finally:
                cleanup_under(self.workdir)
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.docker_config is not None:
            env["DOCKER_CONFIG"] = str(self.docker_config)
        return env

    def pull(self, ref: str) -> None:
        """Pull ``ref`` (overlayfs: ``ctr image pull``; lazy: ``soci image rpull``)."""
        assert self.containerd is not None
        addr = self.containerd.address
        if self.lazy:
            assert self.daemon is not None
            argv = [
                str(SOCI),
                "--address",
                addr,
                "--namespace",
                "default",
                "--root",
                str(self.workdir / "cli"),
            ]
            argv += ["image", "rpull", "--plain-http", "--snapshotter", "soci"]
            argv += ["--config", str(self.daemon.config_path), ref]
        else:
            argv = [CTR_BIN, "--address", addr, "image", "pull", "--plain-http"]
            argv += ["--user", self.user] if self.user else []
            argv += [ref]
        try:
            _run(argv, env=self._env())
        except FailedPrecondition as exc:
            if self.lazy and self.daemon is not None:
                raise LazyUnavailable(f"{exc}\n--- daemon log tail:\n{self.daemon.log_tail()}") from exc
            raise

    def run(
        self,
        ref: str,
        t0: float,
        result: RunResult,
        timeout: float = RUN_TIMEOUT,
        on_line: Callable[[float, str], None] | None = None,
    ) -> None:
        """``ctr run --rm REF <id> /entrypoint.sh``; records the output lines and their times into ``result``
        and passes each to ``on_line(seconds since t0, line)`` as it arrives."""
        assert self.containerd is not None
        self._runs += 1
        cid = f"soci-pullrun-{os.getpid()}-{self._runs}"
        argv = [CTR_BIN, "--address", self.containerd.address, "run", "--rm"]
        argv += ["--snapshotter", "soci"] if self.lazy else []
        argv += [ref, cid, "/entrypoint.sh"]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        assert proc.stdout is not None and proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    raise Unavailable(f"container {cid}: no exit after {timeout:.0f} s")
                if not sel.select(timeout=0.5):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                now = time.perf_counter() - t0
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    if not result.output:
                        result.first_output_s = now
                    if text.startswith(DONE_PREFIX):
                        result.done_s = now
                    result.output.append(text)
                    if on_line is not None:
                        on_line(now, text)
            rc = proc.wait(timeout=60)
            result.exit_s = time.perf_counter() - t0
        finally:
            sel.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        if rc != 0 or not result.done_s:
            raise FailedPrecondition(
                f"container {cid} ({result.mode}) exit {rc}; output {result.output[-5:]!r}; "
                f"stderr {err[-2000:]!r}"
            )

    def pull_and_run(
        self,
        ref: str,
        registry: Registry | None = None,
        on_line: Callable[[float, str], None] | None = None,
    ) -> RunResult:
        """Time one pull + run of ``ref``; fetched bytes are read from ``registry``'s log."""
        result = RunResult("lazy" if self.lazy else "overlayfs", ref)
        offset = registry_window(registry) if registry is not None else 0
        t0 = time.perf_counter()
        self.pull(ref)
        result.pull_s = time.perf_counter() - t0
        self.run(ref, t0, result, on_line=on_line)
        if registry is not None:
            time.sleep(0.2)  # the registry logs a response after sending it
            result.fetched = fetched_since(registry, offset)
        if self.daemon is not None:
            result.memory = self.daemon.memory()
        return result


@contextlib.contextmanager
def node(workdir: Path, **kw: Any) -> Iterator[Node]:
    """``with node(dir, registry_hosts=[...], lazy=...) as n:`` a started :class:`Node`, closed on exit."""
    n = Node(workdir, **kw)
    n.start()
    try:
        yield n
    finally:
        n.close()


def one_run(
    workdir: Path, ref: str, registry: Registry, *, registry_host: str, lazy: bool, **kw: Any
) -> RunResult:
    """A fresh node (cold caches), one pull + run, the node removed."""
    with node(workdir, registry_hosts=[registry_host], lazy=lazy, **kw) as n:
        return n.pull_and_run(ref, registry)


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
