"""A real registry for tests: Debian's ``docker-registry`` as a child process, a fault proxy, helpers.

Owns:
* ``Registry``: writes a config into a temp dir, starts ``docker-registry serve`` on 127.0.0.1 with a free
  port (no auth, htpasswd with bcrypt, or token auth against ``TokenServer``), waits until ``/v2/`` answers,
  and stops it by PID (SIGTERM, then SIGKILL).
* ``FaultProxy``: an HTTP/1.1 proxy in front of a registry that injects faults per request: a status N times
  (with headers such as ``Retry-After``), a connection reset mid-body, ``Range`` ignored (full 200), a wrong
  ``Content-Range``, an ECR-style "token expired" 403, and redirects of blob GETs to a fake storage endpoint
  with expiring signed URLs (served from the registry's data directory; it records whether an
  ``Authorization`` header reached it).
* ``RawPusher``: pushes blobs and manifests with plain ``requests`` (no code under test involved).
* pytest fixtures: ``token_server``, ``htpasswd_registry``, ``token_registry`` (session-scoped, shared;
  tests must use their own repository names) and ``fault_proxy`` (a factory, function-scoped).

Will not: use TLS, or touch anything outside its temp dirs and loopback ports.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from tests.harness.procs import die_with_parent, stop_process
from tests.harness.token_server import TokenServer

REGISTRY_BIN = "/usr/bin/docker-registry"
USER = "soci"
PASSWORD = "s3cret-Passw0rd"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str:
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True)
    return out.stdout.strip() + "\n"


class Registry:
    """A ``docker-registry`` child process. ``auth`` is ``"none"``, ``"htpasswd"`` or ``"token"``."""

    def __init__(
        self,
        workdir: Path,
        *,
        auth: str = "none",
        users: dict[str, str] | None = None,
        token_server: TokenServer | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.auth = auth
        self.users = dict(users or {})
        self.token_server = token_server
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        alg, hexpart = digest.split(":", 1)
        return self.data_dir / "docker/registry/v2/blobs" / alg / hexpart[:2] / hexpart / "data"

    def set_password(self, user: str, password: str) -> None:
        """htpasswd mode: rewrite the file (the registry re-reads it when it changes)."""
        self.users[user] = password
        self._write_htpasswd()

    def _write_htpasswd(self) -> None:
        path = self.workdir / "htpasswd"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(htpasswd_line(u, p) for u, p in self.users.items()))
        os.replace(tmp, path)

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.data_dir}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.auth == "htpasswd":
            self._write_htpasswd()
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: soci-test",
                f"    path: {self.workdir / 'htpasswd'}",
            ]
        elif self.auth == "token":
            ts = self.token_server
            assert ts is not None, "token auth needs a TokenServer"
            lines += [
                "auth:",
                "  token:",
                f"    realm: {ts.realm}",
                f"    service: {ts.service}",
                f"    issuer: {ts.issuer}",
                f"    rootcertbundle: {ts.cert_path}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(3):
            self.port = free_port()
            cfg = self.workdir / "config.yml"
            cfg.write_text(self._config())
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            last = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"docker-registry did not start:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                r = requests.get(self.url + "/v2/", timeout=1)
                if r.status_code in (200, 401):
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)


# --------------------------------------------------------------------------------------------------------
# Pushing with plain requests


class RawPusher:
    """Push blobs and manifests with plain ``requests`` (independent of the code under test)."""

    def __init__(self, registry: Registry, user: str = USER, password: str = PASSWORD) -> None:
        self.registry = registry
        self.user = user
        self.password = password
        self.session = requests.Session()

    def _auth(self, repo: str) -> dict[str, str]:
        if self.registry.auth == "htpasswd":
            raw = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            return {"Authorization": "Basic " + raw}
        if self.registry.auth == "token":
            ts = self.registry.token_server
            assert ts is not None
            with ts.state.lock:
                counts = ts.state.counts.copy()
            token, _ = ts.make_token(self.user, [f"repository:{repo}:pull,push"])
            with ts.state.lock:  # tokens made here do not count as client requests
                ts.state.counts = counts
                ts.state.issued.pop()
            return {"Authorization": "Bearer " + token}
        return {}

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        h = self._auth(repo)
        base = self.registry.url
        r = self.session.post(f"{base}/v2/{repo}/blobs/uploads/", headers=h)
        assert r.status_code == 202, (r.status_code, r.text)
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = base + loc
        sep = "&" if "?" in loc else "?"
        r = self.session.put(
            loc + sep + urlencode({"digest": digest}),
            data=data,
            headers={**h, "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 201, (r.status_code, r.text)
        return digest

    def push_manifest(self, repo: str, ref: str, doc: dict[str, Any] | bytes, media_type: str) -> str:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        r = self.session.put(
            f"{self.registry.url}/v2/{repo}/manifests/{ref}",
            data=data,
            headers={**self._auth(repo), "Content-Type": media_type},
        )
        assert r.status_code == 201, (r.status_code, r.text)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def push_image(self, repo: str, tag: str, layers: list[bytes]) -> dict[str, Any]:
        """Push a minimal OCI image; returns {"manifest": digest, "layers": [...], "config": digest}."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
        cdig = self.push_blob(repo, config)
        ldigs = [self.push_blob(repo, layer) for layer in layers]
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdig,
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": len(b)}
                for d, b in zip(ldigs, layers, strict=True)
            ],
        }
        mdig = self.push_manifest(repo, tag, manifest, manifest["mediaType"])
        return {"manifest": mdig, "layers": ldigs, "config": cdig, "manifest_doc": manifest}


