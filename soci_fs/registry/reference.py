"""Image references, registry hosts and the registry-related configuration values.

Owns: parsing ``host/path[:tag][@digest]`` (as containerd does, and optionally with Docker's normalization),
the Docker Hub mappings (``docker.io`` is contacted as ``registry-1.docker.io``; its credentials live under
``https://index.docker.io/v1/``), the frozen dataclasses that carry the ``[http]``, ``[blob]`` and
``[resolver]`` settings, and host resolution (mirrors first, then the image's own host; http for loopback,
insecure mirrors and configured plain-http hosts).

Will not: read config files (the config parser fills these dataclasses), do any I/O, or know about
credentials or keychains.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import urlsplit

from soci_fs.errors import InvalidArgument

DOCKER_HUB_NAME = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_DIGEST_RE = re.compile(r"^(?P<alg>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]+)$")
_KNOWN_DIGEST_HEX = {"sha256": re.compile(r"^[a-f0-9]{64}$"), "sha512": re.compile(r"^[a-f0-9]{128}$")}
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)"
    r"(?::[0-9]{1,5})?$"
)


def validate_digest(digest: str, *, what: str = "digest") -> str:
    """Return ``digest`` if it is a well-formed OCI digest, else raise ``InvalidArgument`` naming it."""
    m = _DIGEST_RE.match(digest)
    if not m:
        raise InvalidArgument(f"invalid {what} {digest!r}: expected <algorithm>:<hex>")
    check = _KNOWN_DIGEST_HEX.get(m.group("alg"))
    if check is not None and not check.match(m.group("hex")):
        raise InvalidArgument(f"invalid {what} {digest!r}: wrong length or characters for {m.group('alg')}")
    return digest


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. ``host`` is as written (``docker.io``, ``127.0.0.1:5000``)."""

    host: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def locator(self) -> str:
        """``host/repository``."""
        return f"{self.host}/{self.repository}"

    @property
    def registry_host(self) -> str:
        """The host contacted over HTTP (``docker.io`` becomes ``registry-1.docker.io``)."""
        return registry_host(self.host)

    @property
    def credential_key(self) -> str:
        """The key used by Docker config files for this registry."""
        return credential_key(self.host)

    @property
    def object(self) -> str:
        """What to fetch from ``/manifests/``: the digest when present, else the tag."""
        return self.digest or self.tag

    def with_object(self, *, tag: str = "", digest: str = "") -> Reference:
        """A copy naming another tag or digest in the same repository."""
        if digest:
            validate_digest(digest)
        if tag and not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid tag {tag!r} for {self.locator}")
        return replace(self, tag=tag, digest=digest)

    def __str__(self) -> str:
        out = self.locator
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out


def registry_host(host: str) -> str:
    """Map a reference host to the host to contact (Docker Hub aliases go to ``registry-1.docker.io``)."""
    return DOCKER_HUB_REGISTRY if host in _DOCKER_HUB_ALIASES else host


def credential_key(host: str) -> str:
    """Map a registry host to its Docker config key (``https://index.docker.io/v1/`` for Docker Hub)."""
    return DOCKER_HUB_CONFIG_KEY if host in _DOCKER_HUB_ALIASES else host


