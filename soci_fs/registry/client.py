"""OCI distribution client over ``requests``: drives the auth flow, retries, redirects, range reads, pushes.

Owns:
* ``RegistryClient``: one ``requests.Session`` (keep-alive, a connection pool sized for the caller's
  concurrency) plus one ``auth.Authenticator`` (token caches). Manifests (OCI and Docker media types, image
  indexes with platform selection), blobs (digest and size verified), HEAD existence checks, the referrers
  API with the ``<alg>-<hex>`` tag fallback, uploads (monolithic, chunked, cross-repository mount) and
  manifest PUTs.
* ``RemoteBlob``: a lazy layer blob: resolves the real URL once (mirrors first; a registry redirect to
  storage is remembered), serves HTTP range reads, and re-resolves an expired pre-signed URL once.
* Retries (go-retryablehttp rules): transport errors except TLS/scheme/header errors, 429, 5xx except 501;
  backoff ``min·2^n`` capped at ``max`` with jitter ``[0, wait/8)``, ``Retry-After`` honoured on 429/503.
* Redirects are followed by hand (at most 10): the ``Authorization`` header and the auth flow only apply to
  the registry host, never to storage hosts.
* Error mapping to ``soci_fs.errors``: 401 after re-authentication and 403 -> ``Unauthenticated``; 404 ->
  ``NotFound``; transport errors, 429 and 5xx after retries -> ``Unavailable``; digest/size mismatch and a
  malformed ``Content-Range`` -> ``FormatError``. Messages name host, repository and digest.
* Logging: one DEBUG record per HTTP attempt (method, URL with query values redacted, status). Authorization
  headers, passwords, tokens and signed query values are never logged.

Will not: choose credentials (it calls the ``Credential`` it was given), cache content on disk, parse SOCI
formats, or send multi-range requests (reads are single ranges; callers merge).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import platform as _platform
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import requests
import requests.adapters
import requests.auth

from soci_fs import __version__
from soci_fs.errors import FormatError, InvalidArgument, NotFound, SociError, Unauthenticated, Unavailable
from soci_fs.registry import auth
from soci_fs.registry.credentials import Credential
from soci_fs.registry.redact import install_urllib3_filter, redact_url, short_body
from soci_fs.registry.reference import (
    Reference,
    RegistryConfig,
    RegistryHost,
    RetryConfig,
    resolve_hosts,
    validate_digest,
)

log = logging.getLogger(__name__)

USER_AGENT = f"soci-snapshotter/{__version__} (soci-py)"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MAX_MANIFEST_SIZE = 4 << 20
ERROR_BODY_LIMIT = 64 << 10
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
DEFAULT_CHUNK_SIZE = 16 << 20


# --------------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (the fields this client needs)."""

    media_type: str
    digest: str
    size: int
    artifact_type: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Descriptor:
        try:
            return cls(
                media_type=str(doc.get("mediaType", "")),
                digest=str(doc["digest"]),
                size=int(doc["size"]),
                artifact_type=str(doc.get("artifactType", "")),
                annotations=dict(doc.get("annotations") or {}),
                platform=doc.get("platform"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"malformed descriptor {doc!r}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


@dataclass(frozen=True)
class Manifest:
    """A fetched manifest or index: raw bytes (digest verified), its media type and digest."""

    media_type: str
    digest: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.data)
        except ValueError as exc:
            raise FormatError(f"manifest {self.digest} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise FormatError(f"manifest {self.digest} is not a JSON object")
        return doc

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hasher(digest: str) -> Any:
    alg = digest.split(":", 1)[0]
    try:
        return hashlib.new(alg)
    except ValueError as exc:
        raise InvalidArgument(f"unsupported digest algorithm in {digest!r}") from exc


def host_platform() -> str:
    """``os/arch[/variant]`` of this machine in OCI terms."""
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm/v7",
    }.get(machine, machine)
    return "linux/" + arch


def _platform_matches(want: str, have: Mapping[str, Any] | None) -> bool:
    if not have:
        return False
    parts = want.split("/")
    os_, arch = parts[0], parts[1] if len(parts) > 1 else ""
    variant = parts[2] if len(parts) > 2 else ""
    if have.get("os") != os_ or have.get("architecture") != arch:
        return False
    hv = have.get("variant", "")
    if variant and hv and variant != hv:
        return False
    if arch == "arm64" and variant and not hv:
        return variant == "v8"
    return True


def select_platform(index: Mapping[str, Any], platform: str) -> Descriptor:
    """The first manifest of an image index matching ``os/arch[/variant]``.

    Raises:
        NotFound: no entry matches.
    """
    for m in index.get("manifests") or []:
        if isinstance(m, dict) and _platform_matches(platform, m.get("platform")):
            return Descriptor.from_json(m)
    raise NotFound(f"no manifest for platform {platform} in image index")


# --------------------------------------------------------------------------------------------------------
# Retry helpers (pure)


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (seconds or an HTTP date; a past date gives 0)."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff(attempt: int, policy: RetryConfig) -> float:
    """``min_wait · 2^attempt`` seconds, capped at ``max_wait``."""
    wait = policy.min_wait_msec / 1000.0 * (2**attempt)
    return min(wait, policy.max_wait_msec / 1000.0)


def _retryable_status(status: int) -> bool:
    return status == 429 or status == 0 or (status >= 500 and status != 501)


def _retryable_exception(exc: BaseException) -> bool:
    if isinstance(exc, requests.exceptions.SSLError | requests.exceptions.InvalidHeader):
        return False
    if isinstance(
        exc,
        requests.exceptions.InvalidSchema
        | requests.exceptions.InvalidURL
        | requests.exceptions.MissingSchema
        | requests.exceptions.TooManyRedirects,
    ):
        return False
    return isinstance(exc, requests.exceptions.RequestException | OSError)


_QUERY_IN_TEXT = re.compile(r"([?&][^=\s&?'\"]+=)[^&\s'\")]*")


def _scrub_exc(exc: BaseException) -> str:
    return _QUERY_IN_TEXT.sub(r"\1redacted", f"{type(exc).__name__}: {exc}")


class _KeepHeaders(requests.auth.AuthBase):
    """Stops requests from adding ``.netrc`` credentials over the header the auth flow chose."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


_KEEP = _KeepHeaders()


# --------------------------------------------------------------------------------------------------------
# The client


class RegistryClient:
    """An OCI distribution client for one image reference (or one CLI invocation).

    Args:
        credential: ``(host, ref) -> Credentials | None``; ``None`` means anonymous.
        config: ``[http]``, ``[blob]`` and ``[resolver]`` settings.
        ref: image reference passed to ``credential`` (the snapshotter uses one client per reference).
        plain_http: use http for the image's own registry (``soci push --plain-http``).
        pool_maxsize: connections kept per host; size it for the number of threads using the client.
        clock, sleep, rng: injected for tests (monotonic clock, sleep function, ``random.random``).
        session: an existing ``requests.Session`` to share a connection pool.
    """

    def __init__(
        self,
        credential: Credential | None = None,
        *,
        config: RegistryConfig | None = None,
        ref: str = "",
        plain_http: bool = False,
        user_agent: str = USER_AGENT,
        pool_maxsize: int = 32,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        wall_clock: Callable[[], float] = time.time,
        session: requests.Session | None = None,
        verify: bool | str = True,
    ) -> None:
        install_urllib3_filter()
        self.config = config or RegistryConfig()
        self.plain_http = plain_http
        self.user_agent = user_agent
        self._sleep = sleep
        self._rng = rng
        self._wall = wall_clock
        self.auth = auth.Authenticator(credential, ref=ref, clock=clock, user_agent=user_agent)
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(
                pool_connections=16, pool_maxsize=pool_maxsize, max_retries=0, pool_block=False
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        session.headers["User-Agent"] = user_agent
        session.verify = verify
        self.session = session
        self._stats_lock = threading.Lock()
        self._stats = {"requests": 0, "retries": 0, "redirects": 0, "url_refreshes": 0}
        # ``on_response(host, status)`` after every HTTP response (metrics); never given headers or bodies
        self.on_response: Callable[[str, int], None] | None = None

    # ---- lifecycle and introspection

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> dict[str, int]:
        """Request/retry/redirect counters merged with the authenticator's counters."""
        with self._stats_lock:
            out = dict(self._stats)
        out.update(self.auth.statistics())
        return out

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    # ---- hosts and URLs

    def registry(self, ref: Reference) -> RegistryHost:
        """The image's own registry (manifests, indexes, zTOCs, pushes)."""
        return resolve_hosts(ref, self.config, blobs=False, plain_http=self.plain_http)[-1]

    def _timeout(self, host: RegistryHost | None, *, blob: bool, upload: bool = False) -> tuple[float, float]:
        http = self.config.http
        connect = http.dial_timeout_msec / 1000.0
        if upload:
            read = http.request_timeout_msec / 1000.0
        elif blob:
            read = float(self.config.blob.fetching_timeout_sec)
            read = min(read, max(http.response_header_timeout_msec / 1000.0, 30.0))
        else:
            read = max(http.response_header_timeout_msec / 1000.0, 1.0)
        if host is not None and host.request_timeout:
            read = min(read, host.request_timeout)
        return connect, read

    # ---- the transport: retries, the auth flow, redirects

    def _transmit(
        self,
        req: auth.Request,
        retry: RetryConfig,
        timeout: tuple[float, float] | None,
    ) -> requests.Response:
        """Send one request with retries; return the last response (retryable statuses included)."""
        attempt = 0
        while True:
            self._count("requests")
            try:
                resp = self.session.request(
                    req.method,
                    req.url,
                    headers=req.headers,
                    data=req.body,
                    stream=True,
                    allow_redirects=False,
                    timeout=timeout,
                    auth=_KEEP,
                )
            except requests.exceptions.RequestException as exc:
                log.debug(
                    "%s %s -> error %s (attempt %d)",
                    req.method,
                    redact_url(req.url),
                    _scrub_exc(exc),
                    attempt + 1,
                )
                if not _retryable_exception(exc) or attempt >= retry.max_retries:
                    msg = (
                        f'{req.method} "{redact_url(req.url)}": giving up request after {attempt + 1} '
                        f"attempt(s): {_scrub_exc(exc)}"
                    )
                    if "?" in req.url:
                        raise Unavailable(msg) from None
                    raise Unavailable(msg) from exc
                self._wait(attempt, retry, None)
                attempt += 1
                continue
            log.debug(
                "%s %s -> %d (attempt %d)", req.method, redact_url(req.url), resp.status_code, attempt + 1
            )
            resp._soci_attempts = attempt + 1  # type: ignore[attr-defined]
            if self.on_response is not None:
                try:
                    self.on_response(urlsplit(req.url).netloc, resp.status_code)
                except Exception:  # metrics must not change the request
                    log.debug("on_response hook failed", exc_info=True)
            if _retryable_status(resp.status_code) and attempt < retry.max_retries:
                retry_after = None
                if resp.status_code in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After", ""), self._wall())
                _release(resp)
                self._wait(attempt, retry, retry_after)
                attempt += 1
                continue
            return resp

    def _wait(self, attempt: int, retry: RetryConfig, retry_after: float | None) -> None:
        self._count("retries")
        wait = retry_after if retry_after is not None else backoff(attempt, retry)
        if wait > 0:
            wait += self._rng() * wait / 8
        self._sleep(wait)

    @staticmethod
    def _flow_response(resp: requests.Response, kind: str) -> auth.Response:
        body = b""
        status = resp.status_code
        if kind == "token" or status in (401, 403):
            limit = auth.MAX_TOKEN_BODY if kind == "token" else ERROR_BODY_LIMIT
            try:
                body = resp.raw.read(limit, decode_content=True) or b""
            except (requests.exceptions.RequestException, OSError, Exception):
                body = b""
            resp._content = body  # the caller may still read .content
            resp._content_consumed = True
        getlist = getattr(resp.raw.headers, "getlist", None)
        challenges = tuple(getlist("WWW-Authenticate")) if getlist else ()
        if not challenges and resp.headers.get("WWW-Authenticate"):
            challenges = (resp.headers["WWW-Authenticate"],)
        return auth.Response(status, resp.headers, challenges, body, raw=resp)

    def _send_authed(
        self,
        req: auth.Request,
        retry: RetryConfig,
        timeout: tuple[float, float] | None,
    ) -> requests.Response:
        """Run the auth flow for ``req`` and return the final ``requests.Response``."""
        flow = self.auth.flow(req)
        step: auth.Request | auth.Wait = next(flow)
        try:
            while True:
                if isinstance(step, auth.Wait):
                    step.pending.wait(self.auth.wait_timeout)
                    value: auth.Response | None = None
                else:
                    token_req = step.kind == "token"
                    resp = self._transmit(step, self.config.http.retry if token_req else retry, timeout)
                    value = self._flow_response(resp, step.kind)
                    if token_req:
                        _release(resp)
                    elif value.status in (401, 403):
                        pass  # body already buffered; the connection was released
                try:
                    step = flow.send(value)
                except StopIteration as stop:
                    final: auth.Response = stop.value
                    return final.raw
        except BaseException:
            flow.close()
            raise

    def _request(
        self,
        method: str,
        url: str,
        *,
        scopes: tuple[str, ...] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        retry: RetryConfig | None = None,
        timeout: tuple[float, float] | None = None,
        follow_redirects: bool = True,
        authenticate: bool = True,
    ) -> tuple[requests.Response, str]:
        """Send a request to a registry URL, following redirects by hand. Returns (response, final URL).

        The auth flow runs only for URLs on the registry's own host; a redirect to another host (storage) is
        sent without ``Authorization``.
        """
        retry = retry or self.config.http.retry
        registry_netloc = urlsplit(url).netloc
        hdrs = dict(headers or {})
        for hop in range(MAX_REDIRECTS + 1):
            req = auth.Request(method, url, dict(hdrs), body, scopes)
            if authenticate and urlsplit(url).netloc == registry_netloc:
                resp = self._send_authed(req, retry, timeout)
            else:
                resp = self._transmit(req.with_header("Authorization", None), retry, timeout)
            location = resp.headers.get("Location")
            if not (follow_redirects and resp.status_code in REDIRECT_STATUSES and location):
                return resp, url
            if hop == MAX_REDIRECTS:
                _release(resp)
                break
            self._count("redirects")
            _release(resp)
            new_url = urljoin(url, location)
            log.debug("%s %s redirected to %s", method, redact_url(url), redact_url(new_url))
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method not in ("GET", "HEAD")):
                method, body = "GET", None
            url = new_url
        raise Unavailable(f'{method} "{redact_url(url)}": stopped after {MAX_REDIRECTS} redirects')

    # ---- status mapping

    @staticmethod
    def _raise_for_status(resp: requests.Response, what: str, ok: tuple[int, ...] = (200,)) -> None:
        status = resp.status_code
        if status in ok:
            return
        try:
            body = resp.content[:ERROR_BODY_LIMIT] if status < 500 or status == 501 else b""
        except requests.exceptions.RequestException:
            body = b""
        _release(resp)
        detail = short_body(body) if body else ""
        attempts = getattr(resp, "_soci_attempts", 1)
        if status == 401:
            challenge = resp.headers.get("WWW-Authenticate", "")
            err = ""
            for c in auth.parse_challenges(challenge):
                if c.error:
                    err = f" ({c.error})"
            raise Unauthenticated(f"{what}: unauthorized (401 after re-authentication){err}: {detail}")
        if status == 403:
            raise Unauthenticated(f"{what}: access denied (403): {detail}")
        if status == 404:
            raise NotFound(f"{what}: not found (404)")
        if _retryable_status(status):
            raise Unavailable(
                f'{what}: {resp.request.method} "{redact_url(resp.url)}": giving up request after '
                f"{attempts} attempt(s): status {status}"
            )
        if status in (400, 416):
            raise InvalidArgument(f"{what}: registry rejected the request ({status}): {detail}")
        raise Unavailable(f"{what}: unexpected status code {status}: {detail}")

    # ---- manifests

    def _repo_url(self, host: RegistryHost, repo: str, kind: str, obj: str = "") -> str:
        url = f"{host.base_url}/{repo}/{kind}/"
        return url + quote(obj, safe=":@") if obj else url

    def get_manifest(
        self,
        ref: Reference,
        obj: str | None = None,
        *,
        platform: str | None = None,
        accept: tuple[str, ...] = MANIFEST_TYPES,
    ) -> Manifest:
        """Fetch a manifest by tag or digest (default: the reference's own).

        With ``platform`` (``os/arch[/variant]``) an image index is resolved to that platform's manifest.
        A manifest fetched by digest must hash to it; one fetched by tag must match ``Docker-Content-Digest``.
        """
        obj = obj or ref.object
        if not obj:
            raise InvalidArgument(f"reference {ref} names neither tag nor digest")
        host = self.registry(ref)
        what = f"manifest {ref.locator}{'@' if ':' in obj else ':'}{obj} on {host.host}"
        resp, _ = self._request(
            "GET",
            self._repo_url(host, ref.repository, "manifests", obj),
            scopes=(auth.scope_for(ref.repository),),
            headers={"Accept": ", ".join(accept)},
            timeout=self._timeout(host, blob=False),
        )
        self._raise_for_status(resp, what)
        data = self._read_limited(resp, MAX_MANIFEST_SIZE, what)
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if obj.count(":") == 1 and "@" not in obj and obj.split(":")[0] in ("sha256", "sha512"):
            expected = obj
        else:
            expected = resp.headers.get("Docker-Content-Digest", "")
        digest = self._verify(data, expected, what) if expected else sha256_digest(data)
        if not media_type or media_type in ("application/json", "text/plain"):
            try:
                media_type = str(json.loads(data).get("mediaType", "")) or media_type
            except (ValueError, AttributeError):
                pass
        manifest = Manifest(media_type, digest, data)
        if platform and media_type in INDEX_TYPES:
            desc = select_platform(manifest.json(), platform)
            return self.get_manifest(ref, desc.digest, accept=accept)
        return manifest

    def head_manifest(self, ref: Reference, obj: str | None = None) -> Descriptor | None:
        """HEAD a manifest: its descriptor, or ``None`` when the registry says 404."""
        obj = obj or ref.object
        host = self.registry(ref)
        what = f"manifest {ref.locator}{'@' if ':' in obj else ':'}{obj} on {host.host}"
        resp, _ = self._request(
            "HEAD",
            self._repo_url(host, ref.repository, "manifests", obj),
            scopes=(auth.scope_for(ref.repository),),
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
            timeout=self._timeout(host, blob=False),
        )
        _release(resp)
        if resp.status_code == 404:
            return None
        self._raise_for_status(resp, what)
        digest = resp.headers.get("Docker-Content-Digest", "") or (obj if obj.startswith("sha256:") else "")
        return Descriptor(
            resp.headers.get("Content-Type", "").split(";")[0].strip(),
            digest,
            int(resp.headers.get("Content-Length", "0") or 0),
        )

    def _read_limited(self, resp: requests.Response, limit: int, what: str) -> bytes:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            _release(resp)
            raise FormatError(f"{what}: size {length} exceeds the limit of {limit} bytes")
        try:
            data = resp.raw.read(limit + 1, decode_content=True)
        except (requests.exceptions.RequestException, OSError, Exception) as exc:
            resp.close()
            raise Unavailable(f"{what}: reading the body failed: {_scrub_exc(exc)}") from None
        if len(data) > limit:
            _release(resp)
            raise FormatError(f"{what}: body exceeds the limit of {limit} bytes")
        if length and length.isdigit() and len(data) != int(length):
            _release(resp)
            raise Unavailable(f"{what}: short body ({len(data)} of {length} bytes)")
        return data

    @staticmethod
    def _verify(data: bytes, digest: str, what: str) -> str:
        h = _hasher(digest)
        h.update(data)
        got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
        if got != digest:
            raise FormatError(f"{what}: digest mismatch: expected {digest}, got {got}")
        return digest

    # ---- blobs

    def blob_exists(self, ref: Reference, digest: str, *, push: bool = False) -> bool:
        """HEAD a blob in the image's registry; 404 -> False."""
        host = self.registry(ref)
        resp, _ = self._request(
            "HEAD",
            self._repo_url(host, ref.repository, "blobs", digest),
            scopes=(auth.scope_for(ref.repository, "pull,push" if push else "pull"),),
            timeout=self._timeout(host, blob=False),
        )
        _release(resp)
        if resp.status_code == 404:
            return False
        self._raise_for_status(resp, f"blob {digest} in {ref.locator}", ok=(200, 204))
        return True

    def get_blob(
        self, ref: Reference, digest: str, *, size: int | None = None, max_size: int = 1 << 30
    ) -> bytes:
        """Fetch a whole blob from the image's own registry; digest (and ``size`` when given) verified."""
        validate_digest(digest)
        host = self.registry(ref)
        what = f"blob {digest} in {ref.locator} on {host.host}"
        resp, _ = self._request(
            "GET",
            self._repo_url(host, ref.repository, "blobs", digest),
            scopes=(auth.scope_for(ref.repository),),
            headers={"Accept-Encoding": "identity"},
            retry=self.config.blob.retry(self.config.http),
            timeout=self._timeout(host, blob=True),
        )
        self._raise_for_status(resp, what)
        length = resp.headers.get("Content-Length")
        if size is not None and length and length.isdigit() and int(length) != size:
            _release(resp)
            raise FormatError(f"{what}: Content-Length {length} does not match the descriptor size {size}")
        data = self._read_limited(resp, max_size if size is None else size, what)
        if size is not None and len(data) != size:
            raise FormatError(f"{what}: got {len(data)} bytes, descriptor says {size}")
        self._verify(data, digest, what)
        return data

    def blob(self, ref: Reference, digest: str, *, size: int | None = None) -> RemoteBlob:
        """A lazily resolved blob for range reads (mirrors first, then the image's registry)."""
        validate_digest(digest)
        return RemoteBlob(self, ref, digest, size)

    # ---- referrers

    def referrers(self, ref: Reference, digest: str, artifact_type: str = "") -> list[Descriptor]:
        """Referrers of ``digest`` (optionally filtered by artifact type), via the API or the tag schema."""
        validate_digest(digest)
        host = self.registry(ref)
        what = f"referrers of {digest} in {ref.locator} on {host.host}"
        url = self._repo_url(host, ref.repository, "referrers", digest)
        if artifact_type:
            url += "?" + urlencode({"artifactType": artifact_type})
        out: list[Descriptor] = []
        scopes = (auth.scope_for(ref.repository),)
        while url:
            resp, final = self._request(
                "GET",
                url,
                scopes=scopes,
                headers={"Accept": OCI_INDEX},
                timeout=self._timeout(host, blob=False),
            )
            ctype = resp.headers.get("Content-Type", "")
            if resp.status_code == 404:
                body = resp.content[:ERROR_BODY_LIMIT]
                if any(e.get("code") == "NAME_UNKNOWN" for e in auth._registry_errors(body)):
                    raise NotFound(f"{what}: repository not found")
                return self._referrers_by_tag(ref, digest, artifact_type)
            if resp.status_code == 200 and ctype != OCI_INDEX:
                _release(resp)
                return self._referrers_by_tag(ref, digest, artifact_type)
            self._raise_for_status(resp, what)
            data = self._read_limited(resp, MAX_MANIFEST_SIZE, what)
            try:
                doc = json.loads(data)
            except ValueError as exc:
                raise FormatError(f"{what}: response is not JSON") from exc
            applied = resp.headers.get("OCI-Filters-Applied", "")
            applied += "," + str(
                (doc.get("annotations") or {}).get("org.opencontainers.referrers.filtersApplied", "")
            )
            filtered = "artifactType" in applied.split(",")
            for m in doc.get("manifests") or []:
                d = Descriptor.from_json(m)
                if not artifact_type or filtered or d.artifact_type == artifact_type:
                    out.append(d)
            url = self._next_link(final, resp.headers.get("Link", ""))
        return out

    @staticmethod
    def _next_link(base: str, link: str) -> str:
        for part in link.split(","):
            m = re.match(r'\s*<([^>]*)>\s*;.*rel="?next"?', part)
            if m:
                return urljoin(base, m.group(1))
        return ""

    def _referrers_by_tag(self, ref: Reference, digest: str, artifact_type: str) -> list[Descriptor]:
        tag = referrers_tag(digest)
        try:
            index = self.get_manifest(ref, tag, accept=(OCI_INDEX,))
        except NotFound:
            return []
        out = []
        for m in index.json().get("manifests") or []:
            d = Descriptor.from_json(m)
            if not artifact_type or d.artifact_type == artifact_type:
                out.append(d)
        return out

    # ---- pushes

    def push_blob(
        self,
        ref: Reference,
        digest: str,
        data: bytes | Path,
        *,
        mount_from: str = "",
        chunk_size: int | None = None,
    ) -> str:
        """Upload a blob. Returns ``"mounted"`` or ``"uploaded"``.

        ``data`` is the content or a file path. With ``mount_from`` (a repository on the same registry) a
        cross-repository mount is tried first. ``chunk_size`` selects a chunked upload (PATCH per chunk).
        """
        validate_digest(digest)
        host = self.registry(ref)
        what = f"upload of blob {digest} to {ref.locator} on {host.host}"
        scopes: tuple[str, ...] = (auth.scope_for(ref.repository, "pull,push"),)
        url = self._repo_url(host, ref.repository, "blobs", "uploads") + "/"
        if mount_from:
            scopes += (auth.scope_for(mount_from, "pull"),)
            url += "?" + urlencode({"mount": digest, "from": mount_from})
        resp, final = self._request(
            "POST",
            url,
            scopes=scopes,
            headers={"Content-Length": "0"},
            timeout=self._timeout(host, blob=False),
        )
        if resp.status_code == 201 and mount_from:
            _release(resp)
            return "mounted"
        self._raise_for_status(resp, what, ok=(202,))
        _release(resp)
        location = resp.headers.get("Location")
        if not location:
            raise Unavailable(f"{what}: registry answered 202 without an upload Location")
        location = urljoin(final, location)
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        timeout = self._timeout(host, blob=False, upload=True)
        if chunk_size and size > chunk_size:
            offset = 0
            with _open(data) as f:
                while offset < size:
                    chunk = f.read(chunk_size)
                    if not chunk:
                        raise FormatError(f"{what}: source shrank while uploading")
                    end = offset + len(chunk) - 1
                    resp, final = self._request(
                        "PATCH",
                        location,
                        scopes=scopes,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{offset}-{end}",
                            "Content-Length": str(len(chunk)),
                        },
                        body=chunk,
                        timeout=timeout,
                    )
                    self._raise_for_status(resp, what, ok=(202, 204))
                    _release(resp)
                    location = urljoin(final, resp.headers.get("Location") or location)
                    offset = end + 1
            body = b""
        else:
            body = data.read_bytes() if isinstance(data, Path) else data
        sep = "&" if "?" in location else "?"
        resp, _ = self._request(
            "PUT",
            location + sep + urlencode({"digest": digest}),
            scopes=scopes,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(body))},
            body=body,
            timeout=timeout,
        )
        if resp.status_code == 400:
            detail = short_body(resp.content[:ERROR_BODY_LIMIT])
            _release(resp)
            if "DIGEST_INVALID" in detail:
                raise FormatError(f"{what}: registry says the content does not match the digest")
            raise InvalidArgument(f"{what}: registry rejected the upload (400): {detail}")
        self._raise_for_status(resp, what, ok=(201, 204))
        _release(resp)
        return "uploaded"

    def push_manifest(
        self, ref: Reference, obj: str, data: bytes, media_type: str
    ) -> tuple[str, requests.Response]:
        """PUT a manifest under a tag or digest. Returns its digest and the response (for ``OCI-Subject``)."""
        host = self.registry(ref)
        digest = sha256_digest(data)
        what = f"manifest {digest} to {ref.locator}:{obj} on {host.host}"
        resp, _ = self._request(
            "PUT",
            self._repo_url(host, ref.repository, "manifests", obj),
            scopes=(auth.scope_for(ref.repository, "pull,push"),),
            headers={"Content-Type": media_type, "Content-Length": str(len(data))},
            body=data,
            timeout=self._timeout(host, blob=False, upload=True),
        )
        self._raise_for_status(resp, what, ok=(201, 200, 204))
        _release(resp)
        got = resp.headers.get("Docker-Content-Digest", "")
        if got and got.startswith("sha256:") and got != digest:
            raise FormatError(f"{what}: registry computed digest {got}")
        return digest, resp


