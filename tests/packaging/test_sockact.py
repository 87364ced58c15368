"""systemd socket activation (``soci_grpc.sockact``): sd_listen_fds rules, the checks, the relay, the daemon.

Processes that inherit a socket are started by ``systemd-socket-activate`` (systemd's own tool): it listens,
waits for the first connection and then execs the program with the socket as fd 3 and ``LISTEN_PID`` set
to the program's own pid, as systemd does. The last test runs the real daemon that way and needs
``sockact`` wired into ``soci_grpc/cli/daemon.py``'s ``_serve``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from soci_fs.errors import InvalidArgument
from soci_grpc import sockact
from soci_grpc._proto.soci import snapshots_pb2, snapshots_pb2_grpc
from tests.harness.procs import die_with_parent, stop_process

REPO = Path(__file__).resolve().parents[2]
DAEMON = REPO / ".venv" / "bin" / "soci-snapshotter-grpc"
ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate (systemd) is not installed"
)

CHILD = """
import fcntl, json, os, sys
from soci_fs.errors import SociError
from soci_grpc import sockact
out = {"pid": os.getpid(), "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS")}}
try:
    s = sockact.inherited_listener()
    if s is None:
        out["listener"] = None
    else:
        flags = fcntl.fcntl(s.fileno(), fcntl.F_GETFD)
        cloexec = bool(flags & fcntl.FD_CLOEXEC)
        out["listener"] = {"fd": s.fileno(), "name": sockact.socket_name(s), "cloexec": cloexec}
        conn, _ = s.accept()
        conn.sendall(b"hello from the inherited socket")
        conn.close()
except SociError as exc:
    out["error"] = str(exc)
out["env_after"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""

SERVER = """
import signal, sys, threading
from concurrent import futures
import grpc
from soci_grpc import service, sockact
from soci_grpc.snapshotter import Snapshotter
act = sockact.activate("fd://", sys.argv[2])
server = grpc.server(futures.ThreadPoolExecutor(4))
core = Snapshotter(sys.argv[1])
service.add_to_server(core, server)
assert server.add_insecure_port("unix:" + act.grpc_path) == 1
server.start()
act.start()
print("serving", act.address, act.grpc_path, flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop(1).wait()
act.close()
core.close()
print("stopped", flush=True)
"""


def _env_args() -> list[str]:
    """systemd-socket-activate passes a minimal environment: forward the suite's mode explicitly."""
    return ["-E", "SOCI_PUREPYTHON"] if "SOCI_PUREPYTHON" in os.environ else []


@dataclass
class Activated:
    proc: subprocess.Popen[str]
    stderr: Path

    def err(self) -> str:
        return self.stderr.read_text()


@contextlib.contextmanager
def activated(listen: list[Path], *cmd: str | os.PathLike[str]) -> Iterator[Activated]:
    """``systemd-socket-activate -l <path>... cmd``, once its sockets listen; its stderr goes to a file."""
    args = [ACTIVATE or "systemd-socket-activate"]
    for path in listen:
        args += ["-l", str(path)]
    err = listen[0].with_name(listen[0].name + ".stderr")
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [*args, *_env_args(), *map(str, cmd)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            preexec_fn=die_with_parent,
        )
    try:
        deadline = time.monotonic() + 60
        while not all(p.exists() for p in listen):  # it binds, then prints "Listening on <path> as <fd>."
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.02)
        yield Activated(proc, err)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(path))
    return s


def _recv_all(s: socket.socket) -> bytes:
    chunks = []
    while data := s.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def _list(path: Path | str) -> list[snapshots_pb2.ListReply]:
    with grpc.insecure_channel(f"unix:{path}") as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        req = snapshots_pb2.ListRequest(snapshotter="soci")
        return list(stub.List(req, metadata=[("containerd-namespace", "default")], timeout=60))


# -- sd_listen_fds rules, in-process on a given environment -------------------------------------------


def test_nothing_passed_or_passed_to_another_process() -> None:
    assert sockact.listen_fds(environ={}) == []
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert sockact.listen_fds(environ=env) == []
    assert env == {}, "the variables are removed even when they were meant for another process"
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert sockact.listen_fds(environ=env, unset_environment=False) == [] and len(env) == 2