def parse(ref: str, *, normalize: bool = False) -> Reference:
    """Parse an image reference.

    Without ``normalize`` the reference must be ``host/path[:tag][@digest]`` (containerd's rules, as CRI
    passes them). With ``normalize`` Docker's shorthand is accepted: ``nginx`` becomes
    ``docker.io/library/nginx:latest``; the default tag is added only when there is neither tag nor digest.

    Raises:
        InvalidArgument: naming the reference and what is wrong with it.
    """
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument(f"invalid reference {ref!r}: empty")
    if ref != ref.strip() or any(c.isspace() for c in ref):
        raise InvalidArgument(f"invalid reference {ref!r}: contains whitespace")
    name, digest = ref, ""
    if "@" in ref:
        name, digest = ref.split("@", 1)
        validate_digest(digest, what=f"digest in reference {ref!r}:")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid reference {ref!r}: bad tag {tag!r}")
    if "/" in name:
        first, rest = name.split("/", 1)
    else:
        first, rest = "", name
    if normalize and (not first or ("." not in first and ":" not in first and first != "localhost")):
        # Docker shorthand: the first component is part of the path, the host is Docker Hub.
        path = name
        host = DOCKER_HUB_NAME
        if "/" not in path:
            path = "library/" + path
        if not tag and not digest:
            tag = "latest"
    else:
        if not first:
            raise InvalidArgument(f"invalid reference {ref!r}: a host is required (host/repository[:tag])")
        host, path = first, rest
    if not _HOST_RE.match(host):
        raise InvalidArgument(f"invalid reference {ref!r}: bad host {host!r}")
    if not path:
        raise InvalidArgument(f"invalid reference {ref!r}: empty repository")
    for comp in path.split("/"):
        if not _PATH_COMPONENT_RE.match(comp):
            hint = " (repository names must be lowercase)" if comp.lower() != comp else ""
            raise InvalidArgument(f"invalid reference {ref!r}: bad path component {comp!r}{hint}")
    if len(path) > 255:
        raise InvalidArgument(f"invalid reference {ref!r}: repository name longer than 255 characters")
    return Reference(host=host, repository=path, tag=tag, digest=digest)


# --------------------------------------------------------------------------------------------------------
# Configuration values ([http], [blob], [resolver])


@dataclass(frozen=True)
class RetryConfig:
    """Retry policy of one HTTP client: attempts = ``max_retries + 1``; wait ``min·2^n`` capped at ``max``."""

    max_retries: int = 8
    min_wait_msec: int = 30
    max_wait_msec: int = 300_000


@dataclass(frozen=True)
class HttpConfig:
    """The ``[http]`` table: the global client used for manifests, indexes, zTOCs and tokens."""

    max_retries: int = 8
    min_wait_msec: int = 30
    max_wait_msec: int = 300_000
    dial_timeout_msec: int = 3000
    response_header_timeout_msec: int = 3000
    request_timeout_msec: int = 300_000

    @property
    def retry(self) -> RetryConfig:
        return RetryConfig(self.max_retries, self.min_wait_msec, self.max_wait_msec)


@dataclass(frozen=True)
class BlobConfig:
    """The ``[blob]`` table: the clone of the client used for lazy layer range reads.

    ``None`` for the retry fields means "copy the ``[http]`` value".
    """

    max_retries: int | None = None
    min_wait_msec: int | None = None
    max_wait_msec: int | None = None
    fetching_timeout_sec: int = 300
    valid_interval: int = 60
    check_always: bool = False
    force_single_range_mode: bool = False
    max_span_verification_retries: int = 0

    def retry(self, http: HttpConfig) -> RetryConfig:
        return RetryConfig(
            http.max_retries if self.max_retries is None else self.max_retries,
            http.min_wait_msec if self.min_wait_msec is None else self.min_wait_msec,
            http.max_wait_msec if self.max_wait_msec is None else self.max_wait_msec,
        )


@dataclass(frozen=True)
class MirrorConfig:
    """One ``[[resolver.host."<host>".mirrors]]`` entry."""

    host: str
    insecure: bool = False
    request_timeout_sec: int = 0  # 0: the client's timeout; >0 per attempt; <0 none


@dataclass(frozen=True)
class ResolverConfig:
    """The ``[resolver]`` table, plus ``plain_http_hosts`` (hosts always contacted over http)."""

    auth_client_ttl_sec: int = 3600
    enable_auth_client_sharing: bool = False
    mirrors: Mapping[str, tuple[MirrorConfig, ...]] = field(default_factory=lambda: MappingProxyType({}))
    plain_http_hosts: frozenset[str] = frozenset()

    @property
    def effective_auth_client_ttl(self) -> float | None:
        """Seconds a host list / auth client is kept; ``None`` means forever."""
        if self.auth_client_ttl_sec == 0:
            return 3600.0
        if self.auth_client_ttl_sec < 0:
            return None
        return float(self.auth_client_ttl_sec)


