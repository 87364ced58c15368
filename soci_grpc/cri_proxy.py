"""The CRI ImageService proxy: the kubelet's image calls pass through to containerd; pull credentials stay.

This module owns :class:`CriImageProxy`, a gRPC generic handler that serves ``runtime.v1.ImageService`` (and
``runtime.v1alpha2.ImageService``, which containerd 1.6 also serves) on the daemon's socket and forwards
every call to the real CRI image service (``[cri_keychain] image_service_path``):

* Pass-through of bytes. Requests go to the backend as the bytes that arrived and responses come back as the
  bytes the backend sent, so fields this project's proto (``proto/cri/api.proto``, generated into
  ``soci_grpc._proto.cri``) does not declare, and methods it does not know, survive. Status code,
  details and trailing metadata of backend errors are passed back unchanged. Deadlines propagate (the
  backend call gets the time remaining), request metadata is forwarded (minus transport headers), and a
  cancelled client call cancels the backend call.
* Two methods are also decoded, read-only:
  ``PullImage`` records ``auth`` for ``image.image`` in the :class:`CriCredentialStore` *before* forwarding
  (a pull that fails still leaves its entry: the kubelet retries with the same credentials, and a stale
  entry is harmless because the registry decides). A request that does not decode or carries a bad
  ``AuthConfig`` is logged at WARNING, without any secret, and forwarded anyway; containerd gives the answer.
  ``RemoveImage`` drops the entry after the backend reports success. When the request names an image id or
  a digest rather than the reference that was pulled, the proxy first asks the backend for the image's
  ``repo_tags``/``repo_digests`` (best effort) and drops each of them too.
* The backend channel is dialled lazily and redialled forever with a backoff capped at
  ``max_backoff`` seconds. Calls never wait for it: while it is down each call fails at once with
  ``UNAVAILABLE`` and a message naming the backend. (Upstream retries the dial 100 times, 10 s apart, then
  gives up for good, and answers ``server is not initialized yet`` meanwhile.)

It will not: look at credentials beyond handing them to the store, log request or response bodies, rewrite
anything it forwards, or configure the server it is added to (message size limits and the thread pool are
the server owner's; a PullImage occupies a worker thread for the whole pull).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from soci_fs.errors import SociError
from soci_grpc._proto.cri import api_pb2
from soci_grpc.keychain.cri import CriCredentialStore

log = logging.getLogger(__name__)

SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
"""The services proxied. Every unary method under them is forwarded; these five are the known ones."""
METHODS = ("ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo")

MAX_MESSAGE = 16 << 20  # containerd's own gRPC limit; ListImages on a big node exceeds gRPC's 4 MiB default
_NO_DEADLINE = 1e7  # seconds; gRPC Python reports "no deadline" as a time remaining far beyond this
_DROP_METADATA = {"user-agent", "content-type", "te", "host"}


def backend_target(address: str) -> str:
    """A gRPC target for ``image_service_path``: a bare path becomes ``unix://<path>``."""
    a = address.strip()
    if not a:
        raise ValueError("CRI image service backend address is empty")
    if a.startswith("/"):
        return "unix://" + a
    return a


@dataclass(frozen=True)
class _Forwarded:
    body: bytes
    trailing: tuple[tuple[str, str | bytes], ...]


