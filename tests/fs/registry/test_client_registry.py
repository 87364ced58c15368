"""The client against a real docker-registry, with htpasswd and with token auth (both through the harness)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass

import pytest

from soci_fs.errors import FormatError, InvalidArgument, NotFound, Unauthenticated
from soci_fs.registry import reference
from soci_fs.registry.client import OCI_INDEX, OCI_MANIFEST, Descriptor, RegistryClient
from soci_fs.registry.credentials import Credentials
from soci_fs.registry.push import Artifact, push_artifacts
from soci_fs.registry.reference import HttpConfig, RegistryConfig
from tests.harness.registry import PASSWORD, USER, RawPusher, Registry

pytestmark = pytest.mark.integration

FAST = RegistryConfig(http=HttpConfig(max_retries=3, min_wait_msec=1, max_wait_msec=20))
_counter = iter(range(10_000))


class MutableCred:
    """A Credential whose answer the test can change (rotation)."""

    def __init__(self, user: str = USER, password: str = PASSWORD) -> None:
        self.value = Credentials(user, password)
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, host: str, ref: str) -> Credentials | None:
        with self.lock:
            self.calls += 1
        return self.value


class FakeClock:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


@dataclass
class Env:
    registry: Registry
    pusher: RawPusher
    repo: str

    def ref(self, tag: str = "v1") -> reference.Reference:
        return reference.parse(f"{self.registry.host}/{self.repo}:{tag}")


@pytest.fixture(params=["htpasswd", "token"])
def env(request, htpasswd_registry, token_registry, token_server):
    reg = htpasswd_registry if request.param == "htpasswd" else token_registry
    token_server.reset()
    saved = (token_server.state.ttl, token_server.state.omit_expires_in, token_server.state.post_status)
    yield Env(reg, RawPusher(reg), f"t/{request.param}{next(_counter)}")
    token_server.configure(ttl=saved[0], omit_expires_in=saved[1], post_status=saved[2])
    token_server.set_password(USER, PASSWORD)
    if reg.users:
        reg.set_password(USER, PASSWORD)
    token_server.reset()


def blob(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + os.urandom(n % 32)


def test_pull_manifest_blob_and_ranges(env):
    layer = blob(300_000, 1)
    img = env.pusher.push_image(env.repo, "v1", [layer])
    with RegistryClient(MutableCred(), config=FAST) as c:
        m = c.get_manifest(env.ref())
        assert m.digest == img["manifest"] and m.media_type == OCI_MANIFEST
        assert c.get_manifest(env.ref(), img["manifest"]).data == m.data
        assert c.head_manifest(env.ref()).digest == img["manifest"]
        assert c.head_manifest(env.ref("nope")) is None
        assert c.get_blob(env.ref(), img["layers"][0], size=len(layer)) == layer
        rb = c.blob(env.ref(), img["layers"][0])
        assert rb.size == len(layer)
        assert rb.read(0, 10) == layer[:10]
        assert rb.read(123_456, 70_000) == layer[123_456:193_456]
        assert rb.read(len(layer) - 5, 100) == layer[-5:]  # short only at the end
        assert b"".join(rb.read_all(chunk=65536)) == layer
        with pytest.raises(NotFound):
            c.get_blob(env.ref(), "sha256:" + "1" * 64)
        with pytest.raises(FormatError, match="size"):
            c.get_blob(env.ref(), img["layers"][0], size=len(layer) - 1)


def test_range_beyond_end_is_invalid_argument(env):
    img = env.pusher.push_image(env.repo, "v1", [b"x" * 100])
    with RegistryClient(MutableCred(), config=FAST) as c:
        rb = c.blob(env.ref(), img["layers"][0])
        with pytest.raises(InvalidArgument, match="416"):
            rb.read(1000, 10)


def test_push_and_pull_back_with_library(env):
    ref = env.ref("pushed")
    layers = [blob(50_000, i) for i in range(4)] + [blob(3 * 1024 * 1024 + 17, 9)]
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    descs = [
        Descriptor(
            "application/vnd.oci.image.layer.v1.tar", "sha256:" + hashlib.sha256(b).hexdigest(), len(b)
        )
        for b in layers
    ]
    cdesc = Descriptor(
        "application/vnd.oci.image.config.v1+json",
        "sha256:" + hashlib.sha256(config).hexdigest(),
        len(config),
    )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cdesc.to_json(),
            "layers": [d.to_json() for d in descs],
        }
    ).encode()
    mdesc = Descriptor(OCI_MANIFEST, "sha256:" + hashlib.sha256(manifest).hexdigest(), len(manifest))
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def cb(kind):
        def f(d):
            with lock:
                events.append((kind, d.digest))

        return f

    blobs = [Artifact(d, b) for d, b in zip(descs, layers, strict=True)] + [Artifact(cdesc, config)]
    with RegistryClient(MutableCred(), config=FAST) as c:
        res = push_artifacts(
            c,
            ref,
            blobs,
            [Artifact(mdesc, manifest)],
            max_concurrent_uploads=3,
            chunk_size=1 << 20,
            on_pushing=cb("pushing"),
            on_pushed=cb("pushed"),
            on_skipped=cb("skipped"),
        )
        assert sorted(res.pushed) == sorted([d.digest for d in descs] + [cdesc.digest, mdesc.digest])
        assert ("pushing", mdesc.digest) in events and ("pushed", mdesc.digest) in events
        # second push: everything skipped
        events.clear()
        res = push_artifacts(c, ref, blobs, [Artifact(mdesc, manifest)], on_skipped=cb("skipped"))
        assert not res.pushed and len(res.skipped) == len(blobs) + 1
        digest, _ = c.push_manifest(ref, "latest", manifest, OCI_MANIFEST)
        assert digest == mdesc.digest
        assert c.get_blob(ref, descs[-1].digest) == layers[-1]
        assert c.get_manifest(ref.with_object(tag="latest")).digest == mdesc.digest
        # cross-repository mount into another repository
        other = reference.parse(f"{env.registry.host}/{env.repo}-mount:v1")
        assert c.push_blob(other, descs[0].digest, layers[0], mount_from=env.repo) == "mounted"
        assert c.blob_exists(other, descs[0].digest)


def test_referrers_tag_fallback_and_index_platform_selection(env):
    img = env.pusher.push_image(env.repo, "v1", [b"layer"])
    subject = {
        "mediaType": OCI_MANIFEST,
        "digest": img["manifest"],
        "size": len(json.dumps(img["manifest_doc"])),
    }
    art_config = b"{}"
    cdig = env.pusher.push_blob(env.repo, art_config)
    soci_type = "application/vnd.amazon.soci.index.v1+json"
    art = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": soci_type, "digest": cdig, "size": 2},
            "layers": [],
            "subject": subject,
        }
    ).encode()
    adesc = Descriptor(OCI_MANIFEST, "sha256:" + hashlib.sha256(art).hexdigest(), len(art))
    with RegistryClient(MutableCred(), config=FAST) as c:
        assert c.referrers(env.ref(), img["manifest"], soci_type) == []
        res = push_artifacts(c, env.ref(), [], [Artifact(adesc, art)])
        assert res.referrers_tag_updated  # registry 2.8 has no referrers API
        found = c.referrers(env.ref(), img["manifest"], soci_type)
        assert [d.digest for d in found] == [adesc.digest] and found[0].artifact_type == soci_type
        assert c.referrers(env.ref(), img["manifest"], "other/type") == []
        # an image index resolved by platform
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {**subject, "platform": {"os": "linux", "architecture": "arm64"}},
                    {**subject, "platform": {"os": "linux", "architecture": "amd64"}},
                ],
            }
        ).encode()
        c.push_manifest(env.ref("multi"), "multi", index, OCI_INDEX)
        m = c.get_manifest(env.ref("multi"), platform="linux/amd64")
        assert m.digest == img["manifest"]
        with pytest.raises(NotFound, match="platform"):
            c.get_manifest(env.ref("multi"), platform="windows/amd64")


def test_bad_credentials_are_a_clear_unauthenticated_error(env):
    env.pusher.push_image(env.repo, "v1", [b"l"])
    with (
        RegistryClient(MutableCred(USER, "wrong-password-123"), config=FAST) as c,
        pytest.raises(Unauthenticated) as e,
    ):
        c.get_manifest(env.ref())
    msg = str(e.value)
    assert env.registry.host in msg or "127.0.0.1" in msg
    assert "wrong-password-123" not in msg
    with RegistryClient(None, config=FAST) as c, pytest.raises(Unauthenticated):
        c.get_manifest(env.ref())


def test_rotation_without_a_new_client(env, token_server):
    env.pusher.push_image(env.repo, "v1", [b"rot"])
    cred = MutableCred()
    clock = FakeClock()
    with RegistryClient(cred, config=FAST, clock=clock) as c:
        c.get_manifest(env.ref())
        new = "n3w-Passw0rd"
        if env.registry.auth == "token":
            token_server.set_password(USER, new)
        else:
            env.registry.set_password(USER, new)
            time.sleep(0.05)
        cred.value = Credentials(USER, new)
        clock.t += 3600  # the old token is past its expiry
        c.get_manifest(env.ref())
        assert cred.calls == 2


def test_long_read_outlives_its_token(token_registry, token_server):
    """TTL 2 s; the client's clock is frozen so it keeps the token: the registry's 401 makes it refresh."""
    token_server.reset()
    token_server.configure(ttl=2)
    try:
        env = Env(token_registry, RawPusher(token_registry), f"t/long{next(_counter)}")
        layer = blob(2_000_000, 3)
        img = env.pusher.push_image(env.repo, "v1", [layer])
        clock = FakeClock()
        with RegistryClient(MutableCred(), config=FAST, clock=clock) as c:
            rb = c.blob(env.ref(), img["layers"][0])
            assert rb.read(0, 1000) == layer[:1000]
            assert token_server.total_token_requests() == 1
            time.sleep(3.2)  # the registry now rejects the token (2 s + whole-second granularity)
            out = [None] * 20
            barrier = threading.Barrier(20)

            def work(i: int) -> None:
                barrier.wait()
                out[i] = rb.read(i * 50_000, 50_000)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(out[i] == layer[i * 50_000 : (i + 1) * 50_000] for i in range(20))
            assert token_server.total_token_requests() == 2  # exactly one refresh for 20 concurrent 401s
            assert c.statistics()["reauth"] >= 1
    finally:
        token_server.configure(ttl=300)
        token_server.reset()


def test_proactive_refresh_before_expiry(token_registry, token_server):
    token_server.reset()
    env = Env(token_registry, RawPusher(token_registry), f"t/pro{next(_counter)}")
    img = env.pusher.push_image(env.repo, "v1", [b"abc" * 100])
    clock = FakeClock()
    with RegistryClient(MutableCred(), config=FAST, clock=clock) as c:
        rb = c.blob(env.ref(), img["layers"][0])
        rb.read(0, 10)
        for _ in range(5):
            rb.read(5, 10)
        assert token_server.total_token_requests() == 1
        clock.t += 299  # expires_in 300, refresh margin 10 s
        rb.read(0, 10)
        assert token_server.total_token_requests() == 2
        assert c.statistics()["reauth"] == 1  # only the very first challenge


def test_identity_token_and_get_fallback(token_registry, token_server):
    token_server.reset()
    env = Env(token_registry, RawPusher(token_registry), f"t/idt{next(_counter)}")
    env.pusher.push_image(env.repo, "v1", [b"i"])
    idt = token_server.issue_identity_token(USER)
    with RegistryClient(lambda h, r: Credentials(identity_token=idt), config=FAST) as c:
        c.get_manifest(env.ref())
    assert token_server.counts["refresh_token"] == 1
    token_server.configure(post_status=405)
    try:
        with RegistryClient(MutableCred(), config=FAST) as c:
            c.get_manifest(env.ref())
        assert token_server.counts["get"] == 1
    finally:
        token_server.configure(post_status=None)


def test_token_endpoint_5xx_is_retried_and_html_is_an_error(token_registry, token_server):
    token_server.reset()
    env = Env(token_registry, RawPusher(token_registry), f"t/tok5{next(_counter)}")
    env.pusher.push_image(env.repo, "v1", [b"5"])
    token_server.fail_next(503, times=2)
    with RegistryClient(MutableCred(), config=FAST) as c:
        c.get_manifest(env.ref())
    token_server.fail_next(200, times=1, body=b"<html><body>Sign in</body></html>", content_type="text/html")
    from soci_fs.errors import Unavailable

    with RegistryClient(MutableCred(), config=FAST) as c, pytest.raises(Unavailable, match="non-JSON"):
        c.get_manifest(env.ref())
    token_server.configure(omit_expires_in=True)
    try:
        with RegistryClient(MutableCred(), config=FAST) as c:
            c.get_manifest(env.ref())
            c.get_manifest(env.ref())
    finally:
        token_server.configure(omit_expires_in=False)
