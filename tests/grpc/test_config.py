"""``soci_grpc.config`` (keys, defaults, the two default rules, errors, dump/parse) and the chain factory."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soci_fs.errors import InvalidArgument, Unauthenticated
from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_grpc import config as c
from soci_grpc.keychain.factory import build_chain
from tests.harness.kube_api import KubeAPIServer, basic_auth, dockerconfigjson
from tests.harness.registry import (  # noqa: F401  (pytest finds fixtures by name)
    PASSWORD,
    USER,
    RawPusher,
    Registry,
    harness_dir,
)
from tests.harness.registry import htpasswd_registry as htpasswd_registry


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --------------------------------------------------------------------------------------------------------
# defaults

DEFAULTS = {
    "http_cache_type": "",
    "filesystem_cache_type": "",
    "resolve_result_entry": 0,
    "debug": False,
    "disable_verification": False,
    "max_concurrency": 100,
    "mount_timeout_sec": 30,
    "fuse_metrics_emit_wait_duration_sec": 60,
    "metrics_address": "",
    "metrics_network": "tcp",
    "no_prometheus": False,
    "debug_address": "",
    "metadata_store": "db",
    "metadata_db_no_sync": False,
    "metadata_insertion_chunk_size": 0,
    "skip_check_snapshotter_supported": False,
    "docker_config": "",
    "credential_helper_timeout_sec": 5.0,
    "http.DialTimeoutMsec": 3000,
    "http.ResponseHeaderTimeoutMsec": 3000,
    "http.RequestTimeoutMsec": 300_000,
    "http.MaxRetries": 8,
    "http.MinWaitMsec": 30,
    "http.MaxWaitMsec": 300_000,
    "blob.valid_interval": 60,
    "blob.fetching_timeout_sec": 300,
    "blob.max_retries": 8,
    "blob.min_wait_msec": 30,
    "blob.max_wait_msec": 300_000,
    "blob.check_always": False,
    "blob.force_single_range_mode": False,
    "blob.max_span_verification_retries": 0,
    "directory_cache.max_lru_cache_entry": 0,
    "directory_cache.max_cache_fds": 0,
    "directory_cache.sync_add": False,
    "directory_cache.direct": True,
    "directory_cache.max_memory_bytes": 128 << 20,
    "directory_cache.max_disk_bytes": 0,
    "directory_cache.verify_every_read": False,
    "fuse.attr_timeout": 1,
    "fuse.entry_timeout": 1,
    "fuse.negative_timeout": 1,
    "fuse.log_fuse_operations": False,
    "fuse.long_timeouts": True,
    "background_fetch.disable": False,
    "background_fetch.silence_period_msec": 30_000,
    "background_fetch.fetch_period_msec": 500,
    "background_fetch.max_queue_size": 300,
    "background_fetch.drop_policy": "newest",
    "background_fetch.emit_metric_period_sec": 10,
    "content_store.type": "soci",
    "content_store.containerd_address": "/run/containerd/containerd.sock",
    "prefetch.enable": False,
    "prefetch.max_concurrency": 0,
    "pull_modes.soci_v1.enable": False,
    "pull_modes.soci_v2.enable": True,
    "pull_modes.parallel_pull_unpack.max_concurrent_downloads": -1,
    "pull_modes.parallel_pull_unpack.max_concurrent_downloads_per_image": 3,
    "pull_modes.parallel_pull_unpack.concurrent_download_chunk_size": "",
    "pull_modes.parallel_pull_unpack.max_concurrent_unpacks": -1,
    "pull_modes.parallel_pull_unpack.max_concurrent_unpacks_per_image": 1,
    "pull_modes.parallel_pull_unpack.decompress_streams": {},
    "pull_modes.parallel_pull_unpack.discard_unpacked_layers": False,
    "pull_modes.parallel_pull_unpack.enable": False,
    "pull_modes.parallel_pull_unpack.experimental_parallel_pull_as_fallback": False,
    "kubeconfig_keychain.enable_keychain": False,
    "kubeconfig_keychain.kubeconfig_path": "",
    "kubeconfig_keychain.namespaces": (),
    "kubeconfig_keychain.label_selector": "",
    "kubeconfig_keychain.first_sync_wait_sec": 5.0,
    "cri_keychain.enable_keychain": False,
    "cri_keychain.image_service_path": "/run/containerd/containerd.sock",
    "cri_keychain.persist": False,
    "cri_keychain.persist_path": "/run/soci-snapshotter-grpc/cri-credentials.json",
    "cri_keychain.credential_ttl_sec": 0,
    "resolver.host": {},
    "resolver.auth_client_ttl_sec": 3600,
    "resolver.enable_auth_client_sharing": False,
    "snapshotter.min_layer_size": 0,
    "snapshotter.allow_invalid_mounts_on_restart": False,
}


def leaf_keys(cls: type = c.Config, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("kind") == "skip":
            continue
        if f.metadata.get("kind") == "table":
            out += leaf_keys(f.default_factory, prefix + f.name + ".")  # type: ignore[arg-type]
        else:
            out.append(prefix + f.name)
    return out


def test_every_key_has_a_tested_default() -> None:
    assert sorted(leaf_keys()) == sorted(DEFAULTS)


@pytest.mark.parametrize("text", ["", "# nothing\n", "[http]\n[blob]\n[pull_modes]\n"])
@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_defaults(key: str, text: str) -> None:
    assert get(c.Config(), key) == DEFAULTS[key]
    assert get(c.parse(text), key) == DEFAULTS[key]


def test_default_toml_is_upstreams_shipped_file_plus_our_keys() -> None:
    assert c.default_toml() == DEFAULT_TOML


DEFAULT_TOML = """\
http_cache_type = ''
filesystem_cache_type = ''
resolve_result_entry = 0
debug = false
disable_verification = false
max_concurrency = 100
mount_timeout_sec = 30
fuse_metrics_emit_wait_duration_sec = 60
metrics_address = ''
metrics_network = 'tcp'
no_prometheus = false
debug_address = ''
metadata_store = 'db'
metadata_db_no_sync = false
metadata_insertion_chunk_size = 0
skip_check_snapshotter_supported = false
docker_config = ''
credential_helper_timeout_sec = 5.0

