"""A small Kubernetes API server for tests: Secrets only, list and watch, protocol-faithful.

Owns: an HTTP/1.1 server on 127.0.0.1 (free port) speaking the parts of the core/v1 API the kubeconfig
keychain uses, so tests drive it with the real ``kubernetes`` client:

* ``GET /api/v1/secrets`` and ``GET /api/v1/namespaces/<ns>/secrets``: a ``SecretList`` whose
  ``metadata.resourceVersion`` is the current version; ``fieldSelector`` (``type``, ``metadata.name``,
  ``metadata.namespace``; ``=``, ``==``, ``!=``) and ``labelSelector`` (``k=v``, ``k!=v``, ``k``, ``!k``,
  ``k in (a,b)``, ``k notin (a,b)``) filter it.
* ``?watch=true&resourceVersion=N``: a chunked stream of JSON lines: ADDED/MODIFIED/DELETED for changes
  after N (a change that makes an object start or stop matching the selectors becomes ADDED or DELETED, as
  the real server does), BOOKMARK when asked (``allowWatchBookmarks=true`` and :meth:`send_bookmark`), and an
  ``ERROR`` event carrying a ``Status`` with code 410 when N is older than the compaction point
  (:meth:`expire_watches`). ``timeoutSeconds`` ends the stream cleanly.
* bearer-token authentication (401 ``Status`` otherwise).

Test controls: :meth:`put_secret` (add or modify), :meth:`delete_secret`, :meth:`expire_watches`,
:meth:`drop_connections` (abrupt close mid-stream), :meth:`end_watches` (clean end), :meth:`hold_lists` /
:meth:`release_lists` (a gap before a re-list), :meth:`hold_watches` / :meth:`release_watches` and
:meth:`compact` (a watch from a compacted version), :meth:`send_bookmark`, :meth:`write_kubeconfig`, and
counters/waits so tests need no sleeps. :meth:`stop` closes every connection and joins every thread.

It will not implement anything else of the API (other kinds, writes over HTTP, pagination, TLS).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"


def dockerconfigjson(auths: dict[str, dict[str, str]]) -> bytes:
    """``.dockerconfigjson`` bytes for ``{"auths": auths}``."""
    return json.dumps({"auths": auths}).encode()


def basic_auth(user: str, password: str) -> dict[str, str]:
    """An ``auths`` entry with the ``auth`` field."""
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---------------------------------------------------------------------------------------------- selectors


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return [p.strip() for p in out if p.strip()]


_SET_RE = re.compile(r"^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$")


def label_matches(selector: str, labels: dict[str, str]) -> bool:
    for req in _split_top(selector):
        m = _SET_RE.match(req)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in" and labels.get(key) not in vals:
                return False
            if op == "notin" and key in labels and labels[key] in vals:
                return False
        elif "!=" in req:
            k, v = (s.strip() for s in req.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in req:
            k, v = (s.strip() for s in req.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif req.startswith("!"):
            if req[1:].strip() in labels:
                return False
        elif req not in labels:
            return False
    return True


def field_matches(selector: str, obj: dict[str, Any]) -> bool:
    fields = {
        "type": obj.get("type", ""),
        "metadata.name": obj["metadata"]["name"],
        "metadata.namespace": obj["metadata"]["namespace"],
    }
    for req in _split_top(selector):
        neg = "!=" in req
        k, v = (s.strip() for s in req.replace("!=", "=").replace("==", "=").split("=", 1))
        if k not in fields:
            raise ValueError(f'"{k}" is not a known field selector')
        if (fields[k] == v) == neg:
            return False
    return True


# ---------------------------------------------------------------------------------------------- state


@dataclass
class _Event:
    rv: int
    type: str  # ADDED / MODIFIED / DELETED
    old: dict[str, Any] | None
    new: dict[str, Any] | None


@dataclass(eq=False)
class _Watcher:
    namespace: str
    field_selector: str
    label_selector: str
    bookmarks: bool
    sock: socket.socket
    drop: bool = False
    expire: bool = False
    end: bool = False
    bookmark_rvs: list[int] = field(default_factory=list)


class KubeAPIServer:
    """See the module docstring. Use as a context manager or call :meth:`start`/:meth:`stop`."""

    def __init__(self, *, token: str = "kube-test-token") -> None:
        self.token = token
        self._cond = threading.Condition()
        self._rv = 100
        self._compacted = 0  # watches from a version below this get 410
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._events: list[_Event] = []
        self._watchers: list[_Watcher] = []
        self._stopping = False
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lists_open = threading.Event()
        self._lists_open.set()
        self._watches_open = threading.Event()
        self._watches_open.set()
        self.lists = 0
        self.watches = 0
        self.requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> KubeAPIServer:
        owner = self

        class Handler(_Handler):
            api = owner

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request: Any, client_address: Any) -> None:
                t = threading.Thread(target=self.process_request_thread, args=(request, client_address))
                t.daemon = True
                with owner._cond:
                    owner._conns.add(request)
                    owner._threads.add(t)
                t.start()

            def shutdown_request(self, request: Any) -> None:
                with owner._cond:
                    owner._conns.discard(request)
                super().shutdown_request(request)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}
        )
        self._serve_thread.daemon = True
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        self._lists_open.set()
        self._watches_open.set()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            conns = list(self._conns)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._cond:
            threads = list(self._threads)
        for t in threads:
            t.join(5)
        if self._serve_thread is not None:
            self._serve_thread.join(5)

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: str | Path, *, token: str | None = None) -> Path:
        """A kubeconfig (JSON, which is YAML) pointing at this server with a bearer token."""
        path = Path(path)
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": token or self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(doc))
        return path

    # ------------------------------------------------------------------------------------ controls

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def put_secret(
        self,
        namespace: str,
        name: str,
        data: bytes | dict[str, Any],
        *,
        type: str = DOCKERCONFIGJSON,
        labels: dict[str, str] | None = None,
        raw_data: dict[str, str] | None = None,
    ) -> int:
        """Add or replace a secret. ``data``: the ``.dockerconfigjson`` bytes (or a dict to JSON-encode);
        ``raw_data`` replaces the whole ``data`` map (already base64). Returns the new resource version."""
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        with self._cond:
            self._rv += 1
            obj = {
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "resourceVersion": str(self._rv),
                    "uid": f"uid-{namespace}-{name}",
                    "labels": dict(labels or {}),
                },
                "type": type,
                "data": raw_data
                if raw_data is not None
                else {".dockerconfigjson": base64.b64encode(data).decode()},
            }
            old = self._objects.get((namespace, name))
            self._objects[(namespace, name)] = obj
            self._events.append(_Event(self._rv, "MODIFIED" if old else "ADDED", old, obj))
            self._cond.notify_all()
            return self._rv

    def delete_secret(self, namespace: str, name: str) -> int:
        with self._cond:
            old = self._objects.pop((namespace, name))
            self._rv += 1
            gone = json.loads(json.dumps(old))
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append(_Event(self._rv, "DELETED", old, gone))
            self._cond.notify_all()
            return self._rv

    def expire_watches(self) -> None:
        """Compact history: every open watch gets an ERROR 410 event, and so does any watch from an older
        resource version."""
        with self._cond:
            self._compacted = self._rv
            for w in self._watchers:
                w.expire = True
            self._cond.notify_all()

    def drop_connections(self) -> None:
        """Close every open watch stream abruptly (no terminating chunk)."""
        with self._cond:
            for w in self._watchers:
                w.drop = True
            self._cond.notify_all()

    def end_watches(self) -> None:
        """End every open watch cleanly (terminating chunk), as the server does at ``timeoutSeconds``."""
        with self._cond:
            for w in self._watchers:
                w.end = True
            self._cond.notify_all()

    def hold_lists(self) -> None:
        """Make list requests wait until :meth:`release_lists` (to create a gap between watch and re-list)."""
        self._lists_open.clear()

    def release_lists(self) -> None:
        self._lists_open.set()

    def hold_watches(self) -> None:
        """Make new watch requests wait until :meth:`release_watches` (before their version is checked)."""
        self._watches_open.clear()

    def release_watches(self) -> None:
        self._watches_open.set()

    def compact(self) -> None:
        """Forget history up to now: later watches from an older version get ERROR 410."""
        with self._cond:
            self._compacted = self._rv

    def send_bookmark(self) -> int:
        """Advance the resource version without a change and send a BOOKMARK to watches that allow it."""
        with self._cond:
            self._rv += 1
            for w in self._watchers:
                if w.bookmarks:
                    w.bookmark_rvs.append(self._rv)
            self._cond.notify_all()
            return self._rv

    def open_watches(self) -> int:
        with self._cond:
            return len(self._watchers)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (polling briefly) until ``predicate()``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("kube API harness: condition not reached in time")
            time.sleep(0.01)

    # ------------------------------------------------------------------------------------ serving

    def _list(self, namespace: str, fsel: str, lsel: str) -> dict[str, Any]:
        with self._cond:
            items = [
                o
                for (ns, _), o in sorted(self._objects.items())
                if (not namespace or ns == namespace) and self._matches(o, fsel, lsel)
            ]
            return {
                "kind": "SecretList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    @staticmethod
    def _matches(obj: dict[str, Any] | None, fsel: str, lsel: str) -> bool:
        if obj is None:
            return False
        return field_matches(fsel, obj) and label_matches(lsel, obj["metadata"].get("labels") or {})

    def _translate(self, ev: _Event, w: _Watcher) -> dict[str, Any] | None:
        def in_scope(o: dict[str, Any] | None) -> bool:
            return (
                o is not None
                and (not w.namespace or o["metadata"]["namespace"] == w.namespace)
                and self._matches(o, w.field_selector, w.label_selector)
            )

        was, now = in_scope(ev.old), in_scope(ev.new)
        if ev.type == "DELETED":
            return {"type": "DELETED", "object": ev.new} if was else None
        if was and now:
            return {"type": "MODIFIED", "object": ev.new}
        if now:
            return {"type": "ADDED", "object": ev.new}
        if was:
            return {"type": "DELETED", "object": ev.new}
        return None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class _Handler(BaseHTTPRequestHandler):
    api: KubeAPIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        api = self.api
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with api._cond:
            api.requests.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            self._json(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        m = re.fullmatch(r"/api/v1/(?:namespaces/([^/]+)/)?secrets", parts.path)
        if not m:
            self._json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return
        namespace = m.group(1) or ""
        fsel, lsel = q.get("fieldSelector", ""), q.get("labelSelector", "")
        try:
            field_matches(fsel, {"type": "", "metadata": {"name": "", "namespace": ""}})
        except ValueError as exc:
            self._json(400, _status(400, "BadRequest", str(exc)))
            return
        if q.get("watch") in ("true", "1"):
            while not api._watches_open.wait(0.05):
                if api._stopping:
                    return
            self._watch(namespace, fsel, lsel, q)
            return
        while not api._lists_open.wait(0.05):
            if api._stopping:
                return
        with api._cond:
            api.lists += 1
        self._json(200, api._list(namespace, fsel, lsel))

    def _chunk(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, namespace: str, fsel: str, lsel: str, q: dict[str, str]) -> None:
        api = self.api
        rv = int(q.get("resourceVersion") or 0)
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        w = _Watcher(namespace, fsel, lsel, q.get("allowWatchBookmarks") == "true", self.connection)
        with api._cond:
            api.watches += 1
            if rv and rv < api._compacted:
                expired = True
            else:
                expired = False
                api._watchers.append(w)
            cursor = next((i for i, e in enumerate(api._events) if e.rv > rv), len(api._events))
        try:
            if expired:
                self._chunk(
                    {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {rv}")}
                )
                self._end()
                return
            while True:
                with api._cond:
                    while (
                        cursor >= len(api._events)
                        and not (w.drop or w.expire or w.end or w.bookmark_rvs or api._stopping)
                        and time.monotonic() < deadline
                    ):
                        api._cond.wait(max(0.0, min(0.5, deadline - time.monotonic())))
                    pending = api._events[cursor:]
                    cursor = len(api._events)
                    marks, w.bookmark_rvs = w.bookmark_rvs, []
                    drop, expire, end, stopping = w.drop, w.expire, w.end, api._stopping
                if drop or stopping:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                for ev in pending:
                    out = api._translate(ev, w)
                    if out is not None:
                        self._chunk(out)
                for mark in marks:
                    self._chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": "Secret",
                                "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(mark)},
                            },
                        }
                    )
                if expire:
                    self._chunk(
                        {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
                    )
                    self._end()
                    return
                if end or time.monotonic() >= deadline:
                    self._end()
                    return
        except OSError:
            self.close_connection = True
        finally:
            with api._cond:
                api._watchers = [x for x in api._watchers if x is not w]

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