# --------------------------------------------------------------------------------------------------------
# Fault-injecting proxy

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_BLOB_GET = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")


@dataclass
class Fault:
    """One injected fault.

    ``kind``: ``status`` (answer ``status`` with ``headers``/``body``, not forwarded), ``reset`` (forward,
    send headers and half the body, then reset the connection), ``short`` (forward, send the full
    ``Content-Length`` but only a third of the body, then close the connection in order), ``ignore_range``
    (drop ``Range`` before forwarding), ``wrong_content_range`` (shift the ``Content-Range`` start by one),
    ``expired_403`` (an ECR-style 403 "token expired" without ``WWW-Authenticate``, only to requests
    carrying Authorization),
    ``redirect`` (blob GETs answered by a 307 to the proxy's storage endpoint, once the registry accepted
    the request). ``path`` is a regex searched in the request path; ``times`` < 0 means forever.
    """

    kind: str
    path: str = ""
    method: str | None = "GET"
    times: int = 1
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hits: int = 0


class FaultProxy:
    """HTTP/1.1 proxy to ``upstream`` (``host:port``) with programmable faults and a fake storage endpoint."""

    def __init__(self, upstream: Registry, *, storage_ttl: float = 60.0) -> None:
        self.upstream = upstream
        self.storage_ttl = storage_ttl
        self._secret = secrets.token_bytes(16)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.storage_log: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None
        self._local = threading.local()

    # ---- control

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, method: str, path: str, kinds: tuple[str, ...] | None = None) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.times == 0 or (f.method and f.method != method) or (kinds and f.kind not in kinds):
                    continue
                if f.path and not re.search(f.path, path):
                    continue
                if f.times > 0:
                    f.times -= 1
                f.hits += 1
                return f
        return None

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    # ---- storage

    def sign(self, digest: str, issued: float | None = None, ttl: float | None = None) -> str:
        issued = time.time() if issued is None else issued
        ttl = self.storage_ttl if ttl is None else ttl
        date = f"{issued:.3f}"
        sig = hmac.new(self._secret, f"{digest}|{date}|{ttl}".encode(), hashlib.sha256).hexdigest()
        q = urlencode({"X-Amz-Date": date, "X-Amz-Expires": str(ttl), "X-Amz-Signature": sig})
        port = self.host.rsplit(":", 1)[1]
        return f"http://localhost:{port}/_storage/{digest}?{q}"  # another host name for the same server

    def _check_signature(self, digest: str, q: dict[str, list[str]]) -> str:
        try:
            date, ttl, sig = q["X-Amz-Date"][0], q["X-Amz-Expires"][0], q["X-Amz-Signature"][0]
        except KeyError:
            return "missing signature"
        want = hmac.new(self._secret, f"{digest}|{date}|{ttl}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig):
            return "bad signature"
        if time.time() > float(date) + float(ttl):
            return "Request has expired"
        return ""

    def upstream_conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream.port, timeout=30)
            self._local.conn = conn
        return conn