[http]
  DialTimeoutMsec = 3000
  ResponseHeaderTimeoutMsec = 3000
  RequestTimeoutMsec = 300000
  MaxRetries = 8
  MinWaitMsec = 30
  MaxWaitMsec = 300000

[blob]
  valid_interval = 60
  fetching_timeout_sec = 300
  max_retries = 8
  min_wait_msec = 30
  max_wait_msec = 300000
  check_always = false
  force_single_range_mode = false
  max_span_verification_retries = 0

[directory_cache]
  max_lru_cache_entry = 0
  max_cache_fds = 0
  sync_add = false
  direct = true
  max_memory_bytes = 134217728
  max_disk_bytes = 0
  verify_every_read = false

[fuse]
  attr_timeout = 1
  entry_timeout = 1
  negative_timeout = 1
  log_fuse_operations = false
  long_timeouts = true

[background_fetch]
  disable = false
  silence_period_msec = 30000
  fetch_period_msec = 500
  max_queue_size = 300
  drop_policy = 'newest'
  emit_metric_period_sec = 10

[content_store]
  type = 'soci'
  containerd_address = '/run/containerd/containerd.sock'

[prefetch]
  enable = false
  max_concurrency = 0

[pull_modes]
  [pull_modes.soci_v1]
    enable = false

  [pull_modes.soci_v2]
    enable = true

  [pull_modes.parallel_pull_unpack]
    max_concurrent_downloads = -1
    max_concurrent_downloads_per_image = 3
    concurrent_download_chunk_size = ''
    max_concurrent_unpacks = -1
    max_concurrent_unpacks_per_image = 1
    discard_unpacked_layers = false
    enable = false
    experimental_parallel_pull_as_fallback = false

[kubeconfig_keychain]
  enable_keychain = false
  kubeconfig_path = ''
  namespaces = []
  label_selector = ''
  first_sync_wait_sec = 5.0

[cri_keychain]
  enable_keychain = false
  image_service_path = '/run/containerd/containerd.sock'
  persist = false
  persist_path = '/run/soci-snapshotter-grpc/cri-credentials.json'
  credential_ttl_sec = 0

[resolver]
  auth_client_ttl_sec = 3600
  enable_auth_client_sharing = false

[snapshotter]
  min_layer_size = 0
  allow_invalid_mounts_on_restart = false
