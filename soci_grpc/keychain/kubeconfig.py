"""The Kubernetes-secret keychain: a local copy of ``kubernetes.io/dockerconfigjson`` secrets.

This module owns syncing secrets from the API server (through the official ``kubernetes`` client: its
kubeconfig loading, authentication, TLS and API methods) and answering lookups from the local copy:

* kubeconfig: ``kubeconfig_path`` when set — the background thread waits (polling every
  ``file_poll_interval`` s) for the file to appear; otherwise the client's default (``$KUBECONFIG``, then
  ``~/.kube/config``), then in-cluster configuration when ``KUBERNETES_SERVICE_HOST`` is set. A kubeconfig
  that cannot be loaded is logged (WARNING) and retried; the keychain stays empty meanwhile.
* sync, per scope (all namespaces, or each namespace of ``namespaces``): LIST with field selector
  ``type=kubernetes.io/dockerconfigjson`` (and ``label_selector`` when set), replace the scope's cached
  secrets, then WATCH from the list's ``resourceVersion`` with bookmarks. ADDED/MODIFIED replace,
  DELETED removes, BOOKMARK advances the resource version. A watch that ends cleanly (server timeout) is
  re-opened from the last resource version; an ERROR event with code 410 (Gone: the version is too old)
  re-lists at once; a dropped connection or failed request re-lists after an exponential backoff
  (``min_backoff`` .. ``max_backoff``). The stream is read raw (``_preload_content=False``) rather than
  through ``kubernetes.watch.Watch`` so that ``stop()`` can shut the open response and the thread ends
  promptly, and so ERROR/BOOKMARK events are handled here explicitly.
* secrets: ``.dockerconfigjson`` is parsed with the Docker config rules (``docker_config.py``) except that
  ``credsStore``/``credHelpers`` are ignored — a cluster object must never make the node run a program. A
  secret that does not parse is logged by namespace/name (WARNING, no content) and skipped.
* lookup (beyond upstream, which picks an arbitrary matching secret): every ``auths`` entry of every secret
  that applies to (host, repository) is a candidate (kubelet semantics: a key's path must be a prefix of the
  repository); the most specific path wins, then a host-only entry (exact Docker key before other spellings),
  then namespace/name order, then file order. The chosen secret is named in ``Credentials.source``
  (``secret:<namespace>/<name>``).

``start()`` runs the background thread; ``wait_ready(timeout)`` lets callers bound how long they wait for the
first complete list; ``stop()`` ends everything. It will not read pods or ``imagePullSecrets`` (an on-demand
mode is future work) and never writes to the cluster.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

from soci_fs.errors import FormatError, InvalidArgument, SociError
from soci_fs.registry.credentials import Credentials
from soci_grpc.keychain.docker_config import (
    DockerConfig,
    match_auths,
    parse_docker_config,
    repository_of,
)
from soci_grpc.keychain.explain import Trace

log = logging.getLogger(__name__)

SECRET_TYPE = "kubernetes.io/dockerconfigjson"
FIELD_SELECTOR = f"type={SECRET_TYPE}"
DATA_KEY = ".dockerconfigjson"


@dataclass(frozen=True)
class SyncedSecret:
    """One secret as synced: where it came from and its parsed Docker config."""

    namespace: str
    name: str
    resource_version: str
    scope: str  # "" = all namespaces, else the namespace whose watch delivered it
    config: DockerConfig


class _Expired(Exception):
    """The watch's resource version is too old (410 Gone): re-list."""


class _Disconnected(Exception):
    """The watch stream broke mid-way (the cause is chained): back off, then re-list."""


class _StreamError(Exception):
    """The API server sent an ERROR event other than 410."""