def test_zero_fds_for_us() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert sockact.listen_fds(environ=env) == [] and env == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID='me' is not a process id"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "one"}, "LISTEN_FDS='one' is not a number"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": ""}, "LISTEN_FDS='' is not a number"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"}, "LISTEN_FDS=-1 is negative"),
    ],
)
def test_malformed_variables(env: dict[str, str], message: str) -> None:
    env = {k: v.replace("{pid}", str(os.getpid())) for k, v in env.items()}
    with pytest.raises(InvalidArgument, match="socket activation: " + message.replace("(", r"\(")):
        sockact.listen_fds(environ=env)
    assert env == {}


def test_not_an_fd_activation_address() -> None:
    for address in ("/run/x.sock", "unix:///run/x.sock", "x"):
        assert sockact.activate(address, "/unused") is None


@pytest.mark.expect_log
def test_fd_address_without_a_passed_socket_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    act = sockact.activate("fd://", str(tmp_path / "default.sock"))
    assert act is not None and act.listener is None
    assert act.address == act.grpc_path == str(tmp_path / "default.sock")
    act.start()
    act.close()  # nothing to stop, nothing removed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no socket was passed by systemd" in warnings[0].getMessage()
    assert str(tmp_path / "default.sock") in warnings[0].getMessage()


# -- what the inherited descriptor must be --------------------------------------------------------------


def test_check_listener_accepts_a_listening_unix_stream_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "l.sock"))
        s.listen()
        checked = sockact.check_listener(s.fileno())
        assert sockact.socket_name(checked) == str(tmp_path / "l.sock")
        checked.detach()  # s owns the fd


@pytest.mark.parametrize("kind", ["pipe", "udp", "tcp-listening", "unix-dgram", "unix-not-listening"])
def test_check_listener_refuses_other_descriptors(kind: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "pipe":
            r, w = os.pipe()
            stack.callback(os.close, r)
            stack.callback(os.close, w)
            fd, want = r, "is not a socket"
        else:
            family = socket.AF_UNIX if kind.startswith("unix") else socket.AF_INET
            stype = socket.SOCK_DGRAM if kind in ("udp", "unix-dgram") else socket.SOCK_STREAM
            s = stack.enter_context(socket.socket(family, stype))
            s.bind(str(tmp_path / "s.sock") if family == socket.AF_UNIX else ("127.0.0.1", 0))
            if kind == "tcp-listening":
                s.listen()
            fd = s.fileno()
            kinds = {"udp": "AF_INET SOCK_DGRAM", "tcp-listening": "AF_INET SOCK_STREAM"}
            kinds["unix-dgram"] = "AF_UNIX SOCK_DGRAM"
            want = "is a unix socket that is not listening"
            if kind in kinds:
                want = f"is a {kinds[kind]} socket, want AF_UNIX SOCK_STREAM"
        with pytest.raises(InvalidArgument, match=f"socket activation: fd {fd} {want}"):
            sockact.check_listener(fd)
        os.fstat(fd)  # still open: a refused descriptor is left alone


# -- the relay, in-process -----------------------------------------------------------------------------


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[Path]:
    """A unix stream server that echoes each connection and then, on end of input, says ``bye``."""
    path = tmp_path / "echo.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    done = threading.Event()

    def handle(c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):  # the relay may end the connection first
            while data := c.recv(65536):
                c.sendall(data)
            c.sendall(b"bye")

    def loop() -> None:
        while not done.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield path
    finally:
        done.set()
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        t.join(5)


def test_relay_copies_both_ways_and_passes_on_half_close(tmp_path: Path, echo_server: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "pub.sock"))
    listener.listen()
    queued = _connect(tmp_path / "pub.sock")  # before the relay runs: waits in the queue
    relay = sockact.Relay(listener, str(echo_server))
    relay.start()
    try:
        big = os.urandom(3 << 20)
        clients = [queued, _connect(tmp_path / "pub.sock")]
        for c in clients:
            sender = threading.Thread(target=lambda c=c: (c.sendall(big), c.shutdown(socket.SHUT_WR)))
            sender.start()
            assert _recv_all(c) == big + b"bye"
            sender.join()
            c.close()
        assert relay.statistics()["accepted"] == 2
    finally:
        relay.close()
    assert listener.fileno() == -1  # our copy closed