class BackendError(Exception):
    """The backend answered a call with an error status (already in the form to pass back)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, Any]]) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = tuple(trailing)


class CriImageProxy(grpc.GenericRpcHandler):
    """Forwards ``runtime.v1[alpha2].ImageService`` to ``backend_address``, recording pull credentials.

    Args:
        store: where PullImage credentials go.
        backend_address: containerd's socket (``/run/containerd/containerd.sock`` or any gRPC target).
        max_backoff: longest wait, in seconds, between redials of a backend that is down.
    """

    def __init__(self, store: CriCredentialStore, backend_address: str, *, max_backoff: float = 2.0) -> None:
        self.store = store
        self.target = backend_target(backend_address)
        backoff_ms = max(1, int(max_backoff * 1000))
        self._channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.initial_reconnect_backoff_ms", min(100, backoff_ms)),
                ("grpc.min_reconnect_backoff_ms", min(100, backoff_ms)),
                ("grpc.max_reconnect_backoff_ms", backoff_ms),
                ("grpc.enable_retries", 0),
            ],
        )
        self._lock = threading.Lock()
        self._state = grpc.ChannelConnectivity.IDLE
        self._channel.subscribe(self._on_state, try_to_connect=False)
        self._callables: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._stats = {"calls": 0, "errors": 0, "backend_unavailable": 0, "pulls_recorded": 0}
        self._closed = False

    # ---- grpc.GenericRpcHandler

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        service, _, method = path.lstrip("/").rpartition("/")
        if service not in SERVICES or not method:
            return None
        with self._lock:
            handler = self._handlers.get(path)
            if handler is None:
                handler = grpc.unary_unary_rpc_method_handler(self._behaviour(path, method))
                self._handlers[path] = handler
        return handler

    def _behaviour(self, path: str, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._handle(path, method, request, context)

        return call

    # ---- one call

    def _handle(self, path: str, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("calls")
        removing: list[str] = []
        if method == "PullImage":
            self._record_pull(path, request)
        elif method == "RemoveImage":
            removing = self._names_to_remove(path, request, context)
        try:
            out = self._forward(path, request, context)
        except BackendError as exc:
            self._count("errors")
            context.set_trailing_metadata(exc.trailing)
            context.abort(exc.code, exc.details)
        if removing:
            dropped = [name for name in removing if self.store.remove(name)]
            log.debug("cri proxy: RemoveImage dropped credentials for %s", dropped or "nothing")
        context.set_trailing_metadata(out.trailing)
        return out.body

    def _forward(
        self,
        path: str,
        request: bytes,
        context: grpc.ServicerContext | None,
        timeout: float | None = None,
    ) -> _Forwarded:
        if self._closed:
            raise BackendError(grpc.StatusCode.UNAVAILABLE, "CRI image service proxy is shut down", ())
        mc = self._callable(path)
        metadata: list[tuple[str, Any]] = []
        if context is not None:
            remaining = _deadline(context)
            if remaining is not None:
                timeout = remaining if timeout is None else min(timeout, remaining)
            metadata = [
                (k, v)
                for k, v in context.invocation_metadata()
                if k not in _DROP_METADATA and not k.startswith((":", "grpc-"))
            ]
        fut = mc.future(request, timeout=timeout, metadata=metadata or None, wait_for_ready=False)
        if context is not None:
            context.add_callback(fut.cancel)
        try:
            body = fut.result()
        except grpc.FutureCancelledError:
            raise BackendError(grpc.StatusCode.CANCELLED, "call cancelled", ()) from None
        except grpc.RpcError as exc:
            call: Any = exc
            code, details = call.code(), call.details() or ""
            trailing = tuple(call.trailing_metadata() or ())
            if code == grpc.StatusCode.UNAVAILABLE and self._backend_down(details):
                self._count("backend_unavailable")
                log.debug("cri proxy: %s: backend %s unavailable: %s", path, self.target, details)
                details = f"CRI image service backend {self.target} is unavailable: {details}"
            raise BackendError(code, details, trailing) from None
        return _Forwarded(body=body, trailing=tuple(fut.trailing_metadata() or ()))

    def _callable(self, path: str) -> grpc.UnaryUnaryMultiCallable:
        with self._lock:
            mc = self._callables.get(path)
            if mc is None:
                # No (de)serializers: bytes in, bytes out.
                mc = self._channel.unary_unary(path)
                self._callables[path] = mc
            return mc

    def _backend_down(self, details: str) -> bool:
        with self._lock:
            state = self._state
        # An UNAVAILABLE the backend itself sent (channel READY) is passed back untouched.
        return state is not grpc.ChannelConnectivity.READY or details.startswith("failed to connect")

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            before, self._state = self._state, state
        if state is not before:
            log.debug("cri proxy: backend %s is %s", self.target, state.name)

    # ---- the decoded methods

    def _record_pull(self, path: str, request: bytes) -> None:
        try:
            msg = api_pb2.PullImageRequest.FromString(request)
        except DecodeError:
            log.warning(
                "cri proxy: %s request does not decode; forwarded without recording credentials", path
            )
            return
        image = msg.image.image
        auth = msg.auth if msg.HasField("auth") else None
        try:
            self.store.record(image, auth)
        except SociError as exc:  # the store's messages name the image, never a secret
            log.warning(
                "cri proxy: credentials of PullImage %r not recorded (%s); forwarded anyway", image, exc
            )
            return
        self._count("pulls_recorded")
        log.debug(
            "cri proxy: PullImage %s (%s)", image, "with credentials" if auth is not None else "anonymous"
        )

    def _names_to_remove(self, path: str, request: bytes, context: grpc.ServicerContext) -> list[str]:
        try:
            msg = api_pb2.RemoveImageRequest.FromString(request)
        except DecodeError:
            log.debug("cri proxy: %s request does not decode; no credentials dropped", path)
            return []
        image = msg.image.image
        names = [image] if image else []
        # The entry is keyed by the reference that was pulled; an id or another name of the image needs the
        # backend to say which references it has.
        status_path = path.rpartition("/")[0] + "/ImageStatus"
        status_req = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)).SerializeToString()
        try:
            out = self._forward(status_path, status_req, None, timeout=_status_timeout(context))
            status = api_pb2.ImageStatusResponse.FromString(out.body)
        except (BackendError, DecodeError) as exc:
            log.debug("cri proxy: ImageStatus before RemoveImage %s failed: %s", image, exc)
            return names
        for name in (*status.image.repo_tags, *status.image.repo_digests):
            if name not in names:
                names.append(name)
        return names

    # ---- lifecycle and introspection

    def statistics(self) -> dict[str, Any]:
        """Counters and the backend's connectivity state."""
        with self._lock:
            return {**self._stats, "backend": self.target, "backend_state": self._state.name}

    def _count(self, what: str) -> None:
        with self._lock:
            self._stats[what] += 1

    def close(self) -> None:
        """Close the backend channel; later calls fail with UNAVAILABLE."""
        self._closed = True
        self._channel.unsubscribe(self._on_state)
        self._channel.close()


