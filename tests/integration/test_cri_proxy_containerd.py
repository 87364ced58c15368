"""The CRI ImageService proxy in front of a real containerd 1.6, pulling from the htpasswd registry.

The test plays the kubelet: it calls the proxy's socket with the CRI messages the kubelet sends (a
``PullImage`` with username and password), containerd pulls from Debian's docker-registry, and the proxy's
credential store is checked on the way. Errors are compared with what containerd says when called directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from soci_grpc._proto.cri import api_pb2
from soci_grpc.cri_proxy import StandaloneProxy, serve_standalone
from soci_grpc.keychain.cri import CriCredentialStore
from tests.fs.ocigen import MT_CONFIG, MT_LAYER_GZIP, MT_MANIFEST, Entry, gz, make_tar
from tests.harness.containerd import CONTAINERD_BIN, Containerd
from tests.harness.registry import PASSWORD, USER, RawPusher, Registry
from tests.integration.test_containerd_snapshots import Daemon

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN), reason="needs root and containerd"
    ),
]

V1 = "runtime.v1.ImageService"
V1ALPHA2 = "runtime.v1alpha2.ImageService"
_n = iter(range(100_000))


@dataclass(frozen=True)
class Pushed:
    ref: str
    config: str
    manifest: str


def push_small_image(registry: Registry, repo: str, tag: str) -> Pushed:
    """One gzip layer and a config whose ``rootfs.diff_ids`` match it (containerd's unpacker checks them)."""
    tar = make_tar([Entry("etc/", type=b"5"), Entry("etc/hello.txt", b"cri proxy\n")])
    layer = gz(tar)
    pusher = RawPusher(registry)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
        }
    ).encode()
    cdig = pusher.push_blob(repo, config)
    ldig = pusher.push_blob(repo, layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdig, "size": len(config)},
        "layers": [{"mediaType": MT_LAYER_GZIP, "digest": ldig, "size": len(layer)}],
    }
    mdig = pusher.push_manifest(repo, tag, manifest, MT_MANIFEST)
    return Pushed(ref=f"{registry.host}/{repo}:{tag}", config=cdig, manifest=mdig)


@dataclass
class Rig:
    registry: Registry
    containerd: Containerd
    store: CriCredentialStore
    proxy: StandaloneProxy
    via_proxy: grpc.Channel
    direct: grpc.Channel

    def call(
        self, method: str, request: Any, resp_type: Any, *, direct: bool = False, service: str = V1
    ) -> Any:
        channel = self.direct if direct else self.via_proxy
        raw = channel.unary_unary(f"/{service}/{method}")(request.SerializeToString(), timeout=60)
        return resp_type.FromString(raw)

    def pull(self, ref: str, password: str = PASSWORD, **kw: Any) -> api_pb2.PullImageResponse:
        req = api_pb2.PullImageRequest(
            image=api_pb2.ImageSpec(image=ref), auth=api_pb2.AuthConfig(username=USER, password=password)
        )
        return self.call("PullImage", req, api_pb2.PullImageResponse, **kw)

    def status(self, ref: str, **kw: Any) -> api_pb2.ImageStatusResponse:
        req = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref))
        return self.call("ImageStatus", req, api_pb2.ImageStatusResponse, **kw)

    def remove(self, ref: str, **kw: Any) -> None:
        req = api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref))
        self.call("RemoveImage", req, api_pb2.RemoveImageResponse, **kw)