@dataclass(frozen=True)
class RegistryConfig:
    """Everything the registry client needs from ``config.toml``."""

    http: HttpConfig = HttpConfig()
    blob: BlobConfig = BlobConfig()
    resolver: ResolverConfig = ResolverConfig()


# --------------------------------------------------------------------------------------------------------
# Hosts


@dataclass(frozen=True)
class RegistryHost:
    """One place to fetch from: ``scheme://host`` + ``path`` (the API prefix, normally ``/v2``)."""

    host: str
    scheme: str = "https"
    path: str = "/v2"
    is_mirror: bool = False
    request_timeout: float | None = 0.0  # 0.0: client default; None: no timeout

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs, with or without a port."""
    name = split_host_port(host)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host_port(host: str) -> tuple[str, str]:
    """``[::1]:5000`` -> (``::1``, ``5000``); ``example.com`` -> (``example.com``, ``""``)."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, ""
        rest = host[end + 1 :]
        return host[1:end], rest[1:] if rest.startswith(":") else ""
    if host.count(":") == 1:
        name, port = host.split(":")
        return name, port
    return host, ""


def registry_scheme(host: str, config: RegistryConfig, *, plain_http: bool = False) -> str:
    """Scheme for the image's own registry: http for loopback hosts and configured plain-http hosts.

    Deliberate difference from upstream: an ``insecure`` mirror does not downgrade the image's own registry
    to http (upstream's OCI client does); ``insecure`` applies to that mirror only.
    """
    if plain_http or is_loopback(host) or host in config.resolver.plain_http_hosts:
        return "http"
    return "https"


def mirror_host(mirror: MirrorConfig) -> RegistryHost:
    """Turn a mirror entry into a host.

    Deliberate difference from upstream: a mirror given without a scheme (``mirror.example:5000``) is read as
    ``https://mirror.example:5000`` (``http`` when ``insecure``) instead of being skipped or failing the
    lookup; an operator writing ``host:port`` means that host.

    Raises:
        InvalidArgument: the entry has no usable host.
    """
    text = mirror.host.strip()
    if "://" not in text:
        text = ("http://" if mirror.insecure else "https://") + text
    parts = urlsplit(text)
    if not parts.netloc or not _HOST_RE.match(parts.netloc):
        raise InvalidArgument(f"invalid mirror host {mirror.host!r}")
    host = registry_host(parts.netloc)
    scheme = "http" if mirror.insecure or is_loopback(host) or parts.scheme == "http" else "https"
    path = parts.path.rstrip("/") or "/v2"
    timeout: float | None
    if mirror.request_timeout_sec > 0:
        timeout = float(mirror.request_timeout_sec)
    elif mirror.request_timeout_sec < 0:
        timeout = None
    else:
        timeout = 0.0
    return RegistryHost(host=host, scheme=scheme, path=path, is_mirror=True, request_timeout=timeout)


def resolve_hosts(
    ref: Reference, config: RegistryConfig, *, blobs: bool = True, plain_http: bool = False
) -> tuple[RegistryHost, ...]:
    """Hosts to try for ``ref``: configured mirrors of its host (only when ``blobs``), then the host itself.

    Mirrors serve layer blobs only; SOCI indexes, zTOCs and manifests come from the image's own registry.
    """
    out: list[RegistryHost] = []
    if blobs:
        for m in config.resolver.mirrors.get(ref.host, ()):
            out.append(mirror_host(m))
    host = ref.registry_host
    out.append(RegistryHost(host=host, scheme=registry_scheme(ref.host, config, plain_http=plain_http)))
    return tuple(out)
