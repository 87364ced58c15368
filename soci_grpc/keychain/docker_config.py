"""The Docker config keychain: ``config.json`` ``auths``, ``credsStore`` and ``credHelpers``.

This module owns
* where the file is (:func:`default_config_path`): an explicit setting (config.toml ``docker_config``), else
  ``$DOCKER_CONFIG/config.json``, else ``$HOME/.docker/config.json`` (the home of the daemon's user when
  ``HOME`` is unset, as under systemd);
* parsing the Docker config format (:func:`parse_docker_config`, shared with the Kubernetes-secret keychain
  for ``.dockerconfigjson``), with loud errors: a malformed or unreadable file is a ``FormatError`` /
  ``InvalidArgument`` naming the file and the problem, never silent empty credentials (upstream ignores
  such files; we deliberately do not);
* the Docker registry key of a host (:func:`registry_key`: Docker Hub is ``https://index.docker.io/v1/``)
  and the matching of ``auths`` keys (:func:`match_auths`);
* re-reading the file when its identity (inode, size, mtime, ctime) changes, so ``docker login`` takes effect
  on the next lookup without a restart.

Store selection — THE rule, written down once (it is Docker's):

1. ``credHelpers[<key>]`` when present (exact key; failing that, an entry whose key reduces to the same
   host — an extension for hand-written configs), else
2. ``credsStore`` when set, else
3. the file's own ``auths``.

The selected store is the only one asked: a helper that has no credentials for the key gives "no
credentials" even if ``auths`` has an entry for the host (docker/cli behaves the same: the helper's answer
replaces the file's). ``DOCKER_AUTH_CONFIG`` (environment, docker/cli v29): an exact-key entry there
wins over the selected store; a malformed value is a loud error here (docker/cli ignores it with a
message).

``auths`` matching, most specific first: an entry whose key names this host *and* a repository path that
is a prefix of the image's repository (more path segments first), then the exact key, then entries whose
key reduces to this host (``https://host:port/v2/`` → ``host:port``), then — Docker compatibility only —
entries for this host whose path does not match; ties keep file order. For a config written by ``docker
login`` (host keys only) this is exactly Docker's result.

Entry decoding: ``auth`` (standard padded base64 of ``user:password``, split at the first ``:``, NULs
trimmed from the password) overrides ``username``/``password``; an ``identitytoken`` makes the answer an
identity token (user name cleared, as Docker does); a ``registrytoken`` alone is a bearer token used as is.

It will not run credential helpers itself (``helpers.py`` does) and keeps no credentials beyond the parsed
file it caches.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from soci_fs.errors import FormatError, InvalidArgument
from soci_fs.registry import reference
from soci_fs.registry.credentials import Credentials
from soci_grpc.keychain.explain import Trace
from soci_grpc.keychain.helpers import HelperRunner, validate_helper_name

log = logging.getLogger(__name__)

HUB_KEY = "https://index.docker.io/v1/"
HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HUB_CANONICAL = "index.docker.io"
ENV_AUTH_CONFIG = "DOCKER_AUTH_CONFIG"


# --------------------------------------------------------------------------------------------------------
# hosts and references


def canonical_host(host: str) -> str:
    """Lower-cased ``host[:port]``; the Docker Hub aliases collapse to one name."""
    h = host.strip().lower()
    return _HUB_CANONICAL if h in HUB_HOSTS else h


def registry_key(host: str) -> str:
    """The key Docker uses for ``host`` in ``config.json`` and with helpers."""
    h = host.strip()
    return HUB_KEY if h.lower() in HUB_HOSTS else h


@dataclass(frozen=True)
class RefName:
    """A Docker-normalized image reference (``nginx`` → ``docker.io/library/nginx:latest``)."""

    host: str  # as written (docker.io for Hub)
    repository: str
    tag: str
    digest: str

    def __str__(self) -> str:
        if self.digest:
            return f"{self.host}/{self.repository}@{self.digest}"
        return f"{self.host}/{self.repository}:{self.tag}"


def split_reference(ref: str) -> RefName:
    """Parse and Docker-normalize an image reference; ``InvalidArgument`` when it is not one.

    Parsing is ``soci_fs.registry.reference.parse(normalize=True)``; on top of it the Docker Hub aliases
    become ``docker.io`` and the tag is dropped when a digest is present (as the CRI does).
    """
    parsed = reference.parse(ref.strip(), normalize=True)
    host = "docker.io" if parsed.host.lower() in HUB_HOSTS else parsed.host
    repository = parsed.repository
    if host == "docker.io" and "/" not in repository:
        repository = "library/" + repository
    tag = "" if parsed.digest else (parsed.tag or "latest")
    return RefName(host=host, repository=repository, tag=tag, digest=parsed.digest)


def repository_of(ref: str) -> str:
    """The repository path of ``ref`` ("" when ``ref`` is empty or not a reference)."""
    if not ref:
        return ""
    try:
        return split_reference(ref).repository
    except InvalidArgument:
        return ""


# --------------------------------------------------------------------------------------------------------
# the file format


@dataclass(frozen=True)
class AuthEntry:
    """One decoded ``auths`` entry. ``repr`` hides the secrets."""

    key: str
    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def __repr__(self) -> str:
        return f"AuthEntry(key={self.key!r}, username={self.username!r})"

    def credentials(self, source: str) -> Credentials | None:
        """The answer this entry gives, or None when it carries nothing usable."""
        if self.identity_token:
            return Credentials(
                identity_token=self.identity_token, source=source, expires_at=jwt_expiry(self.identity_token)
            )
        if self.username or self.password:
            return Credentials(
                username=self.username,
                password=self.password,
                source=source,
                expires_at=jwt_expiry(self.password),
            )
        if self.registry_token:
            return Credentials(
                registry_token=self.registry_token, source=source, expires_at=jwt_expiry(self.registry_token)
            )
        return None


@dataclass(frozen=True)
class DockerConfig:
    """A parsed Docker config (a file, or a secret's ``.dockerconfigjson``)."""

    origin: str  # the file path, or "secret <namespace>/<name>"
    auths: tuple[AuthEntry, ...] = ()
    creds_store: str = ""
    cred_helpers: tuple[tuple[str, str], ...] = ()  # (key, helper name), file order


def _fail(origin: str, problem: str) -> FormatError:
    return FormatError(f"docker config {origin}: {problem}")


def decode_auth_field(value: str, where: str) -> tuple[str, str]:
    """Decode an ``auth`` value (base64 of ``user:password``); ``FormatError`` naming ``where`` otherwise.

    The message never contains the value.
    """
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(
            f"{where}: 'auth' is not standard base64 (expected base64 of user:password)"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{where}: 'auth' does not decode to UTF-8 text") from None
    user, sep, password = text.partition(":")
    if not sep:
        raise FormatError(f"{where}: 'auth' does not decode to user:password (no ':')")
    if not user:
        raise FormatError(f"{where}: 'auth' decodes to an empty user name")
    return user, password.strip("\x00")


def _str_field(obj: Mapping[str, Any], name: str, where: str, origin: str) -> str:
    value = obj.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(origin, f"{where}.{name} must be a string, not {type(value).__name__}")
    return value


def parse_docker_config(data: bytes | str, origin: str, *, allow_helpers: bool = True) -> DockerConfig:
    """Parse Docker config JSON.

    Args:
        data: the file's bytes.
        origin: named in every error (a path, or ``secret ns/name``).
        allow_helpers: when False (secrets from a cluster) ``credsStore``/``credHelpers`` are not read.

    Raises:
        FormatError: not JSON, wrong types, or an ``auth`` value that is not base64 of ``user:password``.
            Messages name the entry key and the field, never a value.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        pos = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise _fail(origin, f"not valid JSON{pos}") from None
    if not isinstance(doc, dict):
        raise _fail(origin, "top level must be a JSON object")
    auths_obj = doc.get("auths")
    auths_obj = {} if auths_obj is None else auths_obj
    if not isinstance(auths_obj, dict):
        raise _fail(origin, "'auths' must be an object")
    auths: list[AuthEntry] = []
    for key, entry in auths_obj.items():
        where = f"auths[{key!r}]"
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise _fail(origin, f"{where} must be an object")
        username = _str_field(entry, "username", where, origin)
        password = _str_field(entry, "password", where, origin)
        auth = _str_field(entry, "auth", where, origin)
        if auth:
            username, password = decode_auth_field(auth, f"docker config {origin}: {where}")
        auths.append(
            AuthEntry(
                key=key,
                username=username,
                password=password,
                identity_token=_str_field(entry, "identitytoken", where, origin),
                registry_token=_str_field(entry, "registrytoken", where, origin),
            )
        )
    creds_store = ""
    helpers: list[tuple[str, str]] = []
    if allow_helpers:
        creds_store = _str_field(doc, "credsStore", "config", origin)
        if creds_store:
            _check_helper_name(creds_store, "credsStore", origin)
        ch = doc.get("credHelpers")
        ch = {} if ch is None else ch
        if not isinstance(ch, dict):
            raise _fail(origin, "'credHelpers' must be an object")
        for key, name in ch.items():
            if not isinstance(name, str):
                raise _fail(origin, f"credHelpers[{key!r}] must be a string")
            _check_helper_name(name, f"credHelpers[{key!r}]", origin)
            helpers.append((key, name))
    return DockerConfig(
        origin=origin, auths=tuple(auths), creds_store=creds_store, cred_helpers=tuple(helpers)
    )


def _check_helper_name(name: str, where: str, origin: str) -> None:
    try:
        validate_helper_name(name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"docker config {origin}: {where}: {exc}") from None


def reduce_key(key: str) -> tuple[str, str]:
    """``auths`` key → (canonical host, repository path). API paths ``v1``/``v2`` of URL keys are dropped."""
    k = key.strip()
    if "://" in k:
        parts = urlsplit(k)
        host = parts.netloc
        path = parts.path.strip("/")
        if path in ("v1", "v2") or path.startswith(("v1/", "v2/")):
            path = path[3:]
    else:
        host, _, path = k.partition("/")
        path = path.strip("/")
    return canonical_host(host), path


def match_auths(
    auths: tuple[AuthEntry, ...], host: str, repository: str, *, strict_paths: bool
) -> list[tuple[tuple[int, int], AuthEntry]]:
    """The entries that apply to (host, repository), best first, each with its rank (lower is better).

    See the module docstring for the order. ``strict_paths`` (Kubernetes secrets, kubelet semantics) drops
    entries whose repository path does not match; the Docker config keeps them last (Docker ignores paths).
    """
    want_key = registry_key(host)
    want_host = canonical_host(host)
    ranked: list[tuple[tuple[int, int], int, AuthEntry]] = []
    for order, entry in enumerate(auths):
        ehost, epath = reduce_key(entry.key)
        if entry.key == want_key and not epath:
            rank = (1, 0)
        elif ehost != want_host:
            continue
        elif not epath:
            rank = (2, 0)
        elif repository == epath or repository.startswith(epath + "/"):
            rank = (0, -epath.count("/") - 1)
        elif strict_paths:
            continue
        else:
            rank = (3, 0)
        ranked.append((rank, order, entry))
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [(rank, entry) for rank, _, entry in ranked]


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT-shaped token (not verified; only to show and track expiry)."""
    if not token or token.count(".") != 2:
        return None
    payload = token.split(".")[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


# --------------------------------------------------------------------------------------------------------
# the keychain


def default_config_path(
    explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """``explicit``, else ``$DOCKER_CONFIG/config.json``, else ``$HOME/.docker/config.json``."""
    if explicit:
        return Path(explicit)
    env = os.environ if env is None else env
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    home = env.get("HOME") or os.path.expanduser("~" + _user_name())
    return Path(home) / ".docker" / "config.json"


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return ""


def _parse_env_auth_config(value: str) -> dict[str, tuple[str, str]]:
    """``DOCKER_AUTH_CONFIG``: ``{"auths": {key: {"auth": b64}}}`` only. Errors never show the value."""
    where = f"environment variable {ENV_AUTH_CONFIG}"
    try:
        doc = json.loads(value)
    except json.JSONDecodeError:
        raise InvalidArgument(f"{where}: not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) - {"auths"} or not isinstance(doc.get("auths", {}), dict):
        raise InvalidArgument(f"{where}: expected an object with only 'auths'")
    out: dict[str, tuple[str, str]] = {}
    for key, entry in doc.get("auths", {}).items():
        if not isinstance(entry, dict) or set(entry) != {"auth"} or not isinstance(entry["auth"], str):
            raise InvalidArgument(f"{where}: auths[{key!r}] must hold exactly one string field 'auth'")
        try:
            out[key] = decode_auth_field(entry["auth"], f"{where}: auths[{key!r}]")
        except FormatError as exc:
            raise InvalidArgument(str(exc)) from None
    return out


class DockerConfigKeychain:
    """The Docker config as a ``Credential`` callable ``(host, ref) -> Credentials | None``.

    The path is resolved once, at construction (like upstream); the file is stat'ed on every lookup and
    re-parsed only when it changed. A missing file means no credentials; anything else wrong with it raises.
    Thread-safe.
    """

    name = "docker-config"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        helpers: HelperRunner | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.path = default_config_path(path, env)
        self._helpers = helpers or HelperRunner()
        raw_env = env.get(ENV_AUTH_CONFIG, "")
        self._env_auths = _parse_env_auth_config(raw_env) if raw_env.strip() else {}
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, ...], DockerConfig] | None = None
        self.reads = 0  # parses performed (statistics)

    def statistics(self) -> dict[str, object]:
        return {"path": str(self.path), "reads": self.reads, "helpers": self._helpers.statistics()}

    def load(self) -> DockerConfig | None:
        """The parsed file (cached while unchanged), or None when it does not exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                self._cached = None
            return None
        except OSError as exc:
            raise InvalidArgument(f"docker config {self.path}: cannot stat: {exc.strerror}") from exc
        ident = _identity(st)
        with self._lock:
            if self._cached is not None and self._cached[0] == ident:
                return self._cached[1]
        try:
            with open(self.path, "rb") as f:
                fst = os.fstat(f.fileno())
                if not stat.S_ISREG(fst.st_mode):
                    raise InvalidArgument(f"docker config {self.path}: not a regular file")
                data = f.read()
        except FileNotFoundError:
            return None
        except IsADirectoryError as exc:
            raise InvalidArgument(f"docker config {self.path}: is a directory") from exc
        except OSError as exc:
            raise InvalidArgument(f"docker config {self.path}: cannot read: {exc.strerror}") from exc
        cfg = parse_docker_config(data, str(self.path))
        with self._lock:
            self._cached = (_identity(fst), cfg)
            self.reads += 1
        log.debug("read docker config %s (%d auths entries)", self.path, len(cfg.auths))
        return cfg

    def __call__(self, host: str, ref: str) -> Credentials | None:
        return self.trace(host, ref).answer

    def trace(self, host: str, ref: str) -> Trace:
        """Look up (host, ref), recording each decision. Errors raise (they are not folded into the trace)."""
        key = registry_key(host)
        steps: list[str] = [f"registry key {key!r}"]
        if key in self._env_auths:
            user, password = self._env_auths[key]
            steps.append(f"{ENV_AUTH_CONFIG} has an entry for the key; it wins over the file")
            creds = Credentials(username=user, password=password, source=f"env:{ENV_AUTH_CONFIG}")
            return Trace(answer=creds, steps=tuple(steps))
        cfg = self.load()
        if cfg is None:
            steps.append(f"file {self.path} does not exist")
            return Trace(steps=tuple(steps))
        steps.append(f"file {self.path}")
        helper = _select_helper(cfg, host)
        if helper is not None:
            hname, why = helper
            steps.append(f"store: credential helper {hname!r} ({why}); auths entries are not consulted")
            creds = self._helpers.get(hname, key)
            if creds is None:
                steps.append(f"helper {hname!r} has no credentials for {key!r}")
            return Trace(answer=creds, steps=tuple(steps))
        steps.append("store: the file's auths (no credHelpers entry, no credsStore)")
        repo = repository_of(ref)
        for _rank, entry in match_auths(cfg.auths, host, repo, strict_paths=False):
            creds = entry.credentials(f"docker-config:{self.path}")
            if creds is None:
                steps.append(f"auths entry {entry.key!r} matches but holds no credentials; skipped")
                continue
            steps.append(f"auths entry {entry.key!r} matches")
            return Trace(answer=creds, steps=tuple(steps))
        steps.append("no auths entry matches")
        return Trace(steps=tuple(steps))


def _select_helper(cfg: DockerConfig, host: str) -> tuple[str, str] | None:
    key = registry_key(host)
    for k, name in cfg.cred_helpers:
        if k == key:
            return name, f"credHelpers[{k!r}]"
    want = canonical_host(host)
    for k, name in cfg.cred_helpers:
        if reduce_key(k)[0] == want:
            return name, f"credHelpers[{k!r}] (same host)"
    if cfg.creds_store:
        return cfg.creds_store, "credsStore"
    return None


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