def referrers_tag(digest: str) -> str:
    """The referrers fallback tag: ``sha256:abc…`` -> ``sha256-abc…`` (truncated to 128 characters)."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"[:128]


class _open:
    """Context manager giving a readable binary stream for bytes or a path."""

    def __init__(self, data: bytes | Path) -> None:
        self._data = data
        self._f: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        import io

        self._f = self._data.open("rb") if isinstance(self._data, Path) else io.BytesIO(self._data)
        return self._f

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()


# --------------------------------------------------------------------------------------------------------
# Lazy blob reads


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """``bytes b-e/total`` -> (b, e, total or None). Raises ``FormatError`` when malformed."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise FormatError(f"malformed Content-Range {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


class _StorageRejected(Exception):
    """The storage host (a pre-signed URL) refused the request; re-resolve through the registry."""


class RemoteBlob:
    """A layer blob served by range reads. Thread-safe.

    The real URL is resolved on first use: for each host (mirrors first), ``GET`` with ``Range: bytes=0-1``
    through the auth client; a 3xx to storage gives the pre-signed URL, a 2xx the registry URL itself. When
    storage answers 401/403 (or S3's 400 ``ExpiredToken``) the URL is re-resolved once, single-flight, and
    the read retried once.
    """

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, size: int | None) -> None:
        self.client = client
        self.ref = ref
        self.digest = digest
        self._size = size
        self._lock = threading.Lock()
        self._url: str | None = None
        self._host: RegistryHost | None = None
        self._registry_url = ""
        self._generation = 0
        self.what = f"blob {digest} in {ref.locator}"

    # ---- resolution

    def _resolve(self) -> tuple[str, RegistryHost, int]:
        with self._lock:
            if self._url is not None and self._host is not None:
                return self._url, self._host, self._generation
        return self._refresh(-1)

    def _refresh(self, seen_generation: int) -> tuple[str, RegistryHost, int]:
        """Resolve the real URL unless another thread already did since ``seen_generation``."""
        with self._lock:
            if self._url is not None and self._host is not None and self._generation != seen_generation:
                return self._url, self._host, self._generation
            errors: list[str] = []
            c = self.client
            scopes = (auth.scope_for(self.ref.repository),)
            for host in resolve_hosts(self.ref, c.config, plain_http=c.plain_http):
                url = c._repo_url(host, self.ref.repository, "blobs", self.digest)
                try:
                    resp, _ = c._request(
                        "GET",
                        url,
                        scopes=scopes,
                        headers={"Range": "bytes=0-1", "Accept-Encoding": "identity"},
                        retry=c.config.blob.retry(c.config.http),
                        timeout=c._timeout(host, blob=True),
                        follow_redirects=False,
                    )
                except Unauthenticated:
                    raise
                except SociError as exc:
                    errors.append(f"{host.host}: {exc}")
                    continue
                _release(resp)
                if resp.status_code in REDIRECT_STATUSES and resp.headers.get("Location"):
                    real = urljoin(url, resp.headers["Location"])
                elif 200 <= resp.status_code < 300:
                    real = url
                    if self._size is None and resp.status_code == 206:
                        try:
                            self._size = parse_content_range(resp.headers.get("Content-Range", ""))[2]
                        except FormatError:
                            pass
                else:
                    if not host.is_mirror:
                        try:
                            c._raise_for_status(resp, f"{self.what} on {host.host}")
                        except SociError as exc:
                            if isinstance(exc, Unauthenticated | NotFound):
                                raise
                            errors.append(str(exc))
                            continue
                    errors.append(f"{host.host}: status {resp.status_code}")
                    continue
                if self._url is not None:
                    c._count("url_refreshes")
                self._url, self._host, self._registry_url = real, host, url
                self._generation += 1
                log.debug("%s resolved to %s via %s", self.what, redact_url(real), host.host)
                return real, host, self._generation
            raise Unavailable(f"{self.what}: no host could serve it: {'; '.join(errors) or 'no hosts'}")

    # ---- size

    @property
    def size(self) -> int:
        """Blob size: from the constructor, the resolve probe, or a HEAD on the registry URL."""
        if self._size is not None:
            return self._size
        _, host, _ = self._resolve()
        if self._size is not None:
            return self._size
        c = self.client
        resp, _ = c._request(
            "HEAD",
            self._registry_url,
            scopes=(auth.scope_for(self.ref.repository),),
            timeout=c._timeout(host, blob=True),
        )
        _release(resp)
        c._raise_for_status(resp, f"{self.what} on {host.host}")
        length = resp.headers.get("Content-Length", "")
        if not length.isdigit():
            raise FormatError(f"{self.what}: HEAD gave no Content-Length")
        self._size = int(length)
        return self._size

    # ---- reads

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the blob (fewer only at the end of the blob).

        Raises:
            InvalidArgument: negative offset/length or a range the server says is unsatisfiable.
            FormatError: a ``Content-Range`` that does not describe the requested range.
            Unavailable: the read failed after the ``[blob]`` retries.
            Unauthenticated / NotFound: as mapped from the registry.
        """
        if offset < 0 or length < 0:
            raise InvalidArgument(f"{self.what}: bad range offset={offset} length={length}")
        if length == 0:
            return b""
        url, host, gen = self._resolve()
        try:
            return self._read_with_retries(url, host, offset, length)
        except _StorageRejected:
            url, host, _ = self._refresh(gen)
            try:
                return self._read_with_retries(url, host, offset, length)
            except _StorageRejected as exc:
                raise Unauthenticated(f"{self.what}: storage refused the re-resolved URL: {exc}") from None

    def _read_with_retries(self, url: str, host: RegistryHost, offset: int, length: int) -> bytes:
        c = self.client
        retry = c.config.blob.retry(c.config.http)
        attempt = 0
        while True:
            try:
                return self._read_once(url, host, offset, length, retry)
            except _BodyError as exc:
                if attempt >= retry.max_retries:
                    raise Unavailable(
                        f"{self.what}: range {offset}-{offset + length - 1}: giving up after {attempt + 1} "
                        f"attempt(s): {exc}"
                    ) from None
                c._wait(attempt, retry, None)
                attempt += 1

    def _read_once(self, url: str, host: RegistryHost, offset: int, length: int, retry: RetryConfig) -> bytes:
        c = self.client
        end = offset + length - 1
        headers = {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}
        on_registry = url == self._registry_url
        resp, _ = c._request(
            "GET",
            url,
            scopes=(auth.scope_for(self.ref.repository),),
            headers=headers,
            retry=retry,
            timeout=c._timeout(host, blob=True),
            authenticate=on_registry,
        )
        status = resp.status_code
        if status == 206:
            ctype = resp.headers.get("Content-Type", "")
            if ctype.startswith("multipart/"):
                _release(resp)
                raise FormatError(f"{self.what}: unexpected multipart answer to a single range request")
            try:
                b, e, total = parse_content_range(resp.headers.get("Content-Range", ""))
            except FormatError as exc:
                _release(resp)
                raise FormatError(f"{self.what} on {host.host}: {exc}") from None
            if b != offset or e > end or e < b or (e < end and total is not None and e != total - 1):
                _release(resp)
                raise FormatError(
                    f"{self.what} on {host.host}: asked for bytes {offset}-{end}, "
                    f"server sent Content-Range {resp.headers.get('Content-Range')!r}"
                )
            if total is not None and self._size is None:
                self._size = total
            return _read_exact(resp, e - b + 1)
        if status == 200:
            # The server ignored Range: skip to the offset, take the slice, and drop the connection.
            total = resp.headers.get("Content-Length", "")
            if total.isdigit() and self._size is None:
                self._size = int(total)
            try:
                skip = offset
                while skip > 0:
                    chunk = resp.raw.read(min(skip, 1 << 20), decode_content=False)
                    if not chunk:
                        raise _BodyError(f"body ended at {offset - skip} before offset {offset}")
                    skip -= len(chunk)
                data = _read_exact(resp, length, allow_short=True)
            finally:
                resp.close()
            return data
        if status == 416:
            _release(resp)
            raise InvalidArgument(f"{self.what} on {host.host}: range {offset}-{end} not satisfiable (416)")
        if not on_registry and status in (401, 403):
            _release(resp)
            raise _StorageRejected(f"status {status}")
        if not on_registry and status == 400:
            body = resp.content[:ERROR_BODY_LIMIT]
            if b"ExpiredToken" in body or b"expired" in body.lower():
                raise _StorageRejected("status 400 (expired token)")
        c._raise_for_status(resp, f"{self.what} on {host.host} range {offset}-{end}", ok=(206, 200))
        raise AssertionError("unreachable")

    def read_all(self, chunk: int = 8 << 20) -> Iterator[bytes]:
        """The whole blob in chunks (range reads)."""
        size = self.size
        off = 0
        while off < size:
            data = self.read(off, min(chunk, size - off))
            if not data:
                raise Unavailable(f"{self.what}: empty read at {off}")
            yield data
            off += len(data)


class _BodyError(Exception):
    """A response body ended early or the connection broke while reading it (retryable)."""


def _release(resp: requests.Response) -> None:
    """Finish with a response: drain a small remaining body so the connection returns to the pool, or close
    the connection when the remaining body is large or of unknown size."""
    try:
        length = resp.headers.get("Content-Length", "")
        small = length.isdigit() and int(length) <= ERROR_BODY_LIMIT
        head = resp.request is not None and resp.request.method == "HEAD"
        if head or small or resp.status_code in (204, 304):
            resp.raw.drain_conn()
            resp.raw.release_conn()
        else:
            resp.close()
    except Exception:
        resp.close()


def _read_exact(resp: requests.Response, n: int, *, allow_short: bool = False) -> bytes:
    parts: list[bytes] = []
    got = 0
    try:
        while got < n:
            chunk = resp.raw.read(n - got, decode_content=False)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except (requests.exceptions.RequestException, OSError, Exception) as exc:
        resp.close()
        raise _BodyError(_scrub_exc(exc)) from None
    if got < n and not allow_short:
        resp.close()
        raise _BodyError(f"short body: {got} of {n} bytes")
    return parts[0] if len(parts) == 1 else b"".join(parts)
