"""The CRI ImageService proxy against a fake backend: a real gRPC server on a unix socket.

The backend implements the generated ``ImageServiceServicer`` (and the same methods under
``runtime.v1alpha2``); the tests talk to the proxy with raw bytes, so what is compared is exactly what went
over the wire. Unknown fields are made by appending an encoded field the proto does not declare.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from soci_fs.registry.credentials import Credentials
from soci_grpc._proto.cri import api_pb2, api_pb2_grpc
from soci_grpc.cri_proxy import StandaloneProxy, serve_standalone
from soci_grpc.keychain.cri import CriCredentialStore

IMAGE = "127.0.0.1:5000/team/app:v1"
HOST = "127.0.0.1:5000"
SECRET = "pa55-W0rd-never-logged"
V1 = "runtime.v1.ImageService"
V1ALPHA2 = "runtime.v1alpha2.ImageService"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def unknown_field(number: int, data: bytes) -> bytes:
    """An encoded length-delimited field ``number`` (one the proto does not declare)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


EXTRA_REQ = unknown_field(99, b"from-the-kubelet") + unknown_field(3, b"")  # 3: PullImage sandbox_config
EXTRA_RESP = unknown_field(77, b"from-containerd")


@dataclass
class Seen:
    method: str
    service: str
    request: bytes
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class FakeImageService(api_pb2_grpc.ImageServiceServicer):
    """Answers every method with a fixed message carrying an unknown field; records what it got."""

    seen: list[Seen] = field(default_factory=list)
    fail: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    repo_tags: list[str] = field(default_factory=list)
    delay: float = 0.0
    active_after_delay: list[bool] = field(default_factory=list)
    service_name: str = V1

    def _answer(self, method: str, request: Any, context: grpc.ServicerContext, response: Any) -> Any:
        self.seen.append(
            Seen(
                method=method,
                service=self.service_name,
                request=request.SerializeToString(),
                metadata={k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
                time_remaining=context.time_remaining(),
            )
        )
        if self.delay:
            time.sleep(self.delay)
            self.active_after_delay.append(context.is_active())
        if method in self.fail:
            code, details = self.fail[method]
            context.set_trailing_metadata((("x-backend-trailer", "kept"),))
            context.abort(code, details)
        return type(response).FromString(response.SerializeToString() + EXTRA_RESP)

    def ListImages(self, request: Any, context: grpc.ServicerContext) -> Any:
        img = api_pb2.Image(id="sha256:aa", repo_tags=[IMAGE], size=10)
        return self._answer("ListImages", request, context, api_pb2.ListImagesResponse(images=[img]))

    def ImageStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        img = api_pb2.Image(id="sha256:aa", repo_tags=self.repo_tags or [request.image.image], size=10)
        return self._answer("ImageStatus", request, context, api_pb2.ImageStatusResponse(image=img))

    def PullImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer("PullImage", request, context, api_pb2.PullImageResponse(image_ref="sha256:aa"))

    def RemoveImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer("RemoveImage", request, context, api_pb2.RemoveImageResponse())

    def ImageFsInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        usage = api_pb2.FilesystemUsage(timestamp=1, fs_id=api_pb2.FilesystemIdentifier(mountpoint="/x"))
        return self._answer(
            "ImageFsInfo", request, context, api_pb2.ImageFsInfoResponse(image_filesystems=[usage])
        )


REQUESTS: dict[str, tuple[type, Callable[[], Any]]] = {
    "ListImages": (
        api_pb2.ListImagesResponse,
        lambda: api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=api_pb2.ImageSpec(image=IMAGE))),
    ),
    "ImageStatus": (
        api_pb2.ImageStatusResponse,
        lambda: api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=IMAGE), verbose=True),
    ),
    "PullImage": (
        api_pb2.PullImageResponse,
        lambda: api_pb2.PullImageRequest(
            image=api_pb2.ImageSpec(image=IMAGE, annotations={"a": "b"}),
            auth=api_pb2.AuthConfig(username="u", password=SECRET),
        ),
    ),
    "RemoveImage": (
        api_pb2.RemoveImageResponse,
        lambda: api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=IMAGE)),
    ),
    "ImageFsInfo": (api_pb2.ImageFsInfoResponse, lambda: api_pb2.ImageFsInfoRequest()),
}


