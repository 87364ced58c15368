"""A Docker-registry token server for tests (distribution's ``auth: token`` mode).

Owns: an EC P-256 signing key with a self-signed certificate (the registry's ``rootcertbundle``), JWT
issuing (``kid`` = libtrust key id, or an ``x5c`` chain), the GET endpoint (Basic auth or anonymous) and the
OAuth2 POST endpoint (``password`` and ``refresh_token`` grants), per-grant counters, runtime password
rotation and a few injectable faults (an HTML answer, a status N times, a missing ``expires_in``, a POST
status that forces the GET fallback).

Expiry: distribution 2.8 accepts a token until ``exp`` + 60 s. With ``leeway_compensation`` (default) the
server writes ``exp = now + ttl - 60`` (and ``nbf`` 60 s in the past), so the registry stops accepting the
token ``ttl`` seconds after issue while ``expires_in`` still says ``ttl``. Expiry has whole-second
granularity: allow one second of slack in tests.

Will not: use TLS, persist anything, or enforce per-repository ACLs beyond ``deny``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LEEWAY = 60


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """libtrust's key id: base32 of the first 30 bytes of sha256(DER SubjectPublicKeyInfo), in groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@dataclass
class _Fault:
    status: int
    times: int
    body: bytes
    content_type: str


