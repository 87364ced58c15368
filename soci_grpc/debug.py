"""The daemon's debug service: what the ``soci debug`` and ``soci auth explain`` commands ask the daemon.

Owns a small gRPC service on the daemon's socket, ``soci.debug.v1.Debug``, whose messages are JSON documents
(UTF-8 bytes) rather than protobuf: the answers are reports for people and scripts, they change shape as the
daemon learns more, and a JSON object keeps old clients working. Methods:

* ``Status`` (request ``{}``): every image and layer the daemon handled -- mode (lazy / local / deferred /
  degraded), fallback reason, fetched percentage, cache use, mount points (:meth:`RemoteLayers.status`),
  plus the daemon's pid and version.
* ``ExplainAuth`` (request ``{"ref": REF}``): the credential chain's explanation for REF as the *daemon* sees
  it, so credentials recorded by the CRI proxy show too, redacted as ``soci auth explain`` prints them.

Clients: :func:`call` (used by the CLI). The socket is the snapshotter socket (root only, 0660), so this adds
no new exposure; no secret is ever part of an answer.

Will not: change anything in the daemon (read-only), or serve when the layer provider is absent (then
``Status`` says so).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grpc

from soci_fs.errors import InvalidArgument, NotFound, SociError, Unavailable
from soci_fs.registry.reference import registry_host

log = logging.getLogger(__name__)

SERVICE = "soci.debug.v1.Debug"


def _encode(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def _decode(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data or b"{}")
    except ValueError as exc:
        raise InvalidArgument(f"debug request is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument("debug request is not a JSON object")
    return doc


class DebugService:
    """The handlers; ``layers`` is the daemon's :class:`~soci_grpc.layers.RemoteLayers` (or None)."""

    def __init__(self, layers: Any, chain: Any, version: str = "") -> None:
        self.layers = layers
        self.chain = chain
        self.version = version

    def status(self, request: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": os.getpid(), "version": self.version}
        if self.layers is None:
            out.update(images=[], note="remote layers are not enabled in this daemon")
        else:
            out.update(self.layers.status())
        return out

    def explain_auth(self, request: dict[str, Any]) -> dict[str, Any]:
        from soci_grpc.keychain.docker_config import split_reference
        from soci_grpc.keychain.explain import explain, render

        ref_text = str(request.get("ref") or "")
        if not ref_text:
            raise InvalidArgument("ExplainAuth: no ref given")
        ref = split_reference(ref_text)
        host = registry_host(ref.host)
        report = explain(self.chain, host, str(ref))
        header = (
            f"evaluated by the running soci-snapshotter-grpc (pid {os.getpid()}), CRI credentials included"
        )
        return {"text": render(report, header=header), "host": host, "ref": str(ref)}


def _handler(fn: Any) -> Any:
    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return _encode(fn(_decode(request)))
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SociError as exc:
            context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    return grpc.unary_unary_rpc_method_handler(handle)


def add_to_server(server: grpc.Server, service: DebugService) -> None:
    handlers = {"Status": _handler(service.status), "ExplainAuth": _handler(service.explain_auth)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def call(
    address: str, method: str, request: dict[str, Any] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """Ask the daemon at ``address`` (a socket path or ``unix://`` URL).

    Raises:
        NotFound: no daemon socket at ``address``.
        Unavailable: the daemon did not answer (not running, or too old to have the debug service).
        InvalidArgument: the daemon refused the request.
    """
    path = address.removeprefix("unix://")
    if not os.path.exists(path):
        raise NotFound(f"no soci-snapshotter-grpc socket at {path}")
    with grpc.insecure_channel("unix://" + os.path.abspath(path)) as channel:
        stub = channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            raw = stub(_encode(request or {}), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"daemon at {path}: {details}") from None
            raise Unavailable(f"daemon at {path} did not answer {method}: {details}") from None
    return _decode(raw)