def _alpha2_handler(servicer: FakeImageService) -> grpc.GenericRpcHandler:
    handlers = {}
    for method, (_, make) in REQUESTS.items():
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method),
            request_deserializer=type(make()).FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(V1ALPHA2, handlers)


class Backend:
    """The fake backend on ``socket``; ``start``/``stop`` may be called again (down, then up)."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.v1 = FakeImageService()
        self.v1alpha2 = FakeImageService(service_name=V1ALPHA2)
        self.server: grpc.Server | None = None

    def start(self) -> Backend:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        api_pb2_grpc.add_ImageServiceServicer_to_server(self.v1, server)
        server.add_generic_rpc_handlers((_alpha2_handler(self.v1alpha2),))
        server.add_insecure_port("unix://" + self.socket)
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait()
            self.server = None

    def seen(self, method: str, service: str = V1) -> list[Seen]:
        svc = self.v1 if service == V1 else self.v1alpha2
        return [s for s in svc.seen if s.method == method]


@dataclass
class Rig:
    dir: Path
    backend: Backend
    store: CriCredentialStore
    proxy: StandaloneProxy
    channel: grpc.Channel

    def raw(self, method: str, request: bytes, service: str = V1, **kw: Any) -> bytes:
        return self.channel.unary_unary(f"/{service}/{method}")(request, **kw)

    def call(self, method: str, request: Any, service: str = V1, **kw: Any) -> Any:
        resp_type = REQUESTS[method][0]
        return resp_type.FromString(self.raw(method, request.SerializeToString(), service, **kw))


def _short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp"))  # unix socket paths must stay short


@pytest.fixture
def rig() -> Iterator[Rig]:
    d = _short_dir()
    backend = Backend(str(d / "backend.sock")).start()
    store = CriCredentialStore()
    proxy = serve_standalone(str(d / "proxy.sock"), store, backend.socket, max_backoff=0.2)
    channel = grpc.insecure_channel(proxy.address)
    try:
        yield Rig(d, backend, store, proxy, channel)
    finally:
        channel.close()
        proxy.stop()
        backend.stop()
        shutil.rmtree(d, ignore_errors=True)


# ---- pass-through


@pytest.mark.parametrize("service", [V1, V1ALPHA2])
@pytest.mark.parametrize("method", list(REQUESTS))
def test_every_method_passes_through_with_unknown_fields(rig: Rig, method: str, service: str) -> None:
    resp_type, make = REQUESTS[method]
    request = make().SerializeToString() + EXTRA_REQ
    got = rig.raw(method, request, service, timeout=5)
    seen = rig.backend.seen(method, service)
    assert [s.request for s in seen] == [request]  # the bytes the client sent, unknown fields included
    assert got.endswith(EXTRA_RESP)  # the backend's bytes, unknown fields included
    assert resp_type.FromString(got).SerializeToString() == got


def test_unknown_method_of_the_service_is_forwarded(rig: Rig) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        rig.raw("SomeFutureMethod", b"", timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the backend's answer
    stats = rig.proxy.proxy.statistics()
    assert (stats["calls"], stats["errors"]) == (1, 1)


def test_other_services_are_not_served(rig: Rig) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        rig.raw("Version", b"", service="runtime.v1.RuntimeService", timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert rig.proxy.proxy.statistics()["calls"] == 0


def test_backend_errors_pass_through_unchanged(rig: Rig) -> None:
    rig.backend.v1.fail["ImageStatus"] = (grpc.StatusCode.NOT_FOUND, 'image "x" not found: detail')
    with pytest.raises(grpc.RpcError) as ei:
        rig.call("ImageStatus", REQUESTS["ImageStatus"][1](), timeout=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert ei.value.details() == 'image "x" not found: detail'
    assert ("x-backend-trailer", "kept") in tuple(ei.value.trailing_metadata())


def test_metadata_and_deadline_propagate(rig: Rig) -> None:
    rig.call("ListImages", api_pb2.ListImagesRequest(), metadata=(("x-kubelet", "node-1"),), timeout=7)
    (seen,) = rig.backend.seen("ListImages")
    assert seen.metadata["x-kubelet"] == "node-1"
    # The deadline crosses two hops as a relative grpc-timeout header, re-anchored to each receiver's clock,
    # so the backend may see a few milliseconds more than the client set (seen: 7.0085 s). Without
    # propagation it would see None.
    assert seen.time_remaining is not None and 0 < seen.time_remaining <= 7.1


def test_no_deadline_means_none_for_the_backend(rig: Rig) -> None:
    rig.call("ListImages", api_pb2.ListImagesRequest())
    (seen,) = rig.backend.seen("ListImages")
    assert seen.time_remaining is None or seen.time_remaining > 1e7


def test_deadline_exceeded_does_not_wait_for_the_backend(rig: Rig) -> None:
    rig.backend.v1.delay = 2.0
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        rig.call("ImageFsInfo", api_pb2.ImageFsInfoRequest(), timeout=0.3)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t < 1.5


def test_client_cancel_cancels_the_backend_call(rig: Rig) -> None:
    rig.backend.v1.delay = 0.5
    fut = rig.channel.unary_unary(f"/{V1}/ImageFsInfo").future(b"", timeout=5)
    time.sleep(0.2)
    fut.cancel()
    deadline = time.monotonic() + 5
    while not rig.backend.v1.active_after_delay and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rig.backend.v1.active_after_delay == [False]


# ---- credentials


def _pull(rig: Rig, auth: api_pb2.AuthConfig | None, image: str = IMAGE) -> None:
    req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image))
    if auth is not None:
        req.auth.CopyFrom(auth)
    rig.call("PullImage", req, timeout=5)


AUTH_VARIANTS = {
    "username-password": (
        api_pb2.AuthConfig(username="kube", password=SECRET),
        Credentials(username="kube", password=SECRET),
    ),
    "auth-base64": (
        api_pb2.AuthConfig(auth=base64.b64encode(f"kube:{SECRET}".encode()).decode()),
        Credentials(username="kube", password=SECRET),
    ),
    "identity-token": (api_pb2.AuthConfig(identity_token=SECRET), Credentials(identity_token=SECRET)),
    "registry-token": (api_pb2.AuthConfig(registry_token=SECRET), Credentials(registry_token=SECRET)),
    "server-address": (
        api_pb2.AuthConfig(username="kube", password=SECRET, server_address=f"http://{HOST}"),
        Credentials(username="kube", password=SECRET),
    ),
}


def _secret_fields(c: Credentials | None) -> tuple[str, ...] | None:
    if c is None:
        return None
    return (c.username, c.password, c.identity_token, c.registry_token)


@pytest.mark.parametrize("variant", list(AUTH_VARIANTS))
def test_pull_records_credentials(rig: Rig, variant: str, caplog: pytest.LogCaptureFixture) -> None:
    auth, want = AUTH_VARIANTS[variant]
    _pull(rig, auth)
    assert len(rig.backend.seen("PullImage")) == 1
    got = rig.store(HOST, IMAGE)
    assert _secret_fields(got) == _secret_fields(want)
    assert rig.store("other.example", IMAGE) is None
    assert SECRET not in caplog.text
    assert rig.proxy.proxy.statistics()["pulls_recorded"] == 1


def test_pull_records_under_the_normalized_name(rig: Rig) -> None:
    _pull(rig, api_pb2.AuthConfig(username="kube", password=SECRET), image="team/app")
    assert _secret_fields(rig.store("docker.io", "docker.io/team/app:latest")) == ("kube", SECRET, "", "")


def test_anonymous_pull_records_no_credentials(rig: Rig) -> None:
    _pull(rig, None)
    assert rig.store(HOST, IMAGE) is None
    assert [str(e.ref) for e in rig.store.entries()] == [IMAGE]


@pytest.mark.expect_log
@pytest.mark.parametrize(
    "auth",
    [
        api_pb2.AuthConfig(auth="!!not base64 " + SECRET),
        api_pb2.AuthConfig(auth=base64.b64encode(SECRET.encode()).decode()),  # no ':'
    ],
)
def test_bad_auth_is_logged_without_secrets_and_still_forwarded(
    rig: Rig, auth: api_pb2.AuthConfig, caplog: pytest.LogCaptureFixture
) -> None:
    _pull(rig, auth)
    assert len(rig.backend.seen("PullImage")) == 1
    assert rig.store.entries() == ()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and IMAGE in warnings[0].getMessage()
    assert SECRET not in caplog.text and auth.auth not in caplog.text


@pytest.mark.expect_log
def test_undecodable_pull_is_forwarded(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(grpc.RpcError):  # the fake backend cannot decode it either
        rig.raw("PullImage", b"\xff\xff\xff", timeout=5)
    assert "does not decode" in caplog.text


def test_remove_drops_credentials(rig: Rig) -> None:
    _pull(rig, api_pb2.AuthConfig(username="kube", password=SECRET))
    rig.call("RemoveImage", api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=IMAGE)), timeout=5)
    assert rig.store(HOST, IMAGE) is None
    assert rig.store.entries() == ()


def test_remove_by_image_id_drops_the_references_it_had(rig: Rig) -> None:
    _pull(rig, api_pb2.AuthConfig(username="kube", password=SECRET))
    rig.backend.v1.repo_tags = [IMAGE]
    rig.call("RemoveImage", api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image="sha256:aa")), timeout=5)
    assert rig.store.entries() == ()


def test_failed_remove_keeps_credentials(rig: Rig) -> None:
    _pull(rig, api_pb2.AuthConfig(username="kube", password=SECRET))
    rig.backend.v1.fail["RemoveImage"] = (grpc.StatusCode.UNKNOWN, "image is in use")
    with pytest.raises(grpc.RpcError) as ei:
        rig.call("RemoveImage", api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=IMAGE)), timeout=5)
    assert ei.value.details() == "image is in use"
    assert rig.store(HOST, IMAGE) is not None


# ---- backend availability


def test_backend_down_fails_fast_then_comes_up_without_restart() -> None:
    d = _short_dir()
    backend = Backend(str(d / "backend.sock"))
    store = CriCredentialStore()
    proxy = serve_standalone(str(d / "proxy.sock"), store, backend.socket, max_backoff=0.2)
    channel = grpc.insecure_channel(proxy.address)
    list_images = channel.unary_unary(f"/{V1}/ListImages")
    try:
        for _ in range(2):
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as ei:
                list_images(b"", timeout=10)
            assert time.monotonic() - t < 2
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert backend.socket in ei.value.details()
        # a pull while the backend is down still records (the kubelet will retry with the same auth)
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(f"/{V1}/PullImage")(REQUESTS["PullImage"][1]().SerializeToString(), timeout=5)
        assert store(HOST, IMAGE) is not None

        backend.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                list_images(b"", timeout=5)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "the proxy did not reconnect"
                time.sleep(0.05)
        assert len(backend.seen("ListImages")) == 1
        assert proxy.proxy.statistics()["backend_state"] == "READY"
    finally:
        channel.close()
        proxy.stop()
        backend.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_concurrent_calls(rig: Rig) -> None:
    rig.backend.v1.delay = 0.2
    errors: list[BaseException] = []

    def one() -> None:
        try:
            rig.call("ImageFsInfo", api_pb2.ImageFsInfoRequest(), timeout=5)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert time.monotonic() - t < 1.5  # not serialized
