"""Reference parsing, Docker Hub mappings and host resolution (pure)."""

from __future__ import annotations

import pytest

from soci_fs.errors import InvalidArgument
from soci_fs.registry import reference as r

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "normalize", "host", "repo", "tag", "digest"),
    [
        ("docker.io/library/nginx:latest", False, "docker.io", "library/nginx", "latest", ""),
        ("127.0.0.1:5000/e2e/test:v1", False, "127.0.0.1:5000", "e2e/test", "v1", ""),
        (f"localhost:5000/a/b@{D}", False, "localhost:5000", "a/b", "", D),
        (f"ghcr.io/o/r:t@{D}", False, "ghcr.io", "o/r", "t", D),
        ("[::1]:5000/x:y", False, "[::1]:5000", "x", "y", ""),
        ("nginx", True, "docker.io", "library/nginx", "latest", ""),
        ("user/app:1.0", True, "docker.io", "user/app", "1.0", ""),
        (f"nginx@{D}", True, "docker.io", "library/nginx", "", D),
        ("localhost/app", True, "localhost", "app", "", ""),
        ("quay.io/a/b", True, "quay.io", "a/b", "", ""),
    ],
)
def test_parse(text, normalize, host, repo, tag, digest):
    ref = r.parse(text, normalize=normalize)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repo, tag, digest)
    if not normalize:
        assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("nginx", "host is required"),
        ("docker.io/Library/nginx", "lowercase"),
        ("docker.io/library/nginx:bad tag", "whitespace"),
        ("docker.io/a@sha256:1234", "sha256"),
        ("docker.io/a@md5", "digest"),
        ("docker.io/a:" + "t" * 200, "bad tag"),
        ("docker.io//a", "bad path component"),
        ("bad_host!/a", "bad host"),
    ],
)
def test_parse_errors_name_the_reference(text, fragment):
    with pytest.raises(InvalidArgument) as e:
        r.parse(text)
    assert fragment in str(e.value)
    if text:
        assert repr(text) in str(e.value) or text in str(e.value)


def test_docker_hub_mappings():
    ref = r.parse("docker.io/library/nginx:latest")
    assert ref.registry_host == "registry-1.docker.io"
    assert ref.credential_key == "https://index.docker.io/v1/"
    assert r.credential_key("registry-1.docker.io") == "https://index.docker.io/v1/"
    assert r.credential_key("127.0.0.1:5000") == "127.0.0.1:5000"


def test_resolve_hosts_mirrors_and_schemes():
    cfg = r.RegistryConfig(
        resolver=r.ResolverConfig(
            mirrors={
                "docker.io": (
                    r.MirrorConfig("https://mirror.example:5000/prefix/v2", request_timeout_sec=5),
                    r.MirrorConfig("plain.example:5001", insecure=True),
                )
            },
            plain_http_hosts=frozenset({"internal.example"}),
        )
    )
    ref = r.parse("docker.io/library/nginx:latest")
    hosts = r.resolve_hosts(ref, cfg)
    assert [h.base_url for h in hosts] == [
        "https://mirror.example:5000/prefix/v2",
        "http://plain.example:5001/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert hosts[0].request_timeout == 5.0 and hosts[0].is_mirror
    assert r.resolve_hosts(ref, cfg, blobs=False) == hosts[-1:]
    assert r.resolve_hosts(r.parse("127.0.0.1:5000/a"), cfg)[0].scheme == "http"
    assert r.resolve_hosts(r.parse("localhost:5000/a"), cfg)[0].scheme == "http"
    assert r.resolve_hosts(r.parse("internal.example/a"), cfg)[0].scheme == "http"
    assert r.resolve_hosts(r.parse("quay.io/a"), cfg, plain_http=True)[0].scheme == "http"
    assert r.resolve_hosts(r.parse("quay.io/a"), cfg)[0].scheme == "https"


def test_bad_mirror_is_invalid_argument():
    cfg = r.RegistryConfig(resolver=r.ResolverConfig(mirrors={"quay.io": (r.MirrorConfig("https://"),)}))
    with pytest.raises(InvalidArgument, match="mirror"):
        r.resolve_hosts(r.parse("quay.io/a"), cfg)


def test_config_defaults():
    cfg = r.RegistryConfig()
    assert cfg.http.retry == r.RetryConfig(8, 30, 300_000)
    assert cfg.blob.retry(cfg.http) == cfg.http.retry
    assert r.BlobConfig(max_retries=2).retry(cfg.http).max_retries == 2
    assert r.ResolverConfig(auth_client_ttl_sec=0).effective_auth_client_ttl == 3600
    assert r.ResolverConfig(auth_client_ttl_sec=-1).effective_auth_client_ttl is None