"""


# --------------------------------------------------------------------------------------------------------
# the two default rules

RULES = [
    # "filled after decoding": an explicit 0 / "" means the default
    ("max_concurrency = 0", "max_concurrency", 100),
    ("mount_timeout_sec = 0", "mount_timeout_sec", 30),
    ("fuse_metrics_emit_wait_duration_sec = 0", "fuse_metrics_emit_wait_duration_sec", 60),
    ("metrics_network = ''", "metrics_network", "tcp"),
    ("metadata_store = ''", "metadata_store", "db"),
    ("credential_helper_timeout_sec = 0", "credential_helper_timeout_sec", 5.0),
    ("[http]\nMaxRetries = 0\nDialTimeoutMsec = 0", "http.MaxRetries", 8),
    ("[http]\nDialTimeoutMsec = 0", "http.DialTimeoutMsec", 3000),
    ("[http]\nRequestTimeoutMsec = 0", "http.RequestTimeoutMsec", 300_000),
    ("[blob]\nvalid_interval = 0", "blob.valid_interval", 60),
    ("[blob]\nfetching_timeout_sec = 0", "blob.fetching_timeout_sec", 300),
    ("[fuse]\nattr_timeout = 0", "fuse.attr_timeout", 1),
    ("[fuse]\nnegative_timeout = 0", "fuse.negative_timeout", 1),
    ("[background_fetch]\nsilence_period_msec = 0", "background_fetch.silence_period_msec", 30_000),
    ("[background_fetch]\nfetch_period_msec = 0", "background_fetch.fetch_period_msec", 500),
    ("[background_fetch]\nmax_queue_size = 0", "background_fetch.max_queue_size", 300),
    ("[background_fetch]\ndrop_policy = ''", "background_fetch.drop_policy", "newest"),
    ("[background_fetch]\nemit_metric_period_sec = 0", "background_fetch.emit_metric_period_sec", 10),
    ("[content_store]\ntype = ''", "content_store.type", "soci"),
    (
        "[content_store]\ncontainerd_address = ''",
        "content_store.containerd_address",
        c.DEFAULT_CONTAINERD_ADDRESS,
    ),
    (
        "[cri_keychain]\nimage_service_path = ''",
        "cri_keychain.image_service_path",
        c.DEFAULT_IMAGE_SERVICE_PATH,
    ),
    ("[resolver]\nauth_client_ttl_sec = 0", "resolver.auth_client_ttl_sec", 3600),
    # [blob] retry settings: 0 or absent -> the [http] value
    ("[http]\nMaxRetries = 2\n[blob]\nmax_retries = 0", "blob.max_retries", 2),
    ("[http]\nMinWaitMsec = 7", "blob.min_wait_msec", 7),
    ("[http]\nMaxWaitMsec = 9\n[blob]\nmax_wait_msec = 11", "blob.max_wait_msec", 11),
    ("[blob]\nmax_retries = 4", "http.MaxRetries", 8),
    # rules across keys
    ("[blob]\ncheck_always = true\nvalid_interval = 5", "blob.valid_interval", 0),
    ("[content_store]\ncontainerd_address = 'unix:///x.sock'", "content_store.containerd_address", "/x.sock"),
    ("[prefetch]\nmax_concurrency = -4", "prefetch.max_concurrency", 0),
    # "pre-seeded": an explicit 0 / false / -1 is kept
    ("max_concurrency = -1", "max_concurrency", -1),
    ("resolve_result_entry = 0", "resolve_result_entry", 0),
    ("[directory_cache]\ndirect = false", "directory_cache.direct", False),
    ("[directory_cache]\nmax_lru_cache_entry = 0", "directory_cache.max_lru_cache_entry", 0),
    ("[pull_modes.soci_v2]\nenable = false", "pull_modes.soci_v2.enable", False),
    ("[pull_modes.soci_v1]\nenable = true", "pull_modes.soci_v1.enable", True),
    (
        "[pull_modes.parallel_pull_unpack]\nmax_concurrent_downloads_per_image = 0",
        "pull_modes.parallel_pull_unpack.max_concurrent_downloads_per_image",
        0,
    ),
    (
        "[pull_modes.parallel_pull_unpack]\nmax_concurrent_unpacks_per_image = -1",
        "pull_modes.parallel_pull_unpack.max_concurrent_unpacks_per_image",
        -1,
    ),
    (
        "[pull_modes.parallel_pull_unpack]\nmax_concurrent_downloads = 0",
        "pull_modes.parallel_pull_unpack.max_concurrent_downloads",
        0,
    ),
    ("[blob]\nmax_span_verification_retries = -1", "blob.max_span_verification_retries", -1),
    ("[background_fetch]\nmax_queue_size = -1", "background_fetch.max_queue_size", -1),
    ("[resolver]\nauth_client_ttl_sec = -1", "resolver.auth_client_ttl_sec", -1),
    ("[kubeconfig_keychain]\nfirst_sync_wait_sec = 0", "kubeconfig_keychain.first_sync_wait_sec", 0.0),
    ("[kubeconfig_keychain]\nfirst_sync_wait_sec = 1", "kubeconfig_keychain.first_sync_wait_sec", 1.0),
    ("[background_fetch]\ndisable = true", "background_fetch.disable", True),
    ("[snapshotter]\nmin_layer_size = 0", "snapshotter.min_layer_size", 0),
]


@pytest.mark.parametrize(("text", "key", "want"), RULES)
def test_default_rules(text: str, key: str, want: Any) -> None:
    cfg = c.parse(text)
    assert get(cfg, key) == want
    assert c.parse(c.dump(cfg)) == cfg


def test_effective_values_used_later() -> None:
    cfg = c.parse(
        "[blob]\nmax_span_verification_retries = -2\n[pull_modes.parallel_pull_unpack]\n"
        "concurrent_download_chunk_size = '1.5 KB'\n"
    )
    assert cfg.blob.span_verification_retries == 3
    assert cfg.pull_modes.parallel_pull_unpack.chunk_size_bytes == 1536


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("", -1),
        ("0", -1),
        ("0.0mb", -1),
        ("10", 10),
        ("10b", 10),
        ("1kb", 1024),
        ("2MB", 2 << 20),
        ("1.5gb", 3 << 29),
        (" 3 Kb ", 3072),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert c.parse_size(text) == size


@pytest.mark.parametrize("text", ["1tb", "-1", "mb", "1.mb", "1 k b", "0x10"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size format"):
        c.parse_size(text)


# --------------------------------------------------------------------------------------------------------
# case-insensitive keys, unknown keys


def test_key_matching_falls_back_to_case_insensitive() -> None:
    cfg = c.parse(
        "MAX_CONCURRENCY = 7\n[HTTP]\nmaxretries = 3\n[Blob]\nCheck_Always = true\n"
        "[pull_modes.SOCI_V2]\nEnable = false\n"
    )
    assert cfg.max_concurrency == 7
    assert cfg.http.MaxRetries == 3 and cfg.blob.max_retries == 3
    assert cfg.blob.check_always and cfg.blob.valid_interval == 0
    assert cfg.pull_modes.soci_v2.enable is False


@pytest.mark.expect_log
def test_exact_key_wins_and_the_other_spelling_warns(caplog: pytest.LogCaptureFixture) -> None:
    cfg = c.parse("[http]\nmaxretries = 2\nMaxRetries = 5\n", "f.toml")
    assert cfg.http.MaxRetries == 5
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert msgs == [
        "config file f.toml, line 2: unknown key http.maxretries ignored (another spelling of MaxRetries, "
        "which is set with its exact name)"
    ]


@pytest.mark.expect_log
def test_unknown_keys_and_tables_warn_with_file_and_line(caplog: pytest.LogCaptureFixture) -> None:
    text = (
        "debug = true\n"
        "typo_key = 1\n"
        "[fuse]\n"
        "note = '''\n"
        "a [table] = in a string\n"
        "'''\n"
        "attr_timeout = 2\n"
        "[bogus]\n"
        "x = 1\n"
        "[[resolver.host.'r.example'.mirrors]]\n"
        "host = 'm.example'\n"
        "colour = 'blue'\n"
    )
    cfg = c.parse(text, "/etc/x.toml")
    assert cfg.debug and cfg.fuse.attr_timeout == 2
    assert cfg.resolver.host["r.example"].mirrors[0].host == "m.example"
    msgs = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert msgs == sorted(
        [
            "config file /etc/x.toml, line 2: unknown key typo_key ignored",
            "config file /etc/x.toml, line 4: unknown key fuse.note ignored",
            "config file /etc/x.toml, line 8: unknown table bogus ignored",
            "config file /etc/x.toml, line 12: unknown key "
            'resolver.host."r.example".mirrors[0].colour ignored',
        ]
    )


def test_no_warning_for_a_clean_file() -> None:
    c.parse(DEFAULT_TOML)  # the autouse fixture fails the test on any WARNING


# --------------------------------------------------------------------------------------------------------
# errors name the file, the line and the key

ERRORS = [
    ("[http]\nMaxRetries = 'x'\n", 2, "http.MaxRetries", "expected an integer, got a string"),
    ("[http]\n\n\nMaxRetries = 1.5\n", 4, "http.MaxRetries", "expected an integer, got a float"),
    ("debug = 1\n", 1, "debug", "expected a boolean, got an integer"),
    ("max_concurrency = true\n", 1, "max_concurrency", "expected an integer, got a boolean"),
    ("metrics_address = 5\n", 1, "metrics_address", "expected a string, got an integer"),
    ("docker_config = 1979-05-27\n", 1, "docker_config", "expected a string, got a date/time"),
    ("http = 3\n", 1, "http", "expected a table, got an integer"),
    ("[fuse]\nattr_timeout = [1]\n", 2, "fuse.attr_timeout", "expected an integer, got an array"),
    ("[http]\nMaxRetries = -1\n", 2, "http.MaxRetries", "must be 0 or more, got -1"),
    ("[http]\nmaxretries = 1\nMAXRETRIES = 2\n", 3, "http.MAXRETRIES", "the same key as 'maxretries'"),
    ("mount_timeout_sec = -5\n", 1, "mount_timeout_sec", "must be 0 or more"),
    ("[blob]\nmax_retries = -1\n", 2, "blob.max_retries", "must be 0 or more"),
    ("[fuse]\nentry_timeout = -1\n", 2, "fuse.entry_timeout", "must be 0 or more"),
    ("credential_helper_timeout_sec = -0.5\n", 1, "credential_helper_timeout_sec", "must be 0 or more"),
    ("credential_helper_timeout_sec = inf\n", 1, "credential_helper_timeout_sec", "finite"),
    ("resolve_result_entry = 9223372036854775808\n", 1, "resolve_result_entry", "does not fit in 64 bits"),
    (
        "[background_fetch]\ndrop_policy = 'random'\n",
        2,
        "background_fetch.drop_policy",
        'background_fetch.drop_policy must be "oldest" or "newest", got "random"',
    ),
    ("metadata_store = 'bolt'\n", 1, "metadata_store", "must be one of 'db', 'db-multi', got 'bolt'"),
    ("metrics_network = 'udp'\n", 1, "metrics_network", "must be one of"),
    ("[content_store]\ntype = 'local'\n", 2, "content_store.type", "must be one of 'soci', 'containerd'"),
    (
        "[pull_modes.parallel_pull_unpack]\nmax_concurrent_unpacks = -2\n",
        2,
        "pull_modes.parallel_pull_unpack.max_concurrent_unpacks",
        "must be -1 or more",
    ),
    (
        "[pull_modes.parallel_pull_unpack]\n\nconcurrent_download_chunk_size = '5 parsecs'\n",
        3,
        "pull_modes.parallel_pull_unpack.concurrent_download_chunk_size",
        "invalid size format",
    ),
    (
        "[pull_modes.parallel_pull_unpack.decompress_streams.gzip]\nargs = [1]\n",
        2,
        "pull_modes.parallel_pull_unpack.decompress_streams.gzip.args",
        "expected an array of strings",
    ),
    (
        "[kubeconfig_keychain]\nnamespaces = ['a', 'b/c']\n",
        2,
        "kubeconfig_keychain.namespaces",
        "bad namespace",
    ),
    ("[kubeconfig_keychain]\nnamespaces = 'a'\n", 2, "kubeconfig_keychain.namespaces", "array of strings"),
    ("[cri_keychain]\npersist = 'yes'\n", 2, "cri_keychain.persist", "expected a boolean"),
    ("[cri_keychain]\ncredential_ttl_sec = -1\n", 2, "cri_keychain.credential_ttl_sec", "must be 0 or more"),
    ("[resolver]\nhost = 1\n", 2, "resolver.host", "expected a table"),
    ("[resolver.host]\n'r.example' = 1\n", 2, 'resolver.host."r.example"', "expected a table"),
    ("[resolver.host.'r.example']\nmirrors = 1\n", 2, 'resolver.host."r.example".mirrors', "array of tables"),
    (
        "[[resolver.host.'r.example'.mirrors]]\nhost = 'a.example'\n[[resolver.host.'r.example'.mirrors]]\n"
        "insecure = true\n",
        3,
        'resolver.host."r.example".mirrors[1]',
        "host is required",
    ),
    (
        "[[resolver.host.'r.example'.mirrors]]\nhost = 'a.example'\n[[resolver.host.'r.example'.mirrors]]\n"
        "host = 'not a host'\n",
        4,
        'resolver.host."r.example".mirrors[1].host',
        "invalid mirror host",
    ),
    (
        "[[resolver.host.'r.example'.mirrors]]\nhost = 'a.example'\nrequest_timeout_sec = 'soon'\n",
        3,
        'resolver.host."r.example".mirrors[0].request_timeout_sec',
        "expected an integer",
    ),
    (
        "[resolver]\nhost = { 'r.example' = { mirrors = [ { host = 'a.example', insecure = 'no' } ] } }\n",
        2,
        'resolver.host."r.example".mirrors[0].insecure',
        "expected a boolean",
    ),
    ("[pull_modes]\nsoci_v1 = { enable = 0 }\n", 2, "pull_modes.soci_v1.enable", "expected a boolean"),
    ("a = '''\nx\n'''\nb = [\n 1,\n 2,\n]\n[http]\nMaxRetries = 'x'\n", 9, "http.MaxRetries", "integer"),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"), ERRORS)
@pytest.mark.expect_log  # some cases carry unknown keys next to the bad one
def test_value_errors_name_file_line_and_key(text: str, line: int, key: str, fragment: str) -> None:
    with pytest.raises(c.ConfigError) as info:
        c.parse(text, "/etc/soci/bad.toml")
    err = info.value
    assert isinstance(err, InvalidArgument)
    assert (err.path, err.line, err.key) == ("/etc/soci/bad.toml", line, key)
    msg = str(err)
    assert msg.startswith('config file at "/etc/soci/bad.toml": failed to parse config: ')
    assert f"line {line}: {key}: " in msg and fragment in msg


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("[http]\nMaxRetries = \n", 2, "http.MaxRetries"),
        ("debug = true\ndebug = false\n", 2, "debug"),
        ("[fuse]\nattr_timeout = 1\n[fuse]\n", 3, ""),
        ("[http\n", 1, ""),
        ("x = 'unterminated\n", 1, "x"),
    ],
)
def test_malformed_toml(text: str, line: int, key: str) -> None:
    with pytest.raises(c.ConfigError) as info:
        c.parse(text, "m.toml")
    err = info.value
    assert str(err).startswith(f'failed to load config file "m.toml": line {line}, ')
    assert (err.path, err.line, err.key) == ("m.toml", line, key)
    if key:
        assert f"(key {key})" in str(err)


def test_errors_never_carry_a_traceback_or_cause() -> None:
    with pytest.raises(c.ConfigError) as info:
        c.parse("a = \n")
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --------------------------------------------------------------------------------------------------------
# loading files


def test_default_path_missing_gives_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(c, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert c.load() == c.Config()
    assert c.load(str(tmp_path / "absent.toml")) == c.Config()


def test_other_missing_path_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(c.ConfigError, match=f'failed to open config file "{p}": No such file'):
        c.load(p)


def test_unreadable_things(tmp_path: Path) -> None:
    with pytest.raises(c.ConfigError, match=r"is a directory|not a regular file"):
        c.load(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"debug = true\n# caf\xe9\n")
    with pytest.raises(c.ConfigError, match='"' + str(bad) + '": line 2: not UTF-8'):
        c.load(bad)


def test_load_records_the_source(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text("[http]\nMaxRetries = 3\n")
    cfg = c.load(p)
    assert cfg.source == str(p) and cfg.http.MaxRetries == 3
    assert cfg == c.parse("[http]\nMaxRetries = 3\n")  # source is not part of equality


# --------------------------------------------------------------------------------------------------------
# dump -> parse round trip

EVERYTHING = """\
http_cache_type = "x"
filesystem_cache_type = 'memory'
resolve_result_entry = 12
debug = true
disable_verification = true
max_concurrency = -1
mount_timeout_sec = 31
fuse_metrics_emit_wait_duration_sec = 61
metrics_address = "/run/soci/metrics.sock"
metrics_network = "unix"
no_prometheus = true
debug_address = "127.0.0.1:6060"
metadata_store = "db-multi"
metadata_db_no_sync = true
metadata_insertion_chunk_size = 100
skip_check_snapshotter_supported = true
docker_config = "/root/it's here/config.json"
credential_helper_timeout_sec = 2.5
[http]
DialTimeoutMsec = 1
ResponseHeaderTimeoutMsec = 2
RequestTimeoutMsec = 3
MaxRetries = 4
MinWaitMsec = 5
MaxWaitMsec = 6
[blob]
valid_interval = 7
fetching_timeout_sec = 8
max_retries = 9
min_wait_msec = 10
max_wait_msec = 11
check_always = true
force_single_range_mode = true
max_span_verification_retries = -1
[directory_cache]
max_lru_cache_entry = 1
max_cache_fds = 2
sync_add = true
direct = false
max_memory_bytes = 12
max_disk_bytes = 13
verify_every_read = true
[fuse]
attr_timeout = 3
entry_timeout = 4
negative_timeout = 5
log_fuse_operations = true
long_timeouts = false
[background_fetch]
disable = true
silence_period_msec = 1
fetch_period_msec = 2
max_queue_size = -1
drop_policy = "oldest"
emit_metric_period_sec = 3
[content_store]
type = "containerd"
containerd_address = "unix:///run/c.sock"
[prefetch]
enable = true
max_concurrency = 4
[pull_modes.soci_v1]
enable = true
[pull_modes.soci_v2]
enable = false
[pull_modes.parallel_pull_unpack]
max_concurrent_downloads = 10
max_concurrent_downloads_per_image = 0
concurrent_download_chunk_size = "16mb"
max_concurrent_unpacks = 2
max_concurrent_unpacks_per_image = -1
discard_unpacked_layers = true
enable = true
experimental_parallel_pull_as_fallback = true
[pull_modes.parallel_pull_unpack.decompress_streams.gzip]
path = "/usr/bin/pigz"
args = ["-d", "-c", "tab\\there", "quote'", 'back\\slash']
[pull_modes.parallel_pull_unpack.decompress_streams.zstd]
path = "/usr/bin/zstd"
[kubeconfig_keychain]
enable_keychain = true
kubeconfig_path = "/etc/kube/config"
namespaces = ["a", "b"]
label_selector = "soci=yes,env in (prod)"
first_sync_wait_sec = 0
[cri_keychain]
enable_keychain = true
image_service_path = "/run/cri.sock"
persist = true
persist_path = "/run/soci/cri.json"
credential_ttl_sec = 600
[resolver]
auth_client_ttl_sec = -1
enable_auth_client_sharing = true
[[resolver.host."docker.io".mirrors]]
host = "https://mirror.example:5000/v2"
insecure = false
request_timeout_sec = -1
[[resolver.host."docker.io".mirrors]]
host = "plain.example"
insecure = true
request_timeout_sec = 30
[resolver.host."weird host\\u00e9.example:1"]
[snapshotter]
min_layer_size = 1024
allow_invalid_mounts_on_restart = true
"""


def test_round_trip_every_key_set() -> None:
    cfg = c.parse(EVERYTHING, "everything.toml")
    # every leaf differs from its default (the mirror map and stream map are non-empty)
    assert [k for k in DEFAULTS if get(cfg, k) == DEFAULTS[k]] == []
    text = c.dump(cfg)
    again = c.parse(text)
    assert again == cfg
    assert c.dump(again) == text
    assert cfg.content_store.containerd_address == "/run/c.sock"
    assert list(cfg.resolver.host) == ["docker.io", "weird host\u00e9.example:1"]
    assert cfg.pull_modes.parallel_pull_unpack.decompress_streams["gzip"].args[2:] == (
        "tab\there",
        "quote'",
        "back\\slash",
    )


def test_dump_format() -> None:
    text = c.dump(c.parse(EVERYTHING))
    assert 'docker_config = "/root/it\'s here/config.json"\n' in text  # basic quotes only when needed
    assert "  containerd_address = '/run/c.sock'\n" in text
    assert (
        "[resolver]\n  auth_client_ttl_sec = -1\n  enable_auth_client_sharing = true\n\n"
        '    [resolver.host."docker.io"]\n'
        '      [[resolver.host."docker.io".mirrors]]\n'
        "        host = 'https://mirror.example:5000/v2'\n"
    ) in text
    assert "        args = ['-d', '-c', 'tab\there', \"quote'\", 'back\\slash']\n" in text  # tab: literal


@pytest.mark.parametrize(("text", "key", "want"), RULES[:5])
def test_dump_writes_effective_values(text: str, key: str, want: Any) -> None:
    assert get(c.parse(c.dump(c.parse(text))), key) == want


# --------------------------------------------------------------------------------------------------------
# key lines


def test_key_lines() -> None:
    text = (
        'a = """\n[not.a.table]\nb = 1\n"""\n'  # 1-4
        "arr = [\n  1, # c\n  'x]',\n]\n"  # 5-8
        "[t]  # comment\n"  # 9
        "k.dotted = 1\n"  # 10
        "[[aot]]\n"  # 11
        "x = 1\n"  # 12
        "[[aot]]\n"  # 13
        "x = 2\n"  # 14
        "[aot.sub]\n"  # 15
        "y = 3\n"  # 16
        '"quoted key" = 1\n'  # 17
    )
    lines = c.key_lines(text)
    assert lines[("a",)] == 1 and ("not", "a", "table") not in lines and ("b",) not in lines
    assert lines[("arr",)] == 5
    assert lines[("t",)] == 9 and lines[("t", "k")] == 10 and lines[("t", "k", "dotted")] == 10
    assert lines[("aot",)] == 11 and lines[("aot", 0)] == 11 and lines[("aot", 0, "x")] == 12
    assert lines[("aot", 1)] == 13 and lines[("aot", 1, "x")] == 14
    assert lines[("aot", 1, "sub", "y")] == 16 and lines[("aot", 1, "sub", "quoted key")] == 17


# --------------------------------------------------------------------------------------------------------
# views for the registry client and the keychains


def test_registry_config() -> None:
    rc = c.parse(EVERYTHING).registry_config()
    assert rc.http == reference.HttpConfig(4, 5, 6, 1, 2, 3)
    assert rc.blob.retry(rc.http) == reference.RetryConfig(9, 10, 11)
    assert (rc.blob.fetching_timeout_sec, rc.blob.valid_interval, rc.blob.check_always) == (8, 0, True)
    assert rc.blob.force_single_range_mode and rc.blob.max_span_verification_retries == -1
    assert rc.resolver.auth_client_ttl_sec == -1 and rc.resolver.effective_auth_client_ttl is None
    assert rc.resolver.enable_auth_client_sharing
    assert rc.resolver.mirrors["docker.io"] == (
        reference.MirrorConfig("https://mirror.example:5000/v2", False, -1),
        reference.MirrorConfig("plain.example", True, 30),
    )
    hosts = reference.resolve_hosts(reference.parse("docker.io/library/x:1"), rc)
    assert [(h.scheme, h.host) for h in hosts] == [
        ("https", "mirror.example:5000"),
        ("http", "plain.example"),
        ("https", "registry-1.docker.io"),
    ]
    assert rc.resolver.plain_http_hosts == frozenset()  # an insecure mirror does not downgrade docker.io
    default = c.Config().registry_config()
    assert default.http == reference.HttpConfig() and default.resolver == reference.ResolverConfig()
    assert default.blob.retry(default.http) == reference.BlobConfig().retry(reference.HttpConfig())
    assert dataclasses.replace(default.blob, max_retries=None, min_wait_msec=None, max_wait_msec=None) == (
        reference.BlobConfig()
    )


def test_keychain_settings() -> None:
    s = c.parse(EVERYTHING).keychain_settings()
    assert s == c.KeychainSettings(
        docker_config="/root/it's here/config.json",
        helper_timeout=2.5,
        cri_enabled=True,
        cri_image_service_path="/run/cri.sock",
        cri_ttl=600.0,
        cri_persist=True,
        kube_enabled=True,
        kubeconfig_path="/etc/kube/config",
        kube_namespaces=("a", "b"),
        kube_label_selector="soci=yes,env in (prod)",
        kube_first_sync_wait=0.0,
        cri_persist_path="/run/soci/cri.json",
    )
    d = c.Config().keychain_settings()
    assert (d.cri_enabled, d.kube_enabled, d.cri_ttl, d.helper_timeout) == (False, False, None, 5.0)


# --------------------------------------------------------------------------------------------------------
# start-up checks


def test_check_startup_parallel_needs_containerd_store() -> None:
    c.check_startup(c.Config())
    bad = c.parse("[pull_modes.parallel_pull_unpack]\nenable = true\n", "p.toml")
    with pytest.raises(c.ConfigError, match=r'p\.toml".*content_store\.type = "containerd"'):
        c.check_startup(bad)
    fallback = c.parse("[pull_modes.parallel_pull_unpack]\nexperimental_parallel_pull_as_fallback = true\n")
    with pytest.raises(c.ConfigError):
        c.check_startup(fallback)
    c.check_startup(
        c.parse("[pull_modes.parallel_pull_unpack]\nenable = true\ndiscard_unpacked_layers = true\n")
    )
    c.check_startup(
        c.parse("[content_store]\ntype='containerd'\n[pull_modes.parallel_pull_unpack]\nenable=true\n")
    )


@pytest.mark.expect_log
def test_check_startup_decompress_streams(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    exe = tmp_path / "pigz"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(exe)
    plain = tmp_path / "plain"
    plain.write_text("")

    def cfg(alg: str, path: Path | str) -> c.Config:
        return c.parse(f"[pull_modes.parallel_pull_unpack.decompress_streams.{alg}]\npath = '{path}'\n")

    c.check_startup(cfg("gzip", exe))
    c.check_startup(cfg("zstd", link))
    for path, problem in [
        (plain, "not an executable regular file"),
        (tmp_path, "not an executable regular file"),
        (tmp_path / "absent", "No such file"),
        (f"{exe};rm", "contains one of"),
        ("", "a path is required"),
    ]:
        with pytest.raises(c.ConfigError, match=problem):
            c.check_startup(cfg("gzip", path))
    c.check_startup(cfg("xz", plain))
    assert any("unknown decompression algorithm 'xz'" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------
# the credential chain built from a config


def write_toml(path: Path, text: str) -> c.Config:
    path.write_text(text)
    return c.load(path)


def docker_config_file(path: Path, auths: dict[str, tuple[str, str]]) -> Path:
    doc = {
        "auths": {h: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()} for h, (u, p) in auths.items()}
    }
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def kube_api() -> Iterator[KubeAPIServer]:
    server = KubeAPIServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_build_chain_default_is_docker_config_only(tmp_path: Path) -> None:
    dc = docker_config_file(tmp_path / "docker.json", {"reg.example": ("alice", "pw")})
    cfg = write_toml(tmp_path / "c.toml", f"docker_config = '{dc}'\ncredential_helper_timeout_sec = 1.5\n")
    with build_chain(cfg) as built:
        assert built.cri is None and built.kubernetes is None
        assert [(n, s is not None) for n, s in built.chain.slots()] == [
            ("docker-config", True),
            ("cri", False),
            ("kubernetes-secrets", False),
        ]
        assert built.docker_config.path == dc
        assert built.docker_config._helpers.timeout == 1.5
        creds = built.chain("reg.example", "reg.example/app:1")
        assert creds is not None and (creds.username, creds.password) == ("alice", "pw")
        assert built.chain("other.example", "other.example/app:1") is None


def test_build_chain_with_the_cri_store(tmp_path: Path) -> None:
    cfg = c.parse(
        f"docker_config = '{tmp_path / 'absent.json'}'\n[cri_keychain]\nenable_keychain = true\n"
        "credential_ttl_sec = 60\n"
    )
    with build_chain(cfg) as built:
        assert built.cri is not None and built.kubernetes is None
        before = time.time()
        built.cri.record("reg.example/app:1", {"username": "bob", "password": "pw2"})
        creds = built.chain("reg.example", "reg.example/app:1")
        assert creds is not None and creds.username == "bob"
        assert creds.expires_at is not None and before + 59 <= creds.expires_at <= time.time() + 61
        assert built.chain.last_answer("reg.example").source == "cri"  # type: ignore[union-attr]


def test_build_chain_cri_persist(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the file itself is tested in tests/grpc/keychain/test_cri_persist.py
    path = tmp_path / "cri.json"
    text = f"[cri_keychain]\nenable_keychain = true\npersist = true\npersist_path = '{path}'\n"
    with build_chain(c.parse(text)) as built:
        assert built.cri is not None
    assert any(f"persisted in {path}" in r.getMessage() for r in caplog.records)


def test_build_chain_with_kubernetes_secrets(tmp_path: Path, kube_api: KubeAPIServer) -> None:
    kube_api.put_secret(
        "team", "reg", dockerconfigjson({"reg.example": basic_auth("carol", "pw3")}), labels={"soci": "yes"}
    )
    kube_api.put_secret("team", "unlabelled", dockerconfigjson({"other.example": basic_auth("dan", "pw4")}))
    kube_api.put_secret(
        "elsewhere",
        "reg",
        dockerconfigjson({"third.example": basic_auth("eve", "pw5")}),
        labels={"soci": "yes"},
    )
    kc = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    cfg = c.parse(
        f"docker_config = '{tmp_path / 'absent.json'}'\n"
        f"[kubeconfig_keychain]\nenable_keychain = true\nkubeconfig_path = '{kc}'\n"
        "namespaces = ['team']\nlabel_selector = 'soci=yes'\nfirst_sync_wait_sec = 10\n"
    )
    with build_chain(cfg, min_backoff=0.02, max_backoff=0.1) as built:
        kube = built.kubernetes
        assert kube is not None and kube.ready  # build_chain waited for the first list
        assert kube.namespaces == ("team",) and kube.label_selector == "soci=yes"
        creds = built.chain("reg.example", "reg.example/app:1")
        assert creds is not None and (creds.username, creds.source) == ("carol", "secret:team/reg")
        assert built.chain("other.example", "other.example/app:1") is None  # label selector
        assert built.chain("third.example", "third.example/app:1") is None  # namespace
    assert not kube._thread.is_alive()  # type: ignore[union-attr]


@pytest.mark.expect_log
def test_build_chain_does_not_wait_long_for_kubernetes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = c.parse(
        "[kubeconfig_keychain]\nenable_keychain = true\n"
        f"kubeconfig_path = '{tmp_path / 'not-yet'}'\nfirst_sync_wait_sec = 0.2\n"
    )
    start = time.monotonic()
    built = build_chain(cfg, file_poll_interval=0.05)
    try:
        assert time.monotonic() - start < 3
        assert built.kubernetes is not None and not built.kubernetes.ready
        assert built.chain("reg.example", "reg.example/app:1") is None
    finally:
        built.stop()
    assert any("first sync not complete after 0.2 s" in r.getMessage() for r in caplog.records)


def test_build_chain_refuses_bad_settings() -> None:
    s = dataclasses.replace(c.Config().keychain_settings(), helper_timeout=0.0)
    with pytest.raises(InvalidArgument, match="timeout must be > 0"):
        build_chain(s)


def test_end_to_end_config_to_blob(tmp_path: Path, htpasswd_registry: Registry) -> None:
    """config.toml -> Docker config -> chain -> RegistryClient(RegistryConfig) -> a blob from the registry."""
    reg = htpasswd_registry
    data = os.urandom(4096)
    digest = RawPusher(reg).push_blob("config-e2e/app", data)
    (tmp_path / "docker").mkdir()
    dc = docker_config_file(tmp_path / "docker" / "config.json", {reg.host: (USER, PASSWORD)})
    cfg = write_toml(
        tmp_path / "config.toml",
        f"docker_config = '{dc}'\n[http]\nMaxRetries = 1\nMinWaitMsec = 1\nMaxWaitMsec = 10\n",
    )
    ref = reference.parse(f"{reg.host}/config-e2e/app:1")
    with build_chain(cfg) as built:
        client = RegistryClient(built.chain, config=cfg.registry_config(), ref=str(ref))
        with client:
            assert (
                client.config.http.max_retries == 1
                and client.config.blob.retry(client.config.http).max_retries == 1
            )
            assert client.get_blob(ref, digest, size=len(data)) == data
            assert client.blob(ref, digest).read(100, 100) == data[100:200]
        assert built.chain.last_answer(reg.host).source == "docker-config"  # type: ignore[union-attr]

    # The same registry with a config that has no credentials: refused.
    empty = write_toml(tmp_path / "empty.toml", f"docker_config = '{tmp_path / 'none.json'}'\n")
    with (
        build_chain(empty) as built,
        RegistryClient(built.chain, config=empty.registry_config()) as client,
        pytest.raises(Unauthenticated),
    ):
        client.get_blob(ref, digest)


# --------------------------------------------------------------------------------------------------------
# property: whatever a Config holds, dump writes TOML that reads back to it

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_SPECIAL = {
    "concurrent_download_chunk_size": st.sampled_from(["", "1", "16mb", "1.5 KB", "2gb"]),
    "namespaces": st.lists(st.sampled_from(["a", "kube-system", "ns.x"]), max_size=3).map(tuple),
    "persist_path": st.sampled_from(["/run/soci/cri.json", "/tmp/a b/'q'.json"]),
    "host": st.sampled_from(["mirror.example", "https://m.example:5000/v2", "127.0.0.1:5000", "[::1]:80"]),
}


def _strategy(cls: type) -> st.SearchStrategy[Any]:
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = meta.get("kind")
        if kind == "skip":
            continue
        if kind == "table":
            kwargs[f.name] = _strategy(f.default_factory)  # type: ignore[arg-type]
        elif kind == "map":
            kwargs[f.name] = st.dictionaries(_TEXT, _strategy(meta["cls"]), max_size=2).map(MappingProxyType)
        elif kind == "array":
            kwargs[f.name] = st.lists(_strategy(meta["cls"]), max_size=2).map(tuple)
        elif f.name in _SPECIAL:
            kwargs[f.name] = _SPECIAL[f.name]
        elif meta["choices"]:
            kwargs[f.name] = st.sampled_from(meta["choices"])
        elif kind == "bool":
            kwargs[f.name] = st.booleans()
        elif kind == "int":
            lo = -(1 << 63) if meta["lo"] is None else int(meta["lo"])
            kwargs[f.name] = st.integers(lo, (1 << 63) - 1).filter(
                lambda v, m=meta: not (m["fill"] and v == 0)
            )
        elif kind == "float":
            kwargs[f.name] = st.floats(0.001, 1e9, allow_nan=False)
        elif kind == "str":
            kwargs[f.name] = _TEXT.filter(lambda v, m=meta: not (m["fill"] and v == ""))
        elif kind == "strlist":
            kwargs[f.name] = st.lists(_TEXT, max_size=3).map(tuple)
    return st.builds(cls, **kwargs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_strategy(c.Config))
def test_dump_parse_round_trip_property(cfg: c.Config) -> None:
    first = c.parse(c.dump(cfg))  # applies the cross-key rules (blob retries, check_always, unix://)
    text = c.dump(first)
    assert c.parse(text) == first
    assert c.dump(c.parse(text)) == text
    assert (
        first.http == cfg.http and first.resolver == cfg.resolver and first.docker_config == cfg.docker_config
    )


def test_a_registry_named_as_its_own_insecure_mirror_is_plain_http() -> None:
    text = """
[[resolver.host."10.0.0.5:5000".mirrors]]
host = "10.0.0.5:5000"
insecure = true
[[resolver.host."reg.internal".mirrors]]
host = "http://reg.internal/"
insecure = true
[[resolver.host."secure.example".mirrors]]
host = "secure.example"
"""
    rc = c.parse(text).registry_config()
    assert rc.resolver.plain_http_hosts == frozenset({"10.0.0.5:5000", "reg.internal"})
    for ref, scheme in (
        ("10.0.0.5:5000/app:1", "http"),
        ("reg.internal/app:1", "http"),
        ("secure.example/app:1", "https"),
    ):
        hosts = reference.resolve_hosts(reference.parse(ref), rc, blobs=False)
        assert [h.scheme for h in hosts] == [scheme], ref


def test_bare_unix_scheme_is_the_default_containerd_address() -> None:
    """Found by the round-trip property: ``unix://`` alone must parse the same after a dump."""
    first = c.parse('[content_store]\ncontainerd_address = "unix://"\n')
    assert first.content_store.containerd_address == "/run/containerd/containerd.sock"
    assert c.parse(c.dump(first)) == first