def _proxy_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            length = str(len(body))
            for k, v in headers.items():
                if k.lower() == "content-length" and self.command == "HEAD":
                    length = v  # a HEAD answer has no body but tells the size (containerd resolves with it)
                elif k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, headers: dict[str, str], body: bytes | None) -> tuple[int, dict[str, str], bytes]:
            for attempt in range(2):
                conn = proxy.upstream_conn()
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    hdrs: dict[str, str] = {}
                    for k, v in resp.getheaders():
                        hdrs[k] = v if k not in hdrs else hdrs[k] + ", " + v
                    return resp.status, hdrs, data
                except (http.client.HTTPException, OSError):
                    conn.close()
                    proxy._local.conn = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        def _handle(self) -> None:
            path = urlsplit(self.path).path
            length = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(length) if length else None
            entry = {
                "method": self.command,
                "path": path,
                "auth": self.headers.get("Authorization", "").split(" ")[0],
                "range": self.headers.get("Range", ""),
            }
            with proxy._lock:
                proxy.log.append(entry)
            if path.startswith("/_storage/"):
                self._storage(path[len("/_storage/") :])
                return
            fault = proxy._take(self.command, path)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if fault is not None and fault.kind == "status":
                entry["fault"] = "status"
                self._reply(fault.status, fault.headers, fault.body)
                return
            if fault is not None and fault.kind == "expired_403":
                if not self.headers.get("Authorization"):
                    fault.times += 1 if fault.times >= 0 else 0
                else:
                    entry["fault"] = "expired_403"
                    msg = "Your authorization token has expired. Reauthenticate and try again."
                    body403 = json.dumps({"errors": [{"code": "DENIED", "message": msg}]}).encode()
                    self._reply(403, {"Content-Type": "application/json"}, body403)
                    return
            if fault is not None and fault.kind == "ignore_range":
                headers = {k: v for k, v in headers.items() if k.lower() != "range"}
            status, rh, data = self._forward(headers, body)
            if fault is not None:
                entry["fault"] = fault.kind
            if fault is not None and fault.kind == "redirect" and status in (200, 206):
                m = _BLOB_GET.match(path)
                if m:
                    self._reply(307, {"Location": proxy.sign(m.group(2))}, b"")
                    return
            if fault is not None and fault.kind == "wrong_content_range" and "Content-Range" in rh:
                m = re.match(r"bytes (\d+)-(\d+)/(\d+)", rh["Content-Range"])
                if m:
                    b, e, t = (int(x) for x in m.groups())
                    rh["Content-Range"] = f"bytes {b + 1}-{e + 1}/{t}"
            if fault is not None and fault.kind == "short":
                self.send_response(status)
                for k, v in rh.items():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 3])
                self.wfile.flush()
                self.close_connection = True  # an orderly close (FIN) after a third of the body
                return
            if fault is not None and fault.kind == "reset":
                self.send_response(status)
                for k, v in rh.items():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self._reply(status, rh, data)

        def _storage(self, rest: str) -> None:
            digest = rest.split("?")[0]
            q = parse_qs(urlsplit(self.path).query)
            rec = {"digest": digest, "authorization": self.headers.get("Authorization") is not None}
            with proxy._lock:
                proxy.storage_log.append(rec)
            problem = proxy._check_signature(digest, q)
            if problem:
                rec["status"] = 403
                xml = f"<Error><Code>AccessDenied</Code><Message>{problem}</Message></Error>".encode()
                self._reply(403, {"Content-Type": "application/xml"}, xml)
                return
            try:
                data = proxy.upstream.blob_path(digest).read_bytes()
            except OSError:
                rec["status"] = 404
                self._reply(
                    404, {"Content-Type": "application/xml"}, b"<Error><Code>NoSuchKey</Code></Error>"
                )
                return
            rng = self.headers.get("Range", "")
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            if m:
                b = int(m.group(1))
                e = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                rec["status"] = 206
                self._reply(
                    206,
                    {
                        "Content-Range": f"bytes {b}-{e}/{len(data)}",
                        "Content-Type": "application/octet-stream",
                    },
                    data[b : e + 1],
                )
                return
            rec["status"] = 200
            self._reply(200, {"Content-Type": "application/octet-stream"}, data)

        do_GET = _handle
        do_HEAD = _handle
        do_PUT = _handle
        do_POST = _handle
        do_PATCH = _handle
        do_DELETE = _handle

    return Handler


# --------------------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def harness_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="soci-registry-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def token_server(harness_dir: Path) -> Iterator[TokenServer]:
    ts = TokenServer(harness_dir / "token").start()
    ts.set_password(USER, PASSWORD)
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def htpasswd_registry(harness_dir: Path) -> Iterator[Registry]:
    reg = Registry(harness_dir / "reg-basic", auth="htpasswd", users={USER: PASSWORD}).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def token_registry(harness_dir: Path, token_server: TokenServer) -> Iterator[Registry]:
    reg = Registry(harness_dir / "reg-token", auth="token", token_server=token_server).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(registry, storage_ttl=...)`` starts a proxy; all are stopped at teardown."""
    started: list[FaultProxy] = []

    def make(registry: Registry, **kw: Any) -> FaultProxy:
        p = FaultProxy(registry, **kw).start()
        started.append(p)
        return p

    try:
        yield make
    finally:
        for p in started:
            p.stop()
