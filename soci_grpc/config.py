"""The daemon's ``config.toml``: parsed into frozen dataclasses with upstream's keys and defaults.

Owns:

* the schema: every key of upstream's snapshotter configuration (cli-and-config.md §4, registry-and-auth.md
  §9) with its default, as field metadata on frozen dataclasses in upstream's struct order, plus a few keys
  of our own (marked "soci-py" in the docstrings): ``docker_config``, ``credential_helper_timeout_sec``,
  ``[cri_keychain] persist`` / ``persist_path`` / ``credential_ttl_sec`` and ``[kubeconfig_keychain]
  namespaces`` / ``label_selector`` / ``first_sync_wait_sec``, the block cache's ``[directory_cache]
  max_memory_bytes`` / ``max_disk_bytes`` / ``verify_every_read``, and ``[fuse] long_timeouts``;
* the two default rules. Keys marked ``fill`` are "filled after decoding": an explicit 0 or ``""`` means
  "use the default". All other keys are "pre-seeded": the default applies only when the key is absent, and
  an explicit 0/false/-1 is kept. (Keys whose 0 means "N where used", such as ``resolve_result_entry``,
  keep 0 in the config; the consumer substitutes N.)
* loading (:func:`load`, :func:`parse`) with errors that name the file, the line and the key: a syntax
  error, a value of the wrong type, an out-of-range or unknown enum value all raise :class:`ConfigError`
  (an ``InvalidArgument``), never a traceback. Key matching is exact first, then case-insensitive, as
  upstream's decoder does. An unknown key or table is logged at WARNING with its file and line (upstream
  ignores it silently) and otherwise ignored;
* writing TOML back (:func:`dump`, :func:`default_toml`) the way ``config dump`` / ``config default`` do:
  struct order (file-system keys, then the other top-level keys, then tables), tables indented two spaces
  per level, literal-quoted strings. What ``dump`` writes parses back to an equal :class:`Config`;
* the views other modules consume: :meth:`Config.registry_config` (the registry client's
  ``RegistryConfig``) and :meth:`Config.keychain_settings`; and :func:`check_startup`, the checks upstream
  makes when the file system starts (they touch the file system, so ``config dump`` does not run them).

Deliberate differences from upstream, besides the warnings and the line numbers:

* ``max_concurrency`` below 0 is kept as written (unlimited) instead of being stored as 0, because a 0
  written by ``config dump`` would read back as 100;
* negative values are refused where they have no meaning (timeouts, periods, retry bounds, cache sizes);
  upstream passes them on to code that misbehaves with them;
* ``metrics_network`` must be a stream network Go can listen on (``tcp``, ``tcp4``, ``tcp6``, ``unix``,
  ``unixpacket``) and ``metadata_store`` must be ``db`` or ``db-multi`` at load time, not at first use.

Will not: read flags or the environment (the entry point does), start anything, or look at credentials.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from soci_fs.errors import InvalidArgument
from soci_fs.registry import reference

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/soci-snapshotter-grpc/config.toml"
DEFAULT_ROOT = "/var/lib/soci-snapshotter-grpc/"
DEFAULT_CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_IMAGE_SERVICE_PATH = "/run/containerd/containerd.sock"
DEFAULT_CRI_PERSIST_PATH = "/run/soci-snapshotter-grpc/cri-credentials.json"
UNBOUNDED = -1

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_LISTEN_NETWORKS = ("tcp", "tcp4", "tcp6", "unix", "unixpacket")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb|mb|kb|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}
_DECOMPRESS_ALGORITHMS = ("gzip", "zstd")
_BAD_PATH_CHARS = set("#%{}\\|;&$<>")


class ConfigError(InvalidArgument):
    """The configuration file cannot be used. The message names the file, and the line and key when known.

    Attributes:
        path: the file ("" when parsing a string without a name).
        line: 1-based line of the problem, or 0 when unknown.
        key: dotted key at fault ("" when the whole file is).
    """

    def __init__(self, message: str, *, path: str = "", line: int = 0, key: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.key = key


# --------------------------------------------------------------------------------------------------------
# schema helpers


def _opt(
    default: Any,
    *,
    toml: str | None = None,
    fill: bool = False,
    lo: float | None = None,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], str | None] | None = None,
    seed: Any = None,
    required: bool = False,
) -> Any:
    """A scalar key.

    Args:
        fill: an explicit 0 or "" means the default ("filled after decoding").
        lo: the smallest allowed value.
        choices: the allowed values.
        check: returns a problem (text) or None.
        seed: the value before decoding when it differs from the default (filled in by a later rule).
        required: the key must be written.
    """
    kind = {bool: "bool", int: "int", str: "str", float: "float", tuple: "strlist"}[type(default)]
    meta = {
        "kind": kind,
        "toml": toml,
        "fill": fill,
        "lo": lo,
        "choices": choices,
        "check": check,
        "seed": seed,
        "required": required,
    }
    return field(default=default, metadata=meta)


_TABLE = MappingProxyType({"kind": "table"})  # a sub-table; its class is the field's default_factory


def _map(cls: type, *, toml: str | None = None) -> Any:
    """A table whose keys are names chosen by the user (hosts, algorithms), each holding a ``cls`` table."""
    return field(
        default_factory=lambda: MappingProxyType({}), metadata={"kind": "map", "cls": cls, "toml": toml}
    )


def _array(cls: type, *, toml: str | None = None) -> Any:
    """An array of tables (``[[...]]``)."""
    return field(default=(), metadata={"kind": "array", "cls": cls, "toml": toml})


def _toml_key(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("toml") or f.name


def _check_mirror_host(value: str) -> str | None:
    if not value.strip():
        return "a mirror needs a host"
    try:
        reference.mirror_host(reference.MirrorConfig(host=value))
    except InvalidArgument as exc:
        return str(exc)
    return None


def _check_size(value: str) -> str | None:
    try:
        parse_size(value)
    except ValueError as exc:
        return str(exc)
    return None


def _check_absolute_path(value: str) -> str | None:
    return None if os.path.isabs(value) else f"{value!r} is not an absolute path"


def _check_namespaces(value: tuple[str, ...]) -> str | None:
    for ns in value:
        if not ns or "/" in ns:
            return f"bad namespace {ns!r}"
    return None


def parse_size(text: str) -> int:
    """``concurrent_download_chunk_size``: ``<number>[.<frac>][b|kb|mb|gb]`` (binary units, any case).

    Returns bytes; ``""`` or a value that rounds to 0 bytes gives ``UNBOUNDED`` (-1: whole layer).

    Raises:
        ValueError: the text is not a size.
    """
    if text == "":
        return UNBOUNDED
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"invalid size format: {text!r} (expected <number>[b|kb|mb|gb])")
    size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    return size if size > 0 else UNBOUNDED


# --------------------------------------------------------------------------------------------------------
# the schema, in upstream's struct order


@dataclass(frozen=True)
class HttpSection:
    """``[http]``: the global HTTP client (manifests, indexes, zTOCs, tokens). Every key: 0 → default."""

    DialTimeoutMsec: int = _opt(3000, fill=True, lo=0)
    ResponseHeaderTimeoutMsec: int = _opt(3000, fill=True, lo=0)
    RequestTimeoutMsec: int = _opt(300_000, fill=True, lo=0)
    MaxRetries: int = _opt(8, fill=True, lo=0)
    MinWaitMsec: int = _opt(30, fill=True, lo=0)
    MaxWaitMsec: int = _opt(300_000, fill=True, lo=0)


@dataclass(frozen=True)
class BlobSection:
    """``[blob]``: the lazy layer-blob client.

    ``max_retries``/``min_wait_msec``/``max_wait_msec``: 0 → the ``[http]`` value. ``valid_interval`` and
    ``fetching_timeout_sec``: 0 → default; ``check_always = true`` sets ``valid_interval`` to 0.
    ``max_span_verification_retries``: kept as written (negative → 3 where used).
    """

    valid_interval: int = _opt(60, fill=True, lo=0)
    fetching_timeout_sec: int = _opt(300, fill=True, lo=0)
    max_retries: int = _opt(8, lo=0, seed=0)
    min_wait_msec: int = _opt(30, lo=0, seed=0)
    max_wait_msec: int = _opt(300_000, lo=0, seed=0)
    check_always: bool = _opt(False)
    force_single_range_mode: bool = _opt(False)
    max_span_verification_retries: int = _opt(0)

    @property
    def span_verification_retries(self) -> int:
        """Extra fetch attempts after a span digest mismatch (negative in the file → 3)."""
        return 3 if self.max_span_verification_retries < 0 else self.max_span_verification_retries


@dataclass(frozen=True)
class DirectoryCacheSection:
    """``[directory_cache]``: 0 sizes mean 10 where used; ``direct`` is pre-seeded (explicit false kept).

    Upstream's keys (``max_lru_cache_entry``, ``max_cache_fds``, ``sync_add``, ``direct``) are accepted and
    kept; soci-py's block cache (``soci_fs.cache``, read through ``CacheConfig.from_section``) uses its own
    keys instead (soci-py, all pre-seeded):

    * ``max_memory_bytes`` (134217728 = 128 MiB): bound of the in-memory tier of decompressed spans; 0 turns
      the memory tier off (every read goes to the disk tier);
    * ``max_disk_bytes`` (0 = unlimited, as upstream has no size eviction): bound of the on-disk tier
      ``<root>/cache``, files and headers included; least recently used spans are evicted beyond it;
    * ``verify_every_read`` (false): re-check the crc32 of every disk block on every read, not only the
      first time this process reads it.
    """

    max_lru_cache_entry: int = _opt(0, lo=0)
    max_cache_fds: int = _opt(0, lo=0)
    sync_add: bool = _opt(False)
    direct: bool = _opt(True)
    max_memory_bytes: int = _opt(128 << 20, lo=0)
    max_disk_bytes: int = _opt(0, lo=0)
    verify_every_read: bool = _opt(False)


@dataclass(frozen=True)
class FuseSection:
    """``[fuse]``: kernel cache timeouts in seconds (0 → 1).

    soci-py key ``long_timeouts`` (default true): the FUSE session lets the kernel keep entries, attributes
    and negative lookups for 3600 s, because layers are immutable, and ``attr_timeout`` / ``entry_timeout``
    / ``negative_timeout`` are not used. Set it to false to have those three keys apply (upstream's
    behaviour, 1 s each by default). A separate key because a value of 1 written in the file cannot be told
    from the default (and ``config dump`` writes every key).
    """

    attr_timeout: int = _opt(1, fill=True, lo=0)
    entry_timeout: int = _opt(1, fill=True, lo=0)
    negative_timeout: int = _opt(1, fill=True, lo=0)
    log_fuse_operations: bool = _opt(False)
    long_timeouts: bool = _opt(True)

    #: The kernel cache timeout (seconds) of every kind while ``long_timeouts`` is on.
    LONG_TIMEOUT = 3600.0

    def timeouts(self) -> tuple[float, float, float]:
        """``(attr, entry, negative)`` timeouts in seconds for the FUSE session."""
        if self.long_timeouts:
            return (self.LONG_TIMEOUT,) * 3
        return float(self.attr_timeout), float(self.entry_timeout), float(self.negative_timeout)


@dataclass(frozen=True)
class BackgroundFetchSection:
    """``[background_fetch]``: periods 0 → default; ``max_queue_size`` 0 → 300, negative = unlimited."""

    disable: bool = _opt(False)
    silence_period_msec: int = _opt(30_000, fill=True, lo=0)
    fetch_period_msec: int = _opt(500, fill=True, lo=0)
    max_queue_size: int = _opt(300, fill=True)
    drop_policy: str = _opt("newest", fill=True, choices=("oldest", "newest"))
    emit_metric_period_sec: int = _opt(10, fill=True, lo=0)


@dataclass(frozen=True)
class ContentStoreSection:
    """``[content_store]``: ``type`` ``soci`` or ``containerd``; ``containerd_address`` (``unix://`` cut)."""

    type: str = _opt("soci", fill=True, choices=("soci", "containerd"))
    containerd_address: str = _opt(DEFAULT_CONTAINERD_ADDRESS, fill=True)


@dataclass(frozen=True)
class PrefetchSection:
    """``[prefetch]``: ``max_concurrency`` 0 = unlimited (negative is stored as 0)."""

    enable: bool = _opt(False)
    max_concurrency: int = _opt(0)


@dataclass(frozen=True)
class SociV1Section:
    """``[pull_modes.soci_v1]`` (pre-seeded)."""

    enable: bool = _opt(False)


@dataclass(frozen=True)
class SociV2Section:
    """``[pull_modes.soci_v2]`` (pre-seeded)."""

    enable: bool = _opt(True)


@dataclass(frozen=True)
class DecompressStream:
    """``[pull_modes.parallel_pull_unpack.decompress_streams."<algorithm>"]``: an external decompressor."""

    path: str = _opt("")
    args: tuple[str, ...] = _opt(())


@dataclass(frozen=True)
class ParallelSection:
    """``[pull_modes.parallel_pull_unpack]`` (pre-seeded: explicit values, even -1 or 0, are kept).

    ``-1`` means unbounded for the ``max_*`` counts. ``concurrent_download_chunk_size`` is text such as
    ``"16mb"``; ``""`` or 0 means the whole layer (see :attr:`chunk_size_bytes`).
    """

    max_concurrent_downloads: int = _opt(UNBOUNDED, lo=UNBOUNDED)
    max_concurrent_downloads_per_image: int = _opt(3, lo=UNBOUNDED)
    concurrent_download_chunk_size: str = _opt("", check=_check_size)
    max_concurrent_unpacks: int = _opt(UNBOUNDED, lo=UNBOUNDED)
    max_concurrent_unpacks_per_image: int = _opt(1, lo=UNBOUNDED)
    decompress_streams: Mapping[str, DecompressStream] = _map(DecompressStream)
    discard_unpacked_layers: bool = _opt(False)
    enable: bool = _opt(False)
    experimental_parallel_pull_as_fallback: bool = _opt(False)

    @property
    def chunk_size_bytes(self) -> int:
        """The chunk size in bytes; ``UNBOUNDED`` (-1) for whole layers."""
        return parse_size(self.concurrent_download_chunk_size)


@dataclass(frozen=True)
class PullModesSection:
    """``[pull_modes]``: which ways of pulling an image are on."""

    soci_v1: SociV1Section = field(default_factory=SociV1Section, metadata=_TABLE)
    soci_v2: SociV2Section = field(default_factory=SociV2Section, metadata=_TABLE)
    parallel_pull_unpack: ParallelSection = field(default_factory=ParallelSection, metadata=_TABLE)


@dataclass(frozen=True)
class KubeconfigKeychainSection:
    """``[kubeconfig_keychain]``: credentials from Kubernetes ``dockerconfigjson`` secrets.

    Upstream keys: ``enable_keychain``, ``kubeconfig_path`` ("" = ``$KUBECONFIG``, ``~/.kube/config``, then
    in-cluster). soci-py keys: ``namespaces`` (sync only these; empty = all), ``label_selector`` (sync only
    matching secrets), ``first_sync_wait_sec`` (how long start-up waits for the first complete list before
    going on without it; 0 = do not wait; kept as written).
    """

    enable_keychain: bool = _opt(False)
    kubeconfig_path: str = _opt("")
    namespaces: tuple[str, ...] = _opt((), check=_check_namespaces)
    label_selector: str = _opt("")
    first_sync_wait_sec: float = _opt(5.0, lo=0)


@dataclass(frozen=True)
class CriKeychainSection:
    """``[cri_keychain]``: credentials recorded from CRI ``PullImage`` requests.

    Upstream keys: ``enable_keychain``, ``image_service_path`` (the backend CRI socket; "" → default).
    soci-py keys: ``persist`` (keep recorded credentials across daemon restarts in ``persist_path``, a
    root-only 0600 file rewritten atomically on every change; see ``soci_grpc.keychain.cri``),
    ``persist_path`` (an absolute path; "" → ``/run/soci-snapshotter-grpc/cri-credentials.json``, on /run
    so a reboot forgets it), ``credential_ttl_sec`` (seconds after a pull at which its credentials are
    reported as expired, and dropped from the persisted file at the next start; 0 = unknown).
    """

    enable_keychain: bool = _opt(False)
    image_service_path: str = _opt(DEFAULT_IMAGE_SERVICE_PATH, fill=True)
    persist: bool = _opt(False)
    persist_path: str = _opt(DEFAULT_CRI_PERSIST_PATH, fill=True, check=_check_absolute_path)
    credential_ttl_sec: int = _opt(0, lo=0)


@dataclass(frozen=True)
class MirrorSection:
    """One ``[[resolver.host."<host>".mirrors]]`` entry.

    ``request_timeout_sec``: 0 = the client's timeout, >0 per attempt, <0 none.
    """

    host: str = _opt("", check=_check_mirror_host, required=True)
    insecure: bool = _opt(False)
    request_timeout_sec: int = _opt(0)


@dataclass(frozen=True)
class HostSection:
    """``[resolver.host."<host>"]``: the mirrors tried, in order, for that registry's layer blobs."""

    mirrors: tuple[MirrorSection, ...] = _array(MirrorSection)


@dataclass(frozen=True)
class ResolverSection:
    """``[resolver]``: ``auth_client_ttl_sec`` 0 → 3600, negative = never expire; mirrors per host."""

    host: Mapping[str, HostSection] = _map(HostSection)
    auth_client_ttl_sec: int = _opt(3600, fill=True)
    enable_auth_client_sharing: bool = _opt(False)


@dataclass(frozen=True)
class SnapshotterSection:
    """``[snapshotter]``: ``min_layer_size`` > 0 keeps smaller layers local."""

    min_layer_size: int = _opt(0)
    allow_invalid_mounts_on_restart: bool = _opt(False)


def _self_insecure_hosts(resolver: ResolverSection) -> frozenset[str]:
    """Registries named as their own ``insecure`` mirror: they are reached over plain http for everything
    (manifests, SOCI indexes, zTOCs too), the way an operator declares a plain-http registry that is not on
    loopback::

        [[resolver.host."10.0.0.5:5000".mirrors]]
        host = "10.0.0.5:5000"
        insecure = true
    """
    out = set()
    for host, hc in resolver.host.items():
        for m in hc.mirrors:
            name = m.host.strip().split("://", 1)[-1].split("/", 1)[0]
            if m.insecure and name == host:
                out.add(host)
    return frozenset(out)


@dataclass(frozen=True)
class KeychainSettings:
    """What ``keychain.factory.build_chain`` needs, in the keychain modules' units."""

    docker_config: str  # "" = $DOCKER_CONFIG/config.json, else ~/.docker/config.json
    helper_timeout: float
    cri_enabled: bool
    cri_image_service_path: str
    cri_ttl: float | None
    cri_persist: bool
    kube_enabled: bool
    kubeconfig_path: str
    kube_namespaces: tuple[str, ...]
    kube_label_selector: str
    kube_first_sync_wait: float
    cri_persist_path: str = DEFAULT_CRI_PERSIST_PATH


@dataclass(frozen=True)
class Config:
    """The whole ``config.toml``. ``Config()`` is the default configuration.

    Top-level keys (upstream): see cli-and-config.md §4. soci-py keys: ``docker_config`` (path of the Docker
    config file the Docker keychain reads; "" = ``$DOCKER_CONFIG/config.json``, else
    ``~/.docker/config.json``) and ``credential_helper_timeout_sec`` (seconds a ``docker-credential-*``
    helper may take before it is killed; 0 → 5).

    ``source`` is the file the values came from ("" for defaults); it is not part of equality or of ``dump``.
    """

    # file-system keys (upstream FSConfig)
    http_cache_type: str = _opt("")
    filesystem_cache_type: str = _opt("")
    resolve_result_entry: int = _opt(0, lo=0)
    debug: bool = _opt(False)
    disable_verification: bool = _opt(False)
    max_concurrency: int = _opt(100, fill=True)
    mount_timeout_sec: int = _opt(30, fill=True, lo=0)
    fuse_metrics_emit_wait_duration_sec: int = _opt(60, fill=True, lo=0)
    # the other top-level keys (upstream Config)
    metrics_address: str = _opt("")
    metrics_network: str = _opt("tcp", fill=True, choices=_LISTEN_NETWORKS)
    no_prometheus: bool = _opt(False)
    debug_address: str = _opt("")
    metadata_store: str = _opt("db", fill=True, choices=("db", "db-multi"))
    metadata_db_no_sync: bool = _opt(False)
    metadata_insertion_chunk_size: int = _opt(0, lo=0)
    skip_check_snapshotter_supported: bool = _opt(False)
    # soci-py
    docker_config: str = _opt("")
    credential_helper_timeout_sec: float = _opt(5.0, fill=True, lo=0)
    # tables
    http: HttpSection = field(default_factory=HttpSection, metadata=_TABLE)
    blob: BlobSection = field(default_factory=BlobSection, metadata=_TABLE)
    directory_cache: DirectoryCacheSection = field(default_factory=DirectoryCacheSection, metadata=_TABLE)
    fuse: FuseSection = field(default_factory=FuseSection, metadata=_TABLE)
    background_fetch: BackgroundFetchSection = field(default_factory=BackgroundFetchSection, metadata=_TABLE)
    content_store: ContentStoreSection = field(default_factory=ContentStoreSection, metadata=_TABLE)
    prefetch: PrefetchSection = field(default_factory=PrefetchSection, metadata=_TABLE)
    pull_modes: PullModesSection = field(default_factory=PullModesSection, metadata=_TABLE)
    kubeconfig_keychain: KubeconfigKeychainSection = field(
        default_factory=KubeconfigKeychainSection, metadata=_TABLE
    )
    cri_keychain: CriKeychainSection = field(default_factory=CriKeychainSection, metadata=_TABLE)
    resolver: ResolverSection = field(default_factory=ResolverSection, metadata=_TABLE)
    snapshotter: SnapshotterSection = field(default_factory=SnapshotterSection, metadata=_TABLE)

    source: str = field(default="", compare=False, metadata={"kind": "skip"})

    def registry_config(self) -> reference.RegistryConfig:
        """The registry client's ``[http]``/``[blob]``/``[resolver]`` settings."""
        h, b, r = self.http, self.blob, self.resolver
        return reference.RegistryConfig(
            http=reference.HttpConfig(
                max_retries=h.MaxRetries,
                min_wait_msec=h.MinWaitMsec,
                max_wait_msec=h.MaxWaitMsec,
                dial_timeout_msec=h.DialTimeoutMsec,
                response_header_timeout_msec=h.ResponseHeaderTimeoutMsec,
                request_timeout_msec=h.RequestTimeoutMsec,
            ),
            blob=reference.BlobConfig(
                max_retries=b.max_retries,
                min_wait_msec=b.min_wait_msec,
                max_wait_msec=b.max_wait_msec,
                fetching_timeout_sec=b.fetching_timeout_sec,
                valid_interval=b.valid_interval,
                check_always=b.check_always,
                force_single_range_mode=b.force_single_range_mode,
                max_span_verification_retries=b.max_span_verification_retries,
            ),
            resolver=reference.ResolverConfig(
                plain_http_hosts=_self_insecure_hosts(r),
                auth_client_ttl_sec=r.auth_client_ttl_sec,
                enable_auth_client_sharing=r.enable_auth_client_sharing,
                mirrors=MappingProxyType(
                    {
                        host: tuple(
                            reference.MirrorConfig(m.host, m.insecure, m.request_timeout_sec)
                            for m in hc.mirrors
                        )
                        for host, hc in r.host.items()
                    }
                ),
            ),
        )

    def keychain_settings(self) -> KeychainSettings:
        """The credential sources' settings (see ``soci_grpc.keychain.factory``)."""
        cri, kube = self.cri_keychain, self.kubeconfig_keychain
        return KeychainSettings(
            docker_config=self.docker_config,
            helper_timeout=self.credential_helper_timeout_sec,
            cri_enabled=cri.enable_keychain,
            cri_image_service_path=cri.image_service_path,
            cri_ttl=float(cri.credential_ttl_sec) if cri.credential_ttl_sec > 0 else None,
            cri_persist=cri.persist,
            kube_enabled=kube.enable_keychain,
            kubeconfig_path=kube.kubeconfig_path,
            kube_namespaces=kube.namespaces,
            kube_label_selector=kube.label_selector,
            kube_first_sync_wait=kube.first_sync_wait_sec,
            cri_persist_path=cri.persist_path,
        )


# --------------------------------------------------------------------------------------------------------
# where keys are in the source text


def _read_simple_key(text: str, i: int) -> tuple[str, int]:
    c = text[i]
    if c in "\"'":
        end = i + 1
        while end < len(text) and text[end] != c:
            end += 2 if (c == '"' and text[end] == "\\") else 1
        raw = text[i : end + 1]
        return tomllib.loads(f"k = {raw}")["k"], end + 1
    m = re.compile(r"[A-Za-z0-9_-]+").match(text, i)
    if m is None:
        raise ValueError("not a key")
    return m.group(0), m.end()


def _read_key(text: str, i: int) -> tuple[tuple[str, ...], int]:
    """A dotted key starting at ``i``; returns its parts and the index after it (and trailing blanks)."""
    parts: list[str] = []
    while True:
        while text[i] in " \t":
            i += 1
        part, i = _read_simple_key(text, i)
        parts.append(part)
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return tuple(parts), i


def _skip_string(text: str, i: int, line: int) -> tuple[int, int]:
    q = text[i]
    if text.startswith(q * 3, i):
        j = i + 3
        while j < len(text):
            if q == '"' and text[j] == "\\":
                line += text[j + 1] == "\n"
                j += 2
                continue
            if text.startswith(q * 3, j):
                j += 3
                while j < len(text) and text[j] == q:  # up to two quotes may belong to the content
                    j += 1
                return j, line
            line += text[j] == "\n"
            j += 1
        return j, line
    j = i + 1
    while j < len(text) and text[j] != q:
        j += 2 if (q == '"' and text[j] == "\\") else 1
    return j + 1, line


def _skip_value(text: str, i: int, line: int) -> tuple[int, int]:
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i, line = _skip_string(text, i, line)
            if depth == 0:
                return i, line
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1, line
        elif c == "#":
            if depth == 0:
                return i, line
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif c == "\n":
            if depth == 0:
                return i, line
            line += 1
        i += 1
    return i, line


def key_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Map every key path written in ``text`` (valid TOML) to its line (1-based).

    Paths are the parsed document's: table names and keys, with an index after the name of an array of
    tables (``("resolver", "host", "docker.io", "mirrors", 0, "host")``). Keys inside inline tables and
    arrays are not listed; callers fall back to the enclosing key.
    """
    lines: dict[tuple[str | int, ...], int] = {}
    counts: dict[tuple[str | int, ...], int] = {}
    table: tuple[str | int, ...] = ()
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\n":
            line += 1
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "[":
            array = text.startswith("[[", i)
            parts, i = _read_key(text, i + (2 if array else 1))
            i += 2 if array else 1
            resolved: list[str | int] = []
            for k, part in enumerate(parts):
                resolved.append(part)
                here = tuple(resolved)
                if array and k == len(parts) - 1:
                    lines.setdefault(here, line)
                    resolved.append(counts.get(here, 0))
                    counts[here] = counts.get(here, 0) + 1
                elif here in counts:
                    resolved.append(counts[here] - 1)
            table = tuple(resolved)
            lines.setdefault(table, line)
        else:
            parts, i = _read_key(text, i)
            for k in range(1, len(parts) + 1):
                lines.setdefault(table + parts[:k], line)
            i, line = _skip_value(text, i + 1, line)  # past "="
    return lines


# --------------------------------------------------------------------------------------------------------
# decoding


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return _TYPE_NAMES.get(type(value), "a date/time")


def _show(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + (p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"')
    return out


class _Decoder:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        try:
            self.lines = key_lines(text)
        except (ValueError, IndexError):  # a gap in the scanner must not hide the real message
            log.debug("config file %s: cannot locate keys; messages will lack line numbers", source)
            self.lines = {}

    def line_of(self, path: tuple[str | int, ...]) -> int:
        for k in range(len(path), 0, -1):
            if path[:k] in self.lines:
                return self.lines[path[:k]]
        return 0

    def where(self, path: tuple[str | int, ...]) -> str:
        line = self.line_of(path)
        return f"{self.source}, line {line}" if line else self.source

    def fail(self, path: tuple[str | int, ...], problem: str) -> ConfigError:
        line = self.line_of(path)
        at = f"line {line}: " if line else ""
        return ConfigError(
            f'config file at "{self.source}": failed to parse config: {at}{_show(path)}: {problem}',
            path=self.source,
            line=line,
            key=_show(path),
        )

    def table(self, cls: type, data: Any, path: tuple[str | int, ...]) -> Any:
        if not isinstance(data, dict):
            raise self.fail(path, f"expected a table, got {_type_name(data)}")
        fields = [f for f in dataclasses.fields(cls) if f.metadata.get("kind") != "skip"]
        used: set[str] = set()
        kwargs: dict[str, Any] = {}
        for f in fields:
            name = _toml_key(f)
            if name in data:
                key = name
            else:
                matches = [k for k in data if k.lower() == name.lower() and k not in used]
                if len(matches) > 1:
                    raise self.fail((*path, matches[1]), f"the same key as {matches[0]!r} (case differs)")
                key = matches[0] if matches else None
            if key is None:
                kind = f.metadata["kind"]
                if kind == "table":  # decoded from nothing, so that its seeds apply
                    kwargs[f.name] = self.table(f.default_factory, {}, (*path, name))
                elif f.metadata.get("required"):
                    raise self.fail(path, f"{name} is required")
                elif f.metadata.get("seed") is not None:
                    kwargs[f.name] = f.metadata["seed"]
                continue
            used.add(key)
            kwargs[f.name] = self.value(f, data[key], (*path, key))
        names = {_toml_key(f).lower(): _toml_key(f) for f in fields}
        for key in data:
            if key not in used:
                kind = "table" if isinstance(data[key], dict) else "key"
                why = ""
                if key.lower() in names:
                    why = f" (another spelling of {names[key.lower()]}, which is set with its exact name)"
                log.warning(
                    "config file %s: unknown %s %s ignored%s",
                    self.where((*path, key)),
                    kind,
                    _show((*path, key)),
                    why,
                )
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - the schema and kwargs come from the same fields
            raise self.fail(path, str(exc)) from None

    def value(self, f: dataclasses.Field[Any], raw: Any, path: tuple[str | int, ...]) -> Any:
        meta = f.metadata
        kind = meta["kind"]
        if kind == "table":
            return self.table(f.default_factory, raw, path)
        if kind == "map":
            if not isinstance(raw, dict):
                raise self.fail(path, f"expected a table, got {_type_name(raw)}")
            return MappingProxyType({k: self.table(meta["cls"], v, (*path, k)) for k, v in raw.items()})
        if kind == "array":
            if not isinstance(raw, list):
                raise self.fail(path, f"expected an array of tables, got {_type_name(raw)}")
            return tuple(self.table(meta["cls"], v, (*path, n)) for n, v in enumerate(raw))
        value = self.scalar(kind, raw, path)
        if meta["fill"] and kind != "bool" and value in (0, ""):
            value = f.default
        lo = meta["lo"]
        if lo is not None and value < lo:
            raise self.fail(path, f"must be {lo:g} or more, got {value!r}")
        choices = meta["choices"]
        if choices is not None and value not in choices:
            if f.name == "drop_policy":
                problem = f'background_fetch.drop_policy must be "oldest" or "newest", got "{value}"'
            else:
                problem = "must be one of " + ", ".join(repr(c) for c in choices) + f", got {value!r}"
            raise self.fail(path, problem)
        check = meta["check"]
        if check is not None:
            problem = check(value)
            if problem:
                raise self.fail(path, problem)
        return value

    def scalar(self, kind: str, raw: Any, path: tuple[str | int, ...]) -> Any:
        if kind == "bool":
            if type(raw) is not bool:
                raise self.fail(path, f"expected a boolean, got {_type_name(raw)}")
            return raw
        if kind == "int":
            if type(raw) is not int:
                raise self.fail(path, f"expected an integer, got {_type_name(raw)}")
            if not _INT64_MIN <= raw <= _INT64_MAX:
                raise self.fail(path, f"integer {raw} does not fit in 64 bits")
            return raw
        if kind == "float":
            if type(raw) not in (int, float):
                raise self.fail(path, f"expected a number of seconds, got {_type_name(raw)}")
            if not math.isfinite(raw):
                raise self.fail(path, f"expected a finite number, got {raw!r}")
            return float(raw)
        if kind == "str":
            if type(raw) is not str:
                raise self.fail(path, f"expected a string, got {_type_name(raw)}")
            return raw
        if kind == "strlist":
            if type(raw) is not list or any(type(v) is not str for v in raw):
                raise self.fail(path, f"expected an array of strings, got {_type_name(raw)}")
            return tuple(raw)
        raise AssertionError(kind)  # pragma: no cover


def _finish(cfg: Config) -> Config:
    """The rules that involve more than one key."""
    blob = cfg.blob
    blob = dataclasses.replace(
        blob,
        max_retries=blob.max_retries or cfg.http.MaxRetries,
        min_wait_msec=blob.min_wait_msec or cfg.http.MinWaitMsec,
        max_wait_msec=blob.max_wait_msec or cfg.http.MaxWaitMsec,
        valid_interval=0 if blob.check_always else blob.valid_interval,
    )
    store = cfg.content_store
    if store.containerd_address.startswith("unix://"):
        # a bare "unix://" names no socket: the default, as an empty value does
        path = store.containerd_address[len("unix://") :] or DEFAULT_CONTAINERD_ADDRESS
        store = dataclasses.replace(store, containerd_address=path)
    prefetch = cfg.prefetch
    if prefetch.max_concurrency < 0:
        prefetch = dataclasses.replace(prefetch, max_concurrency=0)
    return dataclasses.replace(cfg, blob=blob, content_store=store, prefetch=prefetch)


def _syntax_error(source: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    msg = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)$", msg)
    if m is not None:
        line, where, problem = int(m.group(1)), f"column {m.group(2)}", msg[: m.start()].strip()
    elif msg.endswith("(at end of document)"):
        line = max(1, len(text.rstrip().splitlines()))
        where, problem = "at the end of the file", msg[: -len("(at end of document)")].strip()
    else:
        return ConfigError(f'failed to load config file "{source}": {msg}', path=source)
    lines = text.splitlines()
    key = ""
    if 0 < line <= len(lines):
        km = re.match(r"\s*([A-Za-z0-9_.\"' -]+?)\s*=", lines[line - 1])
        if km:
            key = km.group(1).strip()
            for prev in reversed(lines[: line - 1]):
                hm = re.match(r"\s*\[\[?\s*(.+?)\s*\]\]?\s*(#.*)?$", prev)
                if hm:
                    key = f"{hm.group(1)}.{key}"
                    break
    near = f" (key {key})" if key else ""
    return ConfigError(
        f'failed to load config file "{source}": line {line}, {where}{near}: {problem}',
        path=source,
        line=line,
        key=key,
    )


def parse(text: str, source: str = "<config>") -> Config:
    """Parse config text; ``source`` names it in messages.

    Raises:
        ConfigError: malformed TOML, a wrong type, a value out of range.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(source, text, exc) from None
    cfg = _finish(_Decoder(source, text).table(Config, data, ()))
    return dataclasses.replace(cfg, source=source)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path`` (default ``/etc/soci-snapshotter-grpc/config.toml``).

    The default path missing gives the defaults; any other path missing is an error.

    Raises:
        ConfigError: naming the file (and line and key when the content is at fault).
    """
    p = str(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        with open(p, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f'failed to open config file "{p}": not a regular file', path=p)
            raw = f.read()
    except FileNotFoundError as exc:
        if p == DEFAULT_CONFIG_PATH:
            log.debug("no config file at %s; using defaults", p)
            return Config()
        raise ConfigError(f'failed to open config file "{p}": {exc.strerror}', path=p) from None
    except IsADirectoryError:
        raise ConfigError(f'failed to open config file "{p}": is a directory', path=p) from None
    except OSError as exc:
        raise ConfigError(f'failed to open config file "{p}": {exc.strerror}', path=p) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f'failed to load config file "{p}": line {line}: not UTF-8 text', path=p, line=line
        ) from None
    return parse(text, p)


# --------------------------------------------------------------------------------------------------------
# checks made when the file system starts


def check_startup(cfg: Config) -> None:
    """The checks upstream makes when the file system starts (not at load time; they touch the disk).

    * parallel pull/unpack (as the primary mode or the fallback) needs ``content_store.type =
      "containerd"`` unless ``discard_unpacked_layers`` is set;
    * each ``decompress_streams`` path must be an executable regular file (symlinks resolved) whose path
      has none of ``#%{}\\|;&$<>``; algorithms other than gzip and zstd are only warned about.

    Raises:
        ConfigError: naming the key at fault.
    """
    src = cfg.source or "<defaults>"
    par = cfg.pull_modes.parallel_pull_unpack

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f'config file at "{src}": {key}: {problem}', path=src, key=key)

    if (
        (par.enable or par.experimental_parallel_pull_as_fallback)
        and cfg.content_store.type != "containerd"
        and not par.discard_unpacked_layers
    ):
        raise fail(
            "pull_modes.parallel_pull_unpack",
            'parallel pull/unpack needs content_store.type = "containerd" unless discard_unpacked_layers '
            "is true",
        )
    for alg, stream in par.decompress_streams.items():
        key = f"pull_modes.parallel_pull_unpack.decompress_streams.{alg}"
        if alg not in _DECOMPRESS_ALGORITHMS:
            log.warning("%s: unknown decompression algorithm %r ignored (known: gzip, zstd)", key, alg)
            continue
        if not stream.path:
            raise fail(key + ".path", "a path is required")
        if _BAD_PATH_CHARS & set(stream.path):
            raise fail(key + ".path", f"{stream.path!r} contains one of {''.join(sorted(_BAD_PATH_CHARS))}")
        real = Path(stream.path).resolve()
        try:
            st = real.stat()
        except OSError as exc:
            raise fail(key + ".path", f"{stream.path!r}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or not os.access(real, os.X_OK):
            raise fail(key + ".path", f"{stream.path!r} is not an executable regular file")


# --------------------------------------------------------------------------------------------------------
# writing TOML


def _bare(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _basic_string(key)


def _basic_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _string(s: str) -> str:
    if "'" in s or any((ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F for ch in s):
        return _basic_string(s)
    return f"'{s}'"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__}")  # pragma: no cover


class _Writer:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.last_header: tuple[str, ...] | None = None  # path of the header just written, if nothing since

    def header(self, path: tuple[str, ...], array: bool) -> None:
        """A table header; a blank line before it unless it directly follows its parent's header."""
        last = self.last_header
        if self.out and not (last is not None and path[: len(last)] == last):
            self.out.append("")
        name = ".".join(_bare(p) for p in path)
        self.out.append("  " * (len(path) - 1) + (f"[[{name}]]" if array else f"[{name}]"))
        self.last_header = path

    def table(self, obj: Any, path: tuple[str, ...]) -> None:
        indent = "  " * len(path)
        nested: list[tuple[dataclasses.Field[Any], Any]] = []
        for f in dataclasses.fields(obj):
            kind = f.metadata.get("kind")
            if kind == "skip":
                continue
            value = getattr(obj, f.name)
            if kind in ("table", "map", "array"):
                nested.append((f, value))
                continue
            self.out.append(f"{indent}{_bare(_toml_key(f))} = {_scalar(value)}")
            self.last_header = None
        for f, value in nested:
            sub = (*path, _toml_key(f))
            kind = f.metadata["kind"]
            if kind == "table":
                self.header(sub, False)
                self.table(value, sub)
            elif kind == "map":
                for name, item in value.items():
                    self.entry(item, (*sub, name))
            else:
                for item in value:
                    self.header(sub, True)
                    self.table(item, sub)

    def entry(self, obj: Any, path: tuple[str, ...]) -> None:
        """A map entry: always its own header, so an entry with nothing in it survives a round trip."""
        self.header(path, False)
        self.table(obj, path)


def dump(cfg: Config) -> str:
    """The configuration as TOML text (``config dump``); :func:`parse` reads it back to an equal Config."""
    w = _Writer()
    w.table(cfg, ())
    return "\n".join(w.out) + "\n"


def default_toml() -> str:
    """The default configuration as TOML text (``config default``)."""
    return dump(Config())
