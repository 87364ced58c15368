"""Fault injection through the proxy: range edge cases, retries, Retry-After, 403s, pre-signed redirects,
and a check that no secret reaches any log record."""

from __future__ import annotations

import base64
import logging
import time

import pytest

from soci_fs.errors import FormatError, Unauthenticated, Unavailable
from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_fs.registry.credentials import Credentials
from soci_fs.registry.reference import HttpConfig, RegistryConfig
from tests.harness.registry import PASSWORD, USER, Fault, RawPusher

pytestmark = pytest.mark.integration

FAST = RegistryConfig(http=HttpConfig(max_retries=3, min_wait_msec=1, max_wait_msec=20))
LAYER = bytes(range(256)) * 4000  # 1 MB
BLOBS = r"/blobs/sha256:"


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, s: float) -> None:
        self.calls.append(s)


def cred(host: str, ref: str) -> Credentials:
    return Credentials(USER, PASSWORD)


@pytest.fixture(params=["htpasswd", "token"])
def setup(request, htpasswd_registry, token_registry, token_server, fault_proxy):
    reg = htpasswd_registry if request.param == "htpasswd" else token_registry
    token_server.reset()
    repo = f"f/{request.param}-{time.monotonic_ns()}"
    img = RawPusher(reg).push_image(repo, "v1", [LAYER])
    proxy = fault_proxy(reg)
    ref = reference.parse(f"{proxy.host}/{repo}:v1")
    return proxy, ref, img["layers"][0], img


def test_server_ignoring_range_gives_the_right_slice(setup):
    proxy, ref, digest, _ = setup
    with RegistryClient(cred, config=FAST) as c:
        rb = c.blob(ref, digest, size=len(LAYER))
        proxy.add(Fault("ignore_range", path=BLOBS, times=-1))
        assert rb.read(0, 100) == LAYER[:100]
        assert rb.read(500_000, 4096) == LAYER[500_000:504_096]
        assert rb.read(len(LAYER) - 10, 100) == LAYER[-10:]


def test_wrong_content_range_is_a_format_error(setup):
    proxy, ref, digest, _ = setup
    with RegistryClient(cred, config=FAST) as c:
        rb = c.blob(ref, digest, size=len(LAYER))
        rb.read(0, 1)
        proxy.add(Fault("wrong_content_range", path=BLOBS))
        with pytest.raises(FormatError, match="Content-Range") as e:
            rb.read(1000, 1000)
        assert digest in str(e.value)


def test_reset_mid_body_is_retried(setup):
    proxy, ref, digest, _ = setup
    with RegistryClient(cred, config=FAST) as c:
        rb = c.blob(ref, digest, size=len(LAYER))
        rb.read(0, 1)
        proxy.add(Fault("reset", path=BLOBS, times=2))
        assert rb.read(10_000, 200_000) == LAYER[10_000:210_000]
        assert c.statistics()["retries"] >= 2


@pytest.mark.expect_log
def test_5xx_is_retried_then_gives_up(setup):
    proxy, ref, _, _ = setup
    with RegistryClient(cred, config=FAST) as c:
        proxy.add(Fault("status", path="/manifests/", status=503, times=2))
        c.get_manifest(ref)
        proxy.add(Fault("status", path="/manifests/", status=500, times=-1))
        with pytest.raises(Unavailable, match=r"giving up request after 4 attempt\(s\)"):
            c.get_manifest(ref)


def test_retry_after_is_honoured(setup):
    proxy, ref, _, _ = setup
    sleeps = Sleeps()
    with RegistryClient(cred, config=FAST, sleep=sleeps) as c:
        proxy.add(Fault("status", path="/manifests/", status=429, headers={"Retry-After": "7"}))
        c.get_manifest(ref)
        assert len(sleeps.calls) == 1 and 7 <= sleeps.calls[0] < 7 * 1.125 + 1e-9
        proxy.add(Fault("status", path="/manifests/", status=503, headers={"Retry-After": "0"}))
        c.get_manifest(ref)
        assert sleeps.calls[1] == 0


def test_genuine_403_is_an_error_without_a_retry_loop(setup):
    proxy, ref, _, _ = setup
    with RegistryClient(cred, config=FAST) as c:
        c.get_manifest(ref)
        body = b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}'
        proxy.add(Fault("status", path="/manifests/", status=403, body=body, times=-1))
        before = len(proxy.log)
        with pytest.raises(Unauthenticated, match="403"):
            c.get_manifest(ref)
        assert len(proxy.log) - before == 1


def test_expired_token_403_refreshes(setup, token_server):
    proxy, ref, digest, _ = setup
    with RegistryClient(cred, config=FAST) as c:
        rb = c.blob(ref, digest, size=len(LAYER))
        rb.read(0, 10)
        before = token_server.total_token_requests()
        proxy.add(Fault("expired_403", path=BLOBS))
        assert rb.read(100, 10) == LAYER[100:110]
        if "token" in ref.repository:
            assert token_server.total_token_requests() == before + 1
        assert c.statistics()["reauth"] == 2


def test_presigned_redirect_without_authorization_and_expiry(setup):
    proxy, ref, digest, _ = setup
    proxy.storage_ttl = 0.5
    proxy.add(Fault("redirect", path=BLOBS, times=-1))
    with RegistryClient(cred, config=FAST) as c:
        rb = c.blob(ref, digest, size=len(LAYER))
        assert rb.read(0, 1000) == LAYER[:1000]
        assert rb.read(2000, 10) == LAYER[2000:2010]
        assert proxy.storage_log and not any(r["authorization"] for r in proxy.storage_log)
        time.sleep(0.6)
        assert rb.read(4000, 10) == LAYER[4000:4010]  # 403 from storage -> re-resolved once
        assert c.statistics()["url_refreshes"] == 1
        assert [r["status"] for r in proxy.storage_log].count(403) == 1
        # a whole-blob GET follows the redirect, again without Authorization
        assert c.get_blob(ref, digest) == LAYER
        assert not any(r["authorization"] for r in proxy.storage_log)


def test_no_secret_in_any_log_record(setup, token_server, caplog):
    caplog.set_level(logging.DEBUG)
    proxy, ref, digest, _ = setup
    proxy.add(Fault("redirect", path=BLOBS, times=-1))
    with RegistryClient(cred, config=FAST) as c:
        c.get_manifest(ref)
        rb = c.blob(ref, digest, size=len(LAYER))
        rb.read(0, 100)
        proxy.add(Fault("expired_403", path="/manifests/"))
        c.get_manifest(ref)
    with (
        RegistryClient(lambda h, r: Credentials(USER, "wr0ng-pass"), config=FAST) as c,
        pytest.raises(Unauthenticated),
    ):
        c.get_manifest(ref)
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "GET" in text  # DEBUG request records were captured
    secrets = [PASSWORD, "wr0ng-pass", base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    secrets += [i["token"] for i in token_server.state.issued]
    for s in secrets:
        assert s not in text
    assert "Authorization" not in text and "Bearer " not in text and "Basic " not in text
    assert "X-Amz-Signature=redacted" in text
    for sig in ("X-Amz-Signature=" + c for c in "0123456789abcdef"):
        assert sig not in text
