"""A rate-limited network namespace for benchmarks: a veth pair with a ``tbf`` qdisc on both ends.

Owns:

* :class:`NetNS`: creates a network namespace with a unique name, a veth pair (host end and namespace end)
  with addresses on a private /30 that overlaps no address or route of the host, brings both ends (and the
  namespace's ``lo``) up and puts ``tc qdisc ... tbf rate <rate>`` on both ends, so traffic in either
  direction is limited (netem is not in these kernels; tbf is). :meth:`NetNS.argv` prefixes a command with
  ``ip netns exec``, :meth:`NetNS.popen` starts one inside; :meth:`NetNS.counters` reads the host end's
  byte counters. :meth:`NetNS.close` (also on ``with`` exit and when :meth:`NetNS.start` fails half way)
  kills the processes still in the namespace (by PID, from ``ip netns pids``: only this object puts any
  there), deletes the namespace and the host end of the veth. Safe to call twice.
* :class:`TcpRelay`: a threaded TCP relay from a loopback port to an address in the namespace, so clients
  that treat only loopback registries as plain http (our daemon, upstream's) reach the registry through the
  limited link. It adds a copy per direction on the host, far below 100 Mbit/s in cost.

Traffic goes only between the host end and the namespace end of the veth: nothing is routed further.
Will not: touch any other interface, route, qdisc or namespace; need anything but ``ip`` and ``tc`` (root).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from soci_fs.errors import FailedPrecondition

log = logging.getLogger(__name__)

_counter = itertools.count()
# Candidate /30s, tried in order; the first that overlaps nothing on the host is used.
_CANDIDATES = [ipaddress.ip_network(f"10.{a}.{b}.0/30") for a in (231, 232, 233) for b in range(0, 256, 7)]


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise FailedPrecondition(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")
    return res


def _tc(*args: str, ns: str | None = None) -> None:
    argv = ["tc", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise FailedPrecondition(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")


def host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address in or a route to (all tables)."""
    nets: list[ipaddress.IPv4Network] = []
    for entry in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for a in entry.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for r in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    """The first candidate /30 that overlaps no host address or route, starting at one chosen by the PID (so
    two processes setting up at the same moment seldom pick the same one).

    Raises:
        FailedPrecondition: every candidate is taken.
    """
    used = host_networks()
    first = os.getpid() % len(_CANDIDATES)
    for cand in _CANDIDATES[first:] + _CANDIDATES[:first]:
        if not any(cand.overlaps(n) for n in used):
            return cand
    raise FailedPrecondition("network namespace: no free private /30 among the candidates")


class NetNS:
    """A network namespace joined to the host by a rate-limited veth pair.

    Args:
        rate: a tc rate (``100mbit``), applied to both directions.
        burst: the tbf bucket size.
        latency: the longest a packet may wait in the tbf queue (sets its queue length).
    """

    def __init__(self, rate: str = "100mbit", *, burst: str = "128kb", latency: str = "100ms") -> None:
        n = next(_counter)
        tag = f"{os.getpid() % 100000}{n:x}"
        self.name = f"soci-bench-{tag}"
        self.host_if = f"sbh{tag}"[:15]
        self.ns_if = f"sbn{tag}"[:15]
        self.rate, self.burst, self.latency = rate, burst, latency
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_ip = ""
        self.ns_ip = ""
        self._created = False

    def start(self) -> NetNS:
        """Create everything; on any failure, remove what was made and raise.

        Raises:
            FailedPrecondition: an ``ip`` or ``tc`` command failed (not root, no veth, no tbf).
        """
        try:
            self.subnet = pick_subnet()
            hosts = list(self.subnet.hosts())
            self.host_ip, self.ns_ip = str(hosts[0]), str(hosts[1])
            plen = self.subnet.prefixlen
            _ip("netns", "add", self.name)
            self._created = True
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/{plen}", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("addr", "add", f"{self.ns_ip}/{plen}", "dev", self.ns_if, ns=self.name)
            _ip("link", "set", self.ns_if, "up", ns=self.name)
            _ip("link", "set", "lo", "up", ns=self.name)
            tbf = ["root", "tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]
            _tc("qdisc", "add", "dev", self.host_if, *tbf)
            _tc("qdisc", "add", "dev", self.ns_if, *tbf, ns=self.name)
        except BaseException:
            self.close()
            raise
        log.info(
            "network namespace %s: %s <-> %s limited to %s", self.name, self.host_ip, self.ns_ip, self.rate
        )
        return self

    def __enter__(self) -> NetNS:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: the PID is the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace."""
        return subprocess.Popen(self.argv(argv), **kw)

    def counters(self) -> dict[str, int]:
        """Bytes and packets through the host end: ``rx_bytes`` came from the namespace."""
        base = Path("/sys/class/net") / self.host_if / "statistics"
        return {k: int((base / k).read_text()) for k in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}

    def pids(self) -> list[int]:
        res = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()] if res.returncode == 0 else []

    def close(self) -> None:
        """Kill what still runs inside (by PID), delete the namespace and the host end of the veth."""
        if self._created:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = self.pids()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + 5
                while pids and self.pids() and time.monotonic() < deadline:
                    time.sleep(0.05)
            _ip("netns", "delete", self.name, check=False)
            self._created = False
        # the host end goes with the namespace end, but not always at once; make sure
        if Path("/sys/class/net", self.host_if).exists():
            _ip("link", "delete", self.host_if, check=False)

    def exists(self) -> bool:
        """True while the namespace or the host end of the veth is there."""
        names = _ip("netns", "list", check=False).stdout.split()
        return self.name in names or Path("/sys/class/net", self.host_if).exists()


class TcpRelay:
    """Relay connections from ``127.0.0.1:<port>`` to ``target`` (one thread per direction).

    ``host`` is the loopback ``host:port`` clients use. Start with :meth:`start`, stop with :meth:`close`
    (closes the listener and every relayed connection).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        assert self._listener is not None
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> TcpRelay:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, name="tcp-relay", daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError as exc:
                log.info("relay to %s:%d: %s", *self.target, exc)
                client.close()
                continue
            for c in (client, upstream):
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pair, args=(client, upstream), daemon=True).start()

    def _pair(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()
        with self._lock:
            self._conns -= {client, upstream}
        for c in (client, upstream):
            c.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the relay thread
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:  # wakes both pumps of each pair; the pair's thread closes the sockets
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
