"""systemd socket activation for ``--address fd://`` (snapshotter.md §1).

This module owns three things:

* :func:`listen_fds`: the file descriptors systemd passed, read the way sd_listen_fds(3) reads them:
  ``LISTEN_PID`` must equal this process's pid (otherwise nothing was passed *to us*), ``LISTEN_FDS`` counts
  the descriptors, which start at fd 3; each gets close-on-exec; ``LISTEN_PID``, ``LISTEN_FDS`` and
  ``LISTEN_FDNAMES`` are removed from the environment once read, so children do not inherit them.
* :func:`inherited_listener`: exactly one inherited listener is used. Zero → ``None`` (the caller falls back
  to the default path); more than one → :class:`InvalidArgument` with upstream's message; a descriptor that
  is not a listening ``AF_UNIX``/``SOCK_STREAM`` socket → :class:`InvalidArgument` naming the fd and what it
  is.
* :class:`Activation` (made by :func:`activate`) and :class:`Relay`: how the gRPC server serves on the
  inherited listener.

Why a relay. grpcio cannot serve on a listening socket it did not create: ``server.add_insecure_port``
takes addresses only (``unix:``, ``unix-abstract:``, host:port; checked with grpcio 1.85 — ``fd:3`` and
``fd://3`` fail to bind and ``unix:fd:3`` just binds a file called ``fd:3``), and the core call that adopts a
connected fd (``grpc_server_add_channel_from_fd``) is not exposed to Python. The alternatives were:

* closing the inherited socket, unlinking its path and letting gRPC bind the same path. Simple, but it
  breaks activation: systemd keeps its own copy of the listening socket, now unreachable by path, so after
  the first daemon restart nothing answers at the path and nothing triggers a new start; connections queued
  while the daemon started (the one that triggered it, typically containerd's) are lost.
* relaying (chosen): gRPC listens on a private socket (a fresh 0700 directory beside the public socket, so
  the public socket's mode, set by the socket unit, stays the only access control), and a relay thread
  accepts on the inherited listener and copies bytes both ways between each accepted connection and a
  connection to the private socket. The inherited listener is never closed for systemd, unlinked or
  shut down, so restarts and queued connections behave as systemd intends. The cost is one extra
  local hop and two threads per connection; containerd holds one long-lived connection per proxy plugin,
  and snapshotter messages are small.

Behind the relay, gRPC sees every client as the relay's own connection: a client's peer credentials
(``SO_PEERCRED``) are not available to the servicers; nothing in this project uses them.

This module will not: create public sockets (the non-activated path is the daemon's), parse
``LISTEN_FDNAMES``, accept other kinds of socket (TCP, datagram; an abstract unix listener is served, with
its private socket in the temporary directory), or look at the relayed bytes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import MutableMapping

from soci_fs.errors import InvalidArgument

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
"""The first descriptor systemd passes (sd_listen_fds(3))."""
FD_SCHEME = "fd://"
_ENV_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_CHUNK = 256 << 10
_ACCEPT_RETRY_S = 0.1  # after an accept error such as EMFILE: wait this long instead of spinning


def listen_fds(
    *, unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> list[int]:
    """The descriptors passed by systemd (3, 4, ...), with close-on-exec set; empty when none were passed.

    Args:
        unset_environment: remove ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` afterwards (also
            when they were meant for another process), as ``sd_listen_fds(1)`` does.
        environ: the environment to read (default ``os.environ``).

    Raises:
        InvalidArgument: ``LISTEN_PID`` or ``LISTEN_FDS`` is not a number, or a passed fd is not open.
    """
    env = os.environ if environ is None else environ
    try:
        pid_text = env.get("LISTEN_PID", "")
        if not pid_text:
            return []
        try:
            pid = int(pid_text)
        except ValueError as exc:
            raise InvalidArgument(f"socket activation: LISTEN_PID={pid_text!r} is not a process id") from exc
        if pid != os.getpid():
            log.debug("socket activation: LISTEN_PID=%d is not this process (%d)", pid, os.getpid())
            return []
        count_text = env.get("LISTEN_FDS", "")
        try:
            count = int(count_text)
        except ValueError as exc:
            raise InvalidArgument(f"socket activation: LISTEN_FDS={count_text!r} is not a number") from exc
        if count < 0:
            raise InvalidArgument(f"socket activation: LISTEN_FDS={count} is negative")
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError as exc:
                raise InvalidArgument(f"socket activation: passed fd {fd} is not open") from exc
        return fds
    finally:
        if unset_environment:
            for key in _ENV_KEYS:
                env.pop(key, None)


def _describe(sock: socket.socket) -> str:
    family = getattr(sock.family, "name", str(sock.family))
    kind = getattr(sock.type, "name", str(sock.type))
    return f"{family} {kind}"


def check_listener(fd: int) -> socket.socket:
    """Wrap ``fd`` as a socket object after checking it is a listening ``AF_UNIX`` stream socket.

    The returned object owns ``fd`` (closing it closes only this process's copy).

    Raises:
        InvalidArgument: the fd is not a socket, not a unix stream socket, or not listening.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise InvalidArgument(f"socket activation: fd {fd} is not open") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(
            f"socket activation: fd {fd} is not a socket (mode {stat.filemode(st.st_mode)})"
        )
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise InvalidArgument(
                f"socket activation: fd {fd} is a {_describe(sock)} socket, want AF_UNIX SOCK_STREAM "
                "(ListenStream=<path> in the socket unit)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise InvalidArgument(f"socket activation: fd {fd} is a unix socket that is not listening")
    except BaseException:
        sock.detach()  # leave the fd as it was; the caller decides
        raise
    return sock


def inherited_listener(*, environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The single listening unix socket systemd passed, or ``None`` when none was passed to this process.

    Raises:
        InvalidArgument: more than one descriptor was passed (``soci only supports a single systemd socket
            on activation``), or the one passed is not a listening unix stream socket.
    """
    fds = listen_fds(environ=environ)
    if not fds:
        return None
    if len(fds) > 1:
        raise InvalidArgument(
            f"soci only supports a single systemd socket on activation (got {len(fds)}: fds {fds})"
        )
    return check_listener(fds[0])


def socket_name(sock: socket.socket) -> str:
    """A printable name for a unix socket's bound address: its path, ``@name`` (abstract) or ``fd <n>``."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    if name.startswith("\0"):
        return "@" + name[1:]
    return name or f"fd {sock.fileno()}"


def _private_dir(public: str) -> str:
    """A fresh 0700 directory for the gRPC server's own socket: beside ``public`` when that is a path."""
    if public.startswith("/"):
        parent = os.path.dirname(public)
        if len(os.path.join(parent, ".grpc-xxxxxxxx", "grpc.sock")) <= _SUN_PATH_MAX:
            try:
                return tempfile.mkdtemp(prefix=".grpc-", dir=parent)
            except OSError as exc:
                log.debug(
                    "socket activation: no private directory in %s (%s); using %s",
                    parent,
                    exc,
                    tempfile.gettempdir(),
                )
    return tempfile.mkdtemp(prefix="soci-grpc-")


class _Pair:
    """One relayed connection: the accepted client socket and its connection to the gRPC server."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.open_directions = 2
        self.threads: list[threading.Thread] = []

    def abort(self) -> None:
        """Stop both directions: their blocked ``recv`` calls return at once."""
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class Relay:
    """Accepts on ``listener`` and copies bytes between each connection and one to the unix socket ``target``.

    One thread waits (``poll``) on the listener and a wake-up pipe; each accepted connection gets two
    threads, one per direction. End of stream in one direction is passed on as ``shutdown(SHUT_WR)``; an
    error in either direction ends both. The listener itself is never shut down or switched to
    non-blocking mode, because systemd shares it: :meth:`close` only closes this process's copy.
    A connection to ``target`` that fails is logged at WARNING and the client's connection is closed.
    """

    def __init__(self, listener: socket.socket, target: str) -> None:
        self._listener = listener
        self._target = target
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._closed = False
        self._accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="sockact-accept", daemon=True)

    def start(self) -> None:
        """Start accepting (connections queued before this are served too)."""
        self._thread.start()

    def statistics(self) -> dict[str, int]:
        """``accepted`` connections so far and ``open`` ones now."""
        with self._lock:
            return {"accepted": self._accepted, "open": len(self._pairs)}

    def close(self) -> None:
        """Stop accepting, end every relayed connection, and close this process's copy of the listener."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pairs = list(self._pairs)
        os.write(self._wake_w, b"x")
        if self._thread.ident is not None:
            self._thread.join()
        for pair in pairs:
            pair.abort()
        for pair in pairs:
            for t in pair.threads:
                t.join(timeout=5)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_r in ready:
                return
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait for resources rather than spin
                log.warning("socket activation: accept on %s failed: %s", socket_name(self._listener), exc)
                poller.poll(int(_ACCEPT_RETRY_S * 1000))  # returns early when close() wakes us
                continue
            self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            upstream.connect(self._target)
        except OSError as exc:
            log.warning("socket activation: cannot reach the gRPC server at %s: %s", self._target, exc)
            upstream.close()
            client.close()
            return
        pair = _Pair(client, upstream)
        with self._lock:
            if self._closed:
                upstream.close()
                client.close()
                return
            self._pairs.add(pair)
            self._accepted += 1
            n = self._accepted
        log.debug("socket activation: relaying connection %d to %s", n, self._target)
        for src, dst, name in ((client, upstream, "in"), (upstream, client, "out")):
            t = threading.Thread(
                target=self._pump, args=(pair, src, dst), name=f"sockact-{n}-{name}", daemon=True
            )
            pair.threads.append(t)
            t.start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF):
                log.debug("socket activation: relay error: %s", exc)
            pair.abort()
        with self._lock:
            pair.open_directions -= 1
            done = pair.open_directions == 0
            if done:
                self._pairs.discard(pair)
        if done:
            pair.client.close()
            pair.upstream.close()


class Activation:
    """What ``--address fd://`` resolved to, and the relay that serves an inherited listener.

    Attributes:
        address: the address to report: the inherited socket's path, or the fallback path.
        grpc_path: the unix socket path the gRPC server must bind (private when a listener was inherited,
            else the fallback path).
        listener: the inherited listener, or ``None`` when nothing was inherited.
    """

    def __init__(self, listener: socket.socket | None, fallback: str) -> None:
        self.listener = listener
        self._dir: str | None = None
        self._relay: Relay | None = None
        if listener is None:
            self.address = self.grpc_path = fallback
            return
        self.address = socket_name(listener)
        self._dir = _private_dir(self.address)
        self.grpc_path = os.path.join(self._dir, "grpc.sock")

    def start(self) -> None:
        """Start relaying the inherited listener to :attr:`grpc_path` (call once the server listens there)."""
        if self.listener is not None and self._relay is None:
            self._relay = Relay(self.listener, self.grpc_path)
            self._relay.start()

    def close(self) -> None:
        """Stop the relay, close this process's copy of the listener and remove the private directory."""
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        elif self.listener is not None:
            self.listener.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def activate(address: str, fallback: str) -> Activation | None:
    """Resolve ``--address``: ``None`` unless it starts with ``fd://``; then the :class:`Activation` to serve.

    As upstream, anything after ``fd://`` is ignored: the one socket systemd passed is used.

    With ``fd://`` and no listener passed to this process, logs a WARNING and falls back to ``fallback``.

    Raises:
        InvalidArgument: see :func:`inherited_listener`.
    """
    if not address.startswith(FD_SCHEME):
        return None
    listener = inherited_listener()
    if listener is None:
        log.warning(
            "address fd://: no socket was passed by systemd (LISTEN_PID/LISTEN_FDS unset or not for this "
            "process); listening on %s instead",
            fallback,
        )
    else:
        log.debug("socket activation: serving on the inherited %s", socket_name(listener))
    return Activation(listener, fallback)