class KubeSecretKeychain:
    """Kubernetes ``dockerconfigjson`` secrets as a ``Credential`` callable.

    Args:
        kubeconfig_path: explicit kubeconfig; None/"" for the client's default (see module docstring).
        namespaces: sync only these namespaces (default: all).
        label_selector: sync only secrets matching this label selector (default: all).
        file_poll_interval: seconds between checks for a missing kubeconfig.
        min_backoff, max_backoff: bounds of the re-list backoff after errors (seconds).
        watch_timeout: ``timeoutSeconds`` asked of the server for each watch.
        request_timeout: (connect, read) timeouts of list requests; watches read with
            ``watch_timeout + read`` seconds.
    """

    name = "kubernetes-secrets"

    def __init__(
        self,
        kubeconfig_path: str | os.PathLike[str] | None = None,
        *,
        namespaces: Sequence[str] = (),
        label_selector: str = "",
        file_poll_interval: float = 10.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        watch_timeout: int = 300,
        request_timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        if min_backoff <= 0 or max_backoff < min_backoff:
            raise InvalidArgument("kubeconfig keychain: need 0 < min_backoff <= max_backoff")
        self.kubeconfig_path = Path(kubeconfig_path) if kubeconfig_path else None
        self.namespaces = tuple(sorted(set(namespaces)))
        for ns in self.namespaces:
            if not ns or "/" in ns:
                raise InvalidArgument(f"kubeconfig keychain: bad namespace {ns!r}")
        self.label_selector = label_selector
        self._poll = file_poll_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._secrets: dict[tuple[str, str], SyncedSecret] = {}
        self._synced_scopes: set[str] = set()
        self._responses: set[Any] = set()  # open HTTP responses, shut by stop()
        self._thread: threading.Thread | None = None
        self._api_client: Any = None
        self._stats = {"lists": 0, "watches": 0, "events": 0, "expired": 0, "errors": 0, "bad_secrets": 0}

    # ---------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the background sync thread (once)."""
        if self._thread is not None:
            raise InvalidArgument("kubeconfig keychain already started")
        self._thread = threading.Thread(target=self._main, name="soci-kube-secrets", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None) -> bool:
        """Wait until every scope has been listed once; False on timeout."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop syncing: wake every wait, shut open responses, join the threads."""
        self._stop.set()
        with self._lock:
            responses = list(self._responses)
        for resp in responses:
            _shutdown(resp)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("kubeconfig keychain: sync thread did not stop within %s s", timeout)
        if self._api_client is not None:
            try:
                self._api_client.close()
            except Exception:
                log.debug("kubeconfig keychain: closing the API client failed", exc_info=True)
            self._api_client = None

    def __enter__(self) -> KubeSecretKeychain:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def statistics(self) -> dict[str, object]:
        with self._lock:
            return {**self._stats, "secrets": len(self._secrets), "ready": self._ready.is_set()}

    def secrets(self) -> tuple[SyncedSecret, ...]:
        """The synced secrets, in namespace/name order."""
        with self._lock:
            return tuple(self._secrets[k] for k in sorted(self._secrets))

    # ---------------------------------------------------------------------------------------- lookup

    def __call__(self, host: str, ref: str) -> Credentials | None:
        return self.trace(host, ref).answer

    def trace(self, host: str, ref: str) -> Trace:
        repo = repository_of(ref)
        steps: list[str] = []
        if not self._ready.is_set():
            steps.append("not synced yet (first list incomplete); answering from what is known")
        candidates: list[tuple[tuple[int, int], str, str, int, Credentials]] = []
        secrets = self.secrets()
        for s in secrets:
            for order, (rank, entry) in enumerate(match_auths(s.config.auths, host, repo, strict_paths=True)):
                creds = entry.credentials(f"secret:{s.namespace}/{s.name}")
                if creds is not None:
                    candidates.append((rank, s.namespace, s.name, order, creds))
                    steps.append(f"candidate: secret {s.namespace}/{s.name}, auths entry {entry.key!r}")
        if not candidates:
            steps.append(f"no synced secret has credentials for this host ({len(secrets)} secrets)")
            return Trace(steps=tuple(steps))
        candidates.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
        best = candidates[0]
        why = "most specific repository path" if best[0][0] == 0 else "host match"
        steps.append(f"chosen: secret {best[1]}/{best[2]} ({why}, then namespace/name order)")
        return Trace(answer=best[4], steps=tuple(steps))

    # ---------------------------------------------------------------------------------------- sync

    def _main(self) -> None:
        client = self._connect()
        if client is None:
            return
        scopes = list(self.namespaces) or [""]
        if len(scopes) == 1:
            self._sync_scope(client, scopes[0])
            return
        threads = [
            threading.Thread(
                target=self._sync_scope, args=(client, s), name=f"soci-kube-secrets-{s}", daemon=True
            )
            for s in scopes
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _connect(self) -> Any:
        """Wait for and load the kubeconfig; a CoreV1Api, or None when stopped first."""
        from kubernetes import client as kclient
        from kubernetes import config as kconfig
        from kubernetes.config.kube_config import KUBE_CONFIG_DEFAULT_LOCATION

        last_error = ""
        waited = False
        while not self._stop.is_set():
            path = self.kubeconfig_path
            incluster = False
            if path is None:
                default = Path(
                    os.path.expanduser(os.environ.get("KUBECONFIG") or KUBE_CONFIG_DEFAULT_LOCATION)
                )
                if default.exists():
                    path = default
                elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                    incluster = True
                else:
                    path = default
            if path is not None and not path.exists():
                if not waited:
                    log.info("kubeconfig keychain: waiting for kubeconfig %s to appear", path)
                    waited = True
                self._stop.wait(self._poll)
                continue
            try:
                cfg = kclient.Configuration()
                if incluster:
                    kconfig.load_incluster_config(client_configuration=cfg)
                else:
                    kconfig.load_kube_config(
                        config_file=str(path), client_configuration=cfg, persist_config=False
                    )
                self._api_client = kclient.ApiClient(configuration=cfg)
                log.info("kubeconfig keychain: using %s", "in-cluster config" if incluster else path)
                return kclient.CoreV1Api(self._api_client)
            except Exception as exc:  # the client raises many types for a bad kubeconfig
                msg = f"{type(exc).__name__}: {exc}"
                if msg != last_error:
                    log.warning(
                        "kubeconfig keychain: cannot load kubeconfig %s (%s); retrying every %s s",
                        path or "in-cluster",
                        type(exc).__name__,
                        self._poll,
                    )
                    last_error = msg
                self._stop.wait(self._poll)
        return None

    def _sync_scope(self, api: Any, scope: str) -> None:
        what = f"namespace {scope!r}" if scope else "all namespaces"
        backoff = self._min_backoff
        while not self._stop.is_set():
            try:
                rv = self._list(api, scope)
                backoff = self._min_backoff
                while not self._stop.is_set():
                    rv = self._watch(api, scope, rv)
            except _Expired:
                with self._lock:
                    self._stats["expired"] += 1
                log.info("kubeconfig keychain: watch of %s expired (410 Gone); re-listing", what)
                continue
            except _Disconnected as exc:
                # Routine (API server restart, idle timeout on a load balancer): the cache stays valid.
                level, reason = logging.INFO, f"watch stream broke: {_describe_error(exc.__cause__ or exc)}"
            except Exception as exc:
                level, reason = logging.WARNING, _describe_error(exc)
            if self._stop.is_set():
                return
            with self._lock:
                self._stats["errors"] += 1
            log.log(level, "kubeconfig keychain: sync of %s: %s; re-listing in %.1f s", what, reason, backoff)
            self._stop.wait(backoff * random.uniform(0.8, 1.0))
            backoff = min(backoff * 2, self._max_backoff)

    def _call(self, api: Any, scope: str, **kwargs: Any) -> Any:
        kwargs["field_selector"] = FIELD_SELECTOR
        if self.label_selector:
            kwargs["label_selector"] = self.label_selector
        kwargs["_preload_content"] = False
        if scope:
            return api.list_namespaced_secret(scope, **kwargs)
        return api.list_secret_for_all_namespaces(**kwargs)

    def _list(self, api: Any, scope: str) -> str:
        resp = self._call(api, scope, _request_timeout=self._request_timeout)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = body.get("items") or []
        rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
        fresh: dict[tuple[str, str], SyncedSecret] = {}
        for obj in items:
            s = self._parse_secret(obj, scope)
            if s is not None:
                fresh[(s.namespace, s.name)] = s
        with self._lock:
            for k in [k for k, v in self._secrets.items() if v.scope == scope]:
                del self._secrets[k]
            self._secrets.update(fresh)
            self._stats["lists"] += 1
            self._synced_scopes.add(scope)
            if all(s in self._synced_scopes for s in (self.namespaces or ("",))):
                self._ready.set()
        log.debug("kubeconfig keychain: listed %d secrets (resourceVersion %s)", len(fresh), rv)
        return rv

    def _watch(self, api: Any, scope: str, rv: str) -> str:
        """Follow one watch stream; the last resource version seen when it ends cleanly."""
        resp = self._call(
            api,
            scope,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _request_timeout=(self._request_timeout[0], self._watch_timeout + self._request_timeout[1]),
        )
        with self._lock:
            self._responses.add(resp)
            self._stats["watches"] += 1
        try:
            if self._stop.is_set():
                return rv
            try:
                for line in _lines(resp):
                    rv = self._apply(json.loads(line), scope, rv)
            except (urllib3.exceptions.HTTPError, OSError, json.JSONDecodeError) as exc:
                raise _Disconnected() from exc
            return rv
        finally:
            with self._lock:
                self._responses.discard(resp)
            resp.release_conn()

    def _apply(self, event: dict[str, Any], scope: str, rv: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired()
            raise _StreamError(f"watch error event: code {obj.get('code')} reason {obj.get('reason')!r}")
        meta = obj.get("metadata") or {}
        new_rv = str(meta.get("resourceVersion") or rv)
        with self._lock:
            self._stats["events"] += 1
        if kind == "BOOKMARK":
            return new_rv
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if kind == "DELETED":
            with self._lock:
                self._secrets.pop(key, None)
            log.debug("kubeconfig keychain: secret %s/%s deleted", *key)
        elif kind in ("ADDED", "MODIFIED"):
            s = self._parse_secret(obj, scope)
            with self._lock:
                if s is None:
                    self._secrets.pop(key, None)
                else:
                    self._secrets[key] = s
            log.debug("kubeconfig keychain: secret %s/%s %s", key[0], key[1], kind.lower())
        else:
            log.debug("kubeconfig keychain: ignoring watch event type %r", kind)
        return new_rv

    def _parse_secret(self, obj: dict[str, Any], scope: str) -> SyncedSecret | None:
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        problem = ""
        cfg: DockerConfig | None = None
        if obj.get("type") != SECRET_TYPE:
            problem = "wrong type"
        else:
            raw = (obj.get("data") or {}).get(DATA_KEY)
            if not isinstance(raw, str):
                problem = f"no {DATA_KEY} key"
            else:
                try:
                    data = base64.b64decode(raw, validate=True)
                    cfg = parse_docker_config(data, f"secret {ns}/{name}", allow_helpers=False)
                except (binascii.Error, ValueError):
                    problem = f"{DATA_KEY} is not base64"
                except SociError as exc:
                    problem = _problem_of(exc)
        if cfg is None:
            with self._lock:
                self._stats["bad_secrets"] += 1
            log.warning("kubeconfig keychain: skipping secret %s/%s: %s", ns, name, problem)
            return None
        return SyncedSecret(
            namespace=ns,
            name=name,
            resource_version=str(meta.get("resourceVersion", "")),
            scope=scope,
            config=cfg,
        )


def _problem_of(exc: SociError) -> str:
    """The problem part of a parse error (the messages name fields, never values)."""
    text = str(exc)
    if isinstance(exc, FormatError | InvalidArgument) and ": " in text:
        return text.split(": ", 1)[1]
    return text


def _lines(resp: Any) -> Iterator[bytes]:
    """Newline-delimited JSON from a streaming urllib3 response."""
    buf = b""
    for chunk in resp.stream(65536, decode_content=True):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _shutdown(resp: Any) -> None:
    """Interrupt a blocked read on ``resp`` from another thread."""
    try:
        shutdown: Callable[[], None] | None = getattr(resp, "shutdown", None)
        if shutdown is not None:
            shutdown()
        else:
            resp.close()
    except Exception:
        log.debug("kubeconfig keychain: shutting a response failed", exc_info=True)


def _describe_error(exc: BaseException) -> str:
    """A short, secret-free description (API errors: status and reason only, never the body)."""
    status = getattr(exc, "status", None)
    if status is not None and hasattr(exc, "reason"):
        return f"API status {status} {getattr(exc, 'reason', '')}".strip()
    return type(exc).__name__ + (f": {exc}" if str(exc) and len(str(exc)) < 200 else "")