def test_relay_close_ends_open_connections_but_not_the_shared_listener(
    tmp_path: Path, echo_server: Path
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "pub.sock"))
    listener.listen()
    systemds_copy = socket.socket(fileno=os.dup(listener.fileno()))  # what systemd keeps
    relay = sockact.Relay(listener, str(echo_server))
    relay.start()
    try:
        c = _connect(tmp_path / "pub.sock")
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        assert relay.statistics() == {"accepted": 1, "open": 1}
    finally:
        relay.close()
    assert _recv_all(c) == b"", "the relayed connection was ended"
    c.close()
    # the listening socket still works for the next daemon: a new connection queues and is accepted
    with systemds_copy, _connect(tmp_path / "pub.sock"):
        systemds_copy.settimeout(10)
        conn, _ = systemds_copy.accept()
        conn.close()


@pytest.mark.expect_log
def test_relay_with_no_server_behind_it_closes_the_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "pub.sock"))
    listener.listen()
    relay = sockact.Relay(listener, str(tmp_path / "nobody.sock"))
    relay.start()
    try:
        with _connect(tmp_path / "pub.sock") as c:
            assert _recv_all(c) == b""
    finally:
        relay.close()
    assert any("cannot reach the gRPC server" in r.getMessage() for r in caplog.records)


# -- real socket activation (systemd-socket-activate) ----------------------------------------------------


@needs_activate
def test_inherited_socket_from_systemd_socket_activate(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    pub, report = tmp_path / "pub.sock", tmp_path / "report.json"
    with activated([pub], sys.executable, child, report) as a:
        with _connect(pub) as c:  # starts the child; this connection was queued before it ran
            assert _recv_all(c) == b"hello from the inherited socket"
        assert a.proc.wait(timeout=60) == 0, a.err()
    out = json.loads(report.read_text())
    assert out["env"] == {"LISTEN_PID": str(out["pid"]), "LISTEN_FDS": "1"}
    assert out["listener"] == {"fd": 3, "name": str(pub), "cloexec": True}
    assert out["env_after"] == []


@needs_activate
def test_more_than_one_inherited_socket_is_fatal(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    report = tmp_path / "report.json"
    listen = [tmp_path / "a.sock", tmp_path / "b.sock"]
    with activated(listen, sys.executable, child, report) as a, _connect(tmp_path / "a.sock"):
        assert a.proc.wait(timeout=60) == 0, a.err()
    out = json.loads(report.read_text())
    assert out["error"].startswith("soci only supports a single systemd socket on activation (got 2")


@needs_activate
def test_grpc_served_through_the_inherited_socket(tmp_path: Path) -> None:
    """The snapshots service behind an Activation; the first call is the one that triggers the start."""
    server = tmp_path / "server.py"
    server.write_text(SERVER)
    pub = tmp_path / "pub.sock"
    with activated([pub], sys.executable, server, tmp_path / "root", tmp_path / "fallback.sock") as a:
        proc = a.proc
        assert _list(pub) == []
        assert proc.stdout is not None
        serving = proc.stdout.readline().split()
        assert serving[:2] == ["serving", str(pub)]
        private = Path(serving[2])
        assert private.parent.parent == tmp_path and private.parent.stat().st_mode & 0o777 == 0o700
        assert _list(pub) == []  # a second connection
        proc.terminate()
        assert proc.wait(timeout=30) == 0, a.err()
        assert proc.stdout.readline().strip() == "stopped"
    assert not private.parent.exists(), "the private socket directory is removed"
    assert not (tmp_path / "fallback.sock").exists()


@needs_activate
def test_daemon_serves_on_the_inherited_socket(tmp_path: Path) -> None:
    """NEEDS the sockact wiring in soci_grpc/cli/daemon.py ``_serve`` (see the packaging report)."""
    config = tmp_path / "config.toml"
    config.write_text("")
    pub, root = tmp_path / "pub.sock", tmp_path / "root"
    cmd = [DAEMON, "--address", "fd://", "--root", root, "--config", config, "--log-level", "debug"]
    with activated([pub], *cmd) as a:
        assert _list(pub) == []
        a.proc.terminate()
        assert a.proc.wait(timeout=60) == 0, a.err()
        err = a.err()
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    started = [r for r in logs if r["msg"] == "soci-snapshotter-grpc successfully started"]
    assert len(started) == 1 and started[0]["address"] == str(pub), err
    assert any(r["msg"].startswith("socket activation: relaying connection 1") for r in logs), err
    assert not [r for r in logs if r["level"] in ("warning", "error", "fatal")], err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".grpc-")] == []