def _deadline(context: grpc.ServicerContext) -> float | None:
    """Seconds left for the call; None when the client set no deadline (gRPC reports a huge number)."""
    remaining = context.time_remaining()
    if remaining is None or not remaining < _NO_DEADLINE:
        return None
    return remaining


def _status_timeout(context: grpc.ServicerContext) -> float:
    remaining = _deadline(context)
    return 10.0 if remaining is None else max(0.0, min(10.0, remaining))


def add_to_server(
    server: grpc.Server, store: CriCredentialStore, backend_address: str, **kw: Any
) -> CriImageProxy:
    """Serve the proxy on ``server`` (next to the snapshots service); the caller closes the returned proxy."""
    proxy = CriImageProxy(store, backend_address, **kw)
    server.add_generic_rpc_handlers((proxy,))
    log.info("cri proxy: serving %s, forwarding to %s", ", ".join(SERVICES), proxy.target)
    return proxy


@dataclass
class StandaloneProxy:
    """A proxy on its own server (tests, tools); ``stop()`` stops the server and closes the channel."""

    server: grpc.Server
    proxy: CriImageProxy
    address: str

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace).wait()
        self.proxy.close()


def serve_standalone(
    socket_path: str,
    store: CriCredentialStore,
    backend_address: str,
    *,
    max_workers: int = 16,
    **kw: Any,
) -> StandaloneProxy:
    """Serve only the proxy on the unix socket ``socket_path``; returns once listening."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cri-proxy"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    proxy = add_to_server(server, store, backend_address, **kw)
    address = "unix://" + socket_path
    server.add_insecure_port(address)
    server.start()
    return StandaloneProxy(server=server, proxy=proxy, address=address)
