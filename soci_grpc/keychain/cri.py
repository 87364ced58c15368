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

Persistence across restarts (``[cri_keychain] persist``): a :class:`CredentialPersister` given to the store
is asked for entries once at start and gets a snapshot after every change (``record``/``remove``). The
daemon's persister is :class:`CredentialFile`, a root-only file on ``/run`` (survives a daemon restart, not a
reboot):

* written atomically on every change: a new file (0600, ``O_EXCL``) beside the target, ``fsync``, rename
  over the target, ``fsync`` of the directory (created 0700 when missing). A failure to write is logged
  (WARNING, naming the file and the cause) and the store carries on in memory;
* each entry is kept with its expiry (``credential_ttl_sec`` after the pull, or a JWT ``exp``); at start
  entries past their expiry (by the expiry stored, or by the TTL configured now) are dropped;
* loaded only if it is a regular file (not a symlink) owned by the daemon's user with no group or other
  permission bits; otherwise it is refused with a WARNING naming the file and what is wrong, and the store
  starts empty (the next change replaces the file with a proper one). A malformed file (not JSON, wrong
  shape, unknown version) is reported the same way; neither ever stops the daemon.

Without a persister everything lives in memory only. Secrets are never logged, neither here nor by the
persister (messages name the file and the cause, never an entry's value).

It will not talk to containerd or the kubelet (``cri_proxy.py`` does, and calls this store). Thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import itertools
import json
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
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
    """Where a persistent store keeps its entries (see the module docstring; :class:`CredentialFile`).

    ``load`` is called once, when the store is made; ``save`` after every change with all entries. Neither
    may raise for a bad or unwritable file: they log and carry on.
    """

    def load(self) -> Iterable[CriEntry]: ...

    def save(self, entries: tuple[CriEntry, ...]) -> None: ...


FILE_VERSION = 1
MAX_FILE_BYTES = 16 << 20
_CRED_FIELDS = ("username", "password", "identity_token", "registry_token")


class CredentialFile:
    """A :class:`CredentialPersister` over one root-only JSON file (see the module docstring).

    Args:
        path: the file, e.g. ``/run/soci-snapshotter-grpc/cri-credentials.json``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # ---- load

    def load(self) -> list[CriEntry]:
        """The entries in the file; ``[]`` (after a WARNING) when it is refused or malformed."""
        try:
            data = self._read()
        except FileNotFoundError:
            log.debug("cri keychain: no persisted credentials at %s", self.path)
            return []
        except _Refused as exc:
            log.warning("cri keychain: refusing to load persisted credentials from %s: %s", self.path, exc)
            return []
        except OSError as exc:
            log.warning(
                "cri keychain: cannot read persisted credentials from %s: %s",
                self.path,
                exc.strerror or type(exc).__name__,
            )
            return []
        try:
            return _decode_file(data)
        except _Malformed as exc:
            log.warning(
                "cri keychain: persisted credentials file %s is malformed (%s); starting with an empty store",
                self.path,
                exc,
            )
            return []

    def _read(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Refused("it is a symbolic link") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Refused("it is not a regular file")
            if st.st_uid != os.geteuid():
                raise _Refused(f"it is owned by uid {st.st_uid}, not by this daemon's uid {os.geteuid()}")
            if st.st_mode & 0o077:
                raise _Refused(
                    f"its mode is {stat.S_IMODE(st.st_mode):04o}; it must not be accessible to group or "
                    "others (0600)"
                )
            if st.st_size > MAX_FILE_BYTES:
                raise _Refused(f"it is {st.st_size} bytes, more than the limit of {MAX_FILE_BYTES}")
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    # ---- save

    def save(self, entries: tuple[CriEntry, ...]) -> None:
        """Replace the file with ``entries`` atomically; a failure is logged (WARNING), never raised."""
        data = json.dumps(
            {"version": FILE_VERSION, "entries": [_encode_entry(e) for e in entries]},
            separators=(",", ":"),
        ).encode()
        parent = self.path.parent
        tmp = parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            if not parent.is_dir():
                parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning(
                "cri keychain: cannot persist credentials to %s: %s; they are kept in memory only",
                self.path,
                exc.strerror or type(exc).__name__,
            )
            return
        log.debug("cri keychain: persisted %d entries to %s", len(entries), self.path)


class _Refused(Exception):
    """The file is not one this daemon may trust (owner, mode, type, size)."""


class _Malformed(Exception):
    """The file's content is not a credentials file of this version. Messages never quote values."""


def _encode_entry(e: CriEntry) -> dict[str, Any]:
    c = e.credentials
    return {
        "ref": {"host": e.ref.host, "repository": e.ref.repository, "tag": e.ref.tag, "digest": e.ref.digest},
        "server_host": e.server_host,
        "recorded_at": e.recorded_at,
        "seq": e.seq,
        "expires_at": c.expires_at if c is not None else None,
        "credentials": None
        if c is None
        else {**{f: getattr(c, f) for f in _CRED_FIELDS}, "source": c.source},
    }


def _decode_file(data: bytes) -> list[CriEntry]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        # the position only: the text of a JSON error can quote the content
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise _Malformed(f"not JSON{where}") from None
    if not isinstance(doc, dict):
        raise _Malformed("not a JSON object")
    if doc.get("version") != FILE_VERSION:
        raise _Malformed(f"unknown version {doc.get('version')!r} (expected {FILE_VERSION})")
    raw = doc.get("entries")
    if not isinstance(raw, list):
        raise _Malformed('"entries" is not a list')
    return [_decode_entry(x, i) for i, x in enumerate(raw)]


def _decode_entry(x: Any, i: int) -> CriEntry:
    where = f"entry {i}"
    if not isinstance(x, dict):
        raise _Malformed(f"{where} is not an object")
    ref = x.get("ref")
    if not isinstance(ref, dict) or not all(
        isinstance(ref.get(k), str) for k in ("host", "repository", "tag", "digest")
    ):
        raise _Malformed(f"{where}: ref is not an object of host, repository, tag and digest strings")
    name = RefName(ref["host"], ref["repository"], ref["tag"], ref["digest"])
    try:
        same = split_reference(str(name)) == name
    except InvalidArgument:
        same = False
    if not same:
        raise _Malformed(f"{where}: ref is not a normalized image reference")
    server_host = x.get("server_host")
    if not isinstance(server_host, str):
        raise _Malformed(f"{where}: server_host is not a string")
    recorded_at, seq, expires_at = x.get("recorded_at"), x.get("seq"), x.get("expires_at")
    if not _is_time(recorded_at):
        raise _Malformed(f"{where}: recorded_at is not a time")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _Malformed(f"{where}: seq is not a non-negative integer")
    if expires_at is not None and not _is_time(expires_at):
        raise _Malformed(f"{where}: expires_at is not a time")
    raw = x.get("credentials")
    creds: Credentials | None = None
    if raw is not None:
        if not isinstance(raw, dict) or not all(
            isinstance(raw.get(f, ""), str) for f in (*_CRED_FIELDS, "source")
        ):
            raise _Malformed(f"{where}: credentials is not an object of strings")
        creds = Credentials(
            **{f: raw.get(f, "") for f in _CRED_FIELDS},
            source=raw.get("source", "") or f"cri:{name}",
            expires_at=float(expires_at) if expires_at is not None else None,
        )
        if creds.is_empty():
            raise _Malformed(f"{where}: credentials carry no way to authenticate")
    return CriEntry(
        ref=name, server_host=server_host, credentials=creds, recorded_at=float(recorded_at), seq=seq
    )


def _is_time(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


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
    """Credentials from CRI ``PullImage`` requests, in memory (and persisted when asked); a ``Credential``.

    Args:
        ttl: seconds after a pull at which its credentials are reported as expired (None: unknown).
        clock: time source (tests).
        persist: optional :class:`CredentialPersister` (see the module docstring). Its entries are loaded
            here, those past their expiry (the stored one, or ``recorded_at + ttl``) dropped.
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
        self._save_lock = threading.Lock()
        self._generation = 0  # bumped under _lock on every change
        self._saved_generation = 0  # the newest generation written (under _save_lock)
        self._entries: dict[str, CriEntry] = {}
        self._hits = {"exact": 0, "repository": 0, "miss": 0}
        first_seq = 1
        if persist is not None:
            now, dropped = clock(), 0
            for e in sorted(persist.load(), key=lambda e: e.seq):
                if self._expired(e, now):
                    dropped += 1
                    continue
                self._entries[str(e.ref)] = e
                first_seq = max(first_seq, e.seq + 1)
            log.info(
                "cri keychain: %d persisted entr%s loaded (%d expired, dropped)",
                len(self._entries),
                "y" if len(self._entries) == 1 else "ies",
                dropped,
            )
        self._seq = itertools.count(first_seq)

    def _expired(self, e: CriEntry, now: float) -> bool:
        expiries = [e.credentials.expires_at] if e.credentials is not None else []
        if self._ttl is not None:
            expiries.append(e.recorded_at + self._ttl)
        return any(x is not None and x <= now for x in expiries)

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
            self._generation += 1
        self._save()
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
                self._generation += 1
        if found:
            self._save()
        return found

    def _save(self) -> None:
        """Hand the newest entries to the persister (outside the lookup lock; an older snapshot never
        overwrites a newer one)."""
        if self._persist is None:
            return
        with self._save_lock:
            with self._lock:
                generation, entries = self._generation, tuple(self._entries.values())
            if generation <= self._saved_generation:
                return
            self._persist.save(entries)
            self._saved_generation = generation

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
