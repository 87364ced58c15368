"""The CRI keychain: credentials the kubelet sent with ``PullImage``, kept in memory for later fetches.

This module owns the store (:class:`CriCredentialStore`): ``record(image, auth)`` on every proxied
``PullImage``, ``remove(image)`` on ``RemoveImage``, and the ``Credential`` lookup. Entries are keyed by the
Docker-normalized image reference (``nginx`` → ``docker.io/library/nginx:latest``; the tag is dropped when
a digest is present). Beyond upstream (which matches the exact reference string only), a lookup that misses
the exact reference takes the newest entry for the same registry host and repository, so a digest pull or
another tag of a repository pulled with credentials still finds them.

Lookup rules:
* the entry must belong to the host asked for: its ``server_address`` host when set, else the image's own
  registry (Docker Hub aliases are one host). So credentials are never offered to a mirror or another
  registry. Upstream treats a ``server_address`` without a scheme as never matching; we parse it as
  ``host[:port]``.
* ``AuthConfig`` → credentials: ``username`` → (username, password); else ``identity_token``; else ``auth``
  (padded base64 of ``user:password``); else ``registry_token`` (a bearer token; upstream ignores it).
  ``auth`` is decoded at ``record`` time, so a bad value is refused there (``InvalidArgument`` naming the
  image) rather than on a later fetch.
* expiry: ``ttl`` (seconds after the pull, when configured) or a JWT ``exp`` in the token, whichever is
  sooner; it is reported in ``Credentials.expires_at``. Expired entries are still returned: the chain does
  not fall through on expired credentials (see ``chain.py``), and the registry decides.

Persistence across restarts is designed but not built: a :class:`CredentialPersister` given to the store
gets a snapshot after every change and is asked for entries once at start; the intended implementation is
a root-only 0600 file on ``/run`` (survives a daemon restart, not a reboot) holding each entry with its
expiry, wiped on ``remove``. Without one, everything lives in memory only.

It will not talk to containerd or the kubelet (``cri_proxy.py`` does, and calls this store). Thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from soci_fs.errors import InvalidArgument
from soci_fs.registry.credentials import Credentials
from soci_grpc.keychain.docker_config import RefName, canonical_host, jwt_expiry, split_reference
from soci_grpc.keychain.explain import Trace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuthConfig:
    """The fields of CRI ``runtime.v1.AuthConfig``. ``repr`` hides secrets."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @classmethod
    def from_message(cls, msg: Any) -> AuthConfig | None:
        """From a protobuf ``AuthConfig`` (or an object with those attributes, or a dict); None stays None."""
        if msg is None:
            return None
        if isinstance(msg, AuthConfig):
            return msg
        get = msg.get if isinstance(msg, dict) else (lambda k, d: getattr(msg, k, d))
        return cls(**{f: str(get(f, "") or "") for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CriEntry:
    """One recorded pull. ``credentials`` is None when the pull carried no usable auth."""

    ref: RefName
    server_host: str  # canonical host from server_address, "" when unset
    credentials: Credentials | None
    recorded_at: float
    seq: int

    @property
    def host(self) -> str:
        return self.server_host or canonical_host(self.ref.host)


class CredentialPersister(Protocol):
    """Where a persistent store would keep entries (designed, not implemented; see the module docstring)."""

    def load(self) -> Iterable[CriEntry]: ...

    def save(self, entries: tuple[CriEntry, ...]) -> None: ...


def credentials_from_auth(auth: AuthConfig, where: str) -> Credentials | None:
    """Decode an AuthConfig; ``InvalidArgument`` naming ``where`` for a bad ``auth`` value."""
    if auth.username:
        return Credentials(username=auth.username, password=auth.password, source=where)
    if auth.identity_token:
        return Credentials(identity_token=auth.identity_token, source=where)
    if auth.auth:
        try:
            raw = base64.b64decode(auth.auth.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"{where}: AuthConfig.auth is not base64 of user:password") from None
        user, sep, password = raw.partition(":")
        if not sep or not user:
            raise InvalidArgument(f"{where}: AuthConfig.auth does not decode to user:password")
        return Credentials(username=user, password=password.strip("\x00"), source=where)
    if auth.registry_token:
        return Credentials(registry_token=auth.registry_token, source=where)
    return None


def _server_host(address: str, where: str) -> str:
    a = address.strip()
    if not a:
        return ""
    if "://" in a:
        try:
            netloc = urlsplit(a).netloc
        except ValueError:
            raise InvalidArgument(f"{where}: AuthConfig.server_address is not a URL") from None
    else:
        netloc = a.split("/", 1)[0]
    if not netloc:
        raise InvalidArgument(f"{where}: AuthConfig.server_address names no host")
    return canonical_host(netloc)


class CriCredentialStore:
    """In-memory credentials from CRI ``PullImage`` requests; a ``Credential`` callable.

    Args:
        ttl: seconds after a pull at which its credentials are reported as expired (None: unknown).
        clock: time source (tests).
        persist: optional :class:`CredentialPersister` (see the module docstring).
    """

    name = "cri"

    def __init__(
        self,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        persist: CredentialPersister | None = None,
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._persist = persist
        self._lock = threading.Lock()
        self._entries: dict[str, CriEntry] = {}
        self._seq = itertools.count(1)
        self._hits = {"exact": 0, "repository": 0, "miss": 0}
        if persist is not None:
            for e in persist.load():
                self._entries[str(e.ref)] = e

    def record(self, image: str, auth: Any) -> None:
        """Remember ``auth`` (CRI AuthConfig; None: an anonymous pull) for ``image``, replacing its entry.

        Raises:
            InvalidArgument: ``image`` is not a reference, or ``auth`` has an undecodable ``auth`` or
                ``server_address`` (the message names the image, never a value).
        """
        ref = split_reference(image)
        where = f"cri:{ref}"
        cfg = AuthConfig.from_message(auth)
        now = self._clock()
        creds: Credentials | None = None
        server_host = ""
        if cfg is not None:
            server_host = _server_host(cfg.server_address, where)
            creds = credentials_from_auth(cfg, where)
        if creds is not None:
            expiries = [
                e
                for e in (
                    now + self._ttl if self._ttl is not None else None,
                    jwt_expiry(creds.identity_token or creds.registry_token or creds.password),
                )
                if e is not None
            ]
            if expiries:
                creds = Credentials(
                    username=creds.username,
                    password=creds.password,
                    identity_token=creds.identity_token,
                    registry_token=creds.registry_token,
                    source=creds.source,
                    expires_at=min(expiries),
                )
        entry = CriEntry(
            ref=ref, server_host=server_host, credentials=creds, recorded_at=now, seq=next(self._seq)
        )
        with self._lock:
            self._entries[str(ref)] = entry
            self._save_locked()
        log.debug("cri keychain: recorded %s (%s)", ref, "credentials" if creds else "no credentials")

    def remove(self, image: str) -> bool:
        """Forget ``image`` (``RemoveImage``); True when there was an entry."""
        try:
            key = str(split_reference(image))
        except InvalidArgument:
            return False
        with self._lock:
            found = self._entries.pop(key, None) is not None
            if found:
                self._save_locked()
        return found

    def _save_locked(self) -> None:
        if self._persist is not None:
            self._persist.save(tuple(self._entries.values()))

    def entries(self) -> tuple[CriEntry, ...]:
        with self._lock:
            return tuple(self._entries.values())

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), **self._hits}

    def __call__(self, host: str, ref: str) -> Credentials | None:
        return self.trace(host, ref).answer

    def trace(self, host: str, ref: str) -> Trace:
        want = canonical_host(host)
        try:
            name = split_reference(ref)
        except InvalidArgument:
            return Trace(steps=(f"reference {ref!r} cannot be parsed; no entry can match",))
        steps: list[str] = []
        with self._lock:
            exact = self._entries.get(str(name))
            same_repo = sorted(
                (
                    e
                    for e in self._entries.values()
                    if e.ref.repository == name.repository
                    and canonical_host(e.ref.host) == canonical_host(name.host)
                ),
                key=lambda e: -e.seq,
            )
        candidates = ([exact] if exact is not None else []) + [e for e in same_repo if e is not exact]
        for e in candidates:
            how = "exact reference" if e is exact else "same repository, newest pull"
            if e.host != want:
                steps.append(f"entry {e.ref} ({how}) is for host {e.host!r}, not {want!r}; skipped")
                continue
            if e.credentials is None:
                steps.append(f"entry {e.ref} ({how}) was pulled without credentials")
                if e is exact:
                    self._count("exact")
                    return Trace(steps=tuple(steps))
                continue
            steps.append(f"entry {e.ref} ({how}), recorded at {_stamp(e.recorded_at)}")
            self._count("exact" if e is exact else "repository")
            return Trace(answer=e.credentials, steps=tuple(steps))
        if not candidates:
            steps.append(f"no pull of {name.host}/{name.repository} recorded")
        self._count("miss")
        return Trace(steps=tuple(steps))

    def _count(self, what: str) -> None:
        with self._lock:
            self._hits[what] += 1


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