@pytest.fixture
def rig(htpasswd_registry: Registry, containerd_factory: Any) -> Iterator[Rig]:
    ctrd = containerd_factory(registries=[htpasswd_registry.host])
    d = Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp"))
    store = CriCredentialStore()
    proxy = serve_standalone(str(d / "proxy.sock"), store, ctrd.address)
    via_proxy = grpc.insecure_channel(proxy.address)
    direct = grpc.insecure_channel("unix://" + ctrd.address)
    try:
        yield Rig(htpasswd_registry, ctrd, store, proxy, via_proxy, direct)
    finally:
        via_proxy.close()
        direct.close()
        proxy.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_pull_status_remove_through_the_proxy(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    img = push_small_image(rig.registry, f"cri/app{next(_n)}", "v1")
    assert rig.store.entries() == ()

    resp = rig.pull(img.ref)
    assert resp.image_ref == img.config

    status = rig.status(img.ref)
    assert status.image.id == img.config
    assert img.ref in status.image.repo_tags
    assert f"{img.ref.rsplit(':', 1)[0]}@{img.manifest}" in status.image.repo_digests
    assert rig.status(img.ref, direct=True) == status

    creds = rig.store(rig.registry.host, img.ref)
    assert creds is not None and (creds.username, creds.password) == (USER, PASSWORD)
    assert PASSWORD not in caplog.text

    listed = rig.call("ListImages", api_pb2.ListImagesRequest(), api_pb2.ListImagesResponse)
    assert img.config in {i.id for i in listed.images}
    fs = rig.call("ImageFsInfo", api_pb2.ImageFsInfoRequest(), api_pb2.ImageFsInfoResponse)
    assert fs.image_filesystems and str(rig.containerd.root) in fs.image_filesystems[0].fs_id.mountpoint

    rig.remove(img.ref)
    assert rig.store.entries() == ()
    assert not rig.status(img.ref).HasField("image")
    assert PASSWORD not in caplog.text


def test_wrong_password_gives_containerds_error(rig: Rig) -> None:
    img = push_small_image(rig.registry, f"cri/app{next(_n)}", "v1")
    with pytest.raises(grpc.RpcError) as via_proxy:
        rig.pull(img.ref, password="wrong-password")
    with pytest.raises(grpc.RpcError) as direct:
        rig.pull(img.ref, password="wrong-password", direct=True)
    assert via_proxy.value.code() == direct.value.code() == grpc.StatusCode.UNKNOWN
    assert via_proxy.value.details() == direct.value.details()
    assert "401 Unauthorized" in via_proxy.value.details()
    # the entry is recorded before forwarding (a kubelet retry may bring fresh credentials)
    creds = rig.store(rig.registry.host, img.ref)
    assert creds is not None and creds.password == "wrong-password"
    assert not rig.status(img.ref).HasField("image")


def test_v1alpha2_is_proxied_too(rig: Rig) -> None:
    img = push_small_image(rig.registry, f"cri/app{next(_n)}", "v1")
    resp = rig.pull(img.ref, service=V1ALPHA2)
    assert resp.image_ref == img.config
    assert rig.store(rig.registry.host, img.ref) is not None
    rig.remove(img.ref, service=V1ALPHA2)
    assert rig.store.entries() == ()


def test_the_daemon_serves_the_cri_proxy_on_its_socket(
    htpasswd_registry: Registry, containerd_factory: Any, tmp_path: Path
) -> None:
    """``[cri_keychain] enable_keychain``: the kubelet points --image-service-endpoint at our socket; a
    PullImage through it reaches containerd and its credentials are recorded in the daemon (never logged)."""
    ctrd = containerd_factory(registries=[htpasswd_registry.host])
    config = f'[cri_keychain]\nenable_keychain = true\nimage_service_path = "{ctrd.address}"\n'
    daemon = Daemon(tmp_path / "soci").start(config=config)
    try:
        img = push_small_image(htpasswd_registry, f"cri/daemon{next(_n)}", "v1")
        with grpc.insecure_channel("unix://" + daemon.socket) as channel:
            req = api_pb2.PullImageRequest(
                image=api_pb2.ImageSpec(image=img.ref),
                auth=api_pb2.AuthConfig(username=USER, password=PASSWORD),
            )
            raw = channel.unary_unary(f"/{V1}/PullImage")(req.SerializeToString(), timeout=60)
            assert api_pb2.PullImageResponse.FromString(raw).image_ref == img.config
        direct = ctrd.ctr("-n", "k8s.io", "images", "ls", "-q").stdout
        assert img.ref in direct
        messages = [r["msg"] for r in daemon.logs()]
        assert any(m.startswith("cri keychain: recorded") and img.ref in m for m in messages), messages
        assert PASSWORD not in daemon.log_path.read_text()
    finally:
        daemon.close()