@dataclass
class TokenServerState:
    """Mutable settings, changed by tests at runtime (all access under ``lock``)."""

    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # identity token -> user
    ttl: int = 300
    leeway_compensation: bool = True
    omit_expires_in: bool = False
    allow_anonymous: bool = True
    anonymous_actions: tuple[str, ...] = ()
    post_status: int | None = None  # e.g. 405: POST refused, the client must fall back to GET
    deny: set[tuple[str, str]] = field(default_factory=set)  # (user, repository) pairs without access
    faults: list[_Fault] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    issued: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TokenServer:
    """``TokenServer(service, issuer)``; ``start()`` binds 127.0.0.1 on a free port and serves in a thread.

    ``realm`` is the token URL; ``cert_path`` the PEM the registry trusts. ``counts`` keys: ``get``,
    ``get_anonymous``, ``password``, ``refresh_token``, ``denied``, ``fault``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        service: str = "soci-test-registry",
        issuer: str = "soci-test-issuer",
        sign_mode: str = "kid",
        ttl: int = 300,
    ) -> None:
        self.workdir = Path(workdir)
        self.service = service
        self.issuer = issuer
        self.sign_mode = sign_mode
        self.state = TokenServerState(ttl=ttl)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "soci-test-token-signer")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )
        self.kid = libtrust_key_id(self._key.public_key())
        self.cert_path = self.workdir / "token.crt"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> TokenServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    # ---- test controls

    def set_password(self, user: str, password: str) -> None:
        """Add a user or rotate its password (old one stops working at once)."""
        with self.state.lock:
            self.state.users[user] = password

    def issue_identity_token(self, user: str) -> str:
        """An identity (refresh) token for ``user``, accepted by the refresh_token grant."""
        tok = secrets.token_urlsafe(24)
        with self.state.lock:
            self.state.refresh_tokens[tok] = user
        return tok

    def fail_next(
        self, status: int, times: int = 1, body: bytes = b"", content_type: str = "text/plain"
    ) -> None:
        with self.state.lock:
            self.state.faults.append(_Fault(status, times, body, content_type))

    def configure(self, **kw: Any) -> None:
        with self.state.lock:
            for k, v in kw.items():
                if not hasattr(self.state, k):
                    raise AttributeError(k)
                setattr(self.state, k, v)

    def reset(self) -> None:
        """Forget counters and faults (between tests); users and settings stay."""
        with self.state.lock:
            self.state.counts.clear()
            self.state.faults.clear()
            self.state.issued.clear()

    @property
    def counts(self) -> Counter[str]:
        with self.state.lock:
            return Counter(self.state.counts)

    def total_token_requests(self) -> int:
        c = self.counts
        return c["get"] + c["get_anonymous"] + c["password"] + c["refresh_token"]

    # ---- tokens

    def make_token(self, subject: str, scopes: list[str]) -> tuple[str, int]:
        st = self.state
        with st.lock:
            ttl, comp, deny = st.ttl, st.leeway_compensation, set(st.deny)
            anon_actions = st.anonymous_actions
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if subject == "":
                actions = [a for a in actions if a in anon_actions]
            if (subject, name) in deny:
                actions = []
            access.append({"type": typ, "name": name, "actions": actions})
        now = int(time.time())
        exp = now + ttl - (LEEWAY if comp else 0)
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": exp,
            "nbf": now - (LEEWAY if comp else 0) - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.sign_mode == "x5c":
            headers["x5c"] = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        else:
            headers["kid"] = self.kid
        token = jwt.encode(claims, self._key, algorithm="ES256", headers=headers)
        with st.lock:
            st.issued.append({"sub": subject, "scopes": scopes, "exp": exp, "token": token})
        return token, ttl


def _handler_for(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _fault(self) -> bool:
            with ts.state.lock:
                if not ts.state.faults:
                    return False
                f = ts.state.faults[0]
                f.times -= 1
                if f.times <= 0:
                    ts.state.faults.pop(0)
                ts.state.counts["fault"] += 1
            self._send(f.status, f.body, f.content_type)
            return True

        def _answer(self, subject: str, scopes: list[str], grant: str, oauth: bool) -> None:
            token, ttl = ts.make_token(subject, scopes)
            with ts.state.lock:
                ts.state.counts[grant] += 1
                omit = ts.state.omit_expires_in
            doc: dict[str, Any] = {"access_token": token, "issued_at": _now_iso()}
            if not oauth:
                doc["token"] = token
            if not omit:
                doc["expires_in"] = ttl
            self._send(200, json.dumps(doc).encode())

        def _deny(self) -> None:
            with ts.state.lock:
                ts.state.counts["denied"] += 1
            self._send(
                401, json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}).encode()
            )

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/token":
                self._send(404, b"{}")
                return
            if self._fault():
                return
            q = parse_qs(parts.query)
            scopes = [s for v in q.get("scope", []) for s in v.split(" ") if s]
            header = self.headers.get("Authorization", "")
            if header.startswith("Basic "):
                try:
                    user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                except ValueError:
                    self._deny()
                    return
                with ts.state.lock:
                    ok = ts.state.users.get(user) == pw and pw != ""
                    ok = ok or (ts.state.refresh_tokens.get(pw) is not None and user in ("", "<token>"))
                    if ok and user in ("", "<token>"):
                        user = ts.state.refresh_tokens[pw]
                if not ok:
                    self._deny()
                    return
                self._answer(user, scopes, "get", oauth=False)
                return
            with ts.state.lock:
                anon = ts.state.allow_anonymous
            if not anon:
                self._deny()
                return
            self._answer("", scopes, "get_anonymous", oauth=False)

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(length).decode()
            if parts.path != "/token":
                self._send(404, b"{}")
                return
            with ts.state.lock:
                post_status = ts.state.post_status
            if post_status is not None:
                self._send(post_status, b'{"error":"unsupported"}')
                return
            if self._fault():
                return
            form = {k: v[0] for k, v in parse_qs(body).items()}
            scopes = [s for s in form.get("scope", "").split(" ") if s]
            grant = form.get("grant_type", "")
            with ts.state.lock:
                if grant == "password":
                    user = form.get("username", "")
                    ok = ts.state.users.get(user) == form.get("password") and bool(form.get("password"))
                elif grant == "refresh_token":
                    user = ts.state.refresh_tokens.get(form.get("refresh_token", ""), "")
                    ok = bool(user)
                else:
                    ok, user = False, ""
            if not ok:
                self._deny()
                return
            self._answer(user, scopes, grant, oauth=True)

    return Handler


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
