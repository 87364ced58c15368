"""Registry authentication as pure protocol logic: challenges, tokens, and the auth flow generator.

Owns:
* ``parse_challenges``: ``WWW-Authenticate`` values -> ``Challenge`` list (several challenges per value,
  quoted strings with backslash escapes, unquoted URLs, case-insensitive schemes and keys).
* ``Authenticator``: the per-client authorization state (one handler per registry host, Basic or Bearer; a
  token cache per (host, scopes) with expiry; single-flight token fetches) and ``Authenticator.flow``, a
  generator that yields ``Request`` objects (and ``Wait`` objects while another flow fetches the same
  token) and receives ``Response`` objects, like httpx's ``auth_flow``. A driver (``client.py``) runs it.

Rules the flow follows:
* A request is first sent with whatever the host's handler gives (nothing before the first challenge).
* 401, or a 403 whose registry-error body says the token expired (ECR sends it without a challenge), triggers
  exactly one re-authentication and one resend. The resend's response is returned as is; no loop.
* Re-authentication re-reads credentials from the ``Credential`` callable (so rotation needs no restart) and
  fetches a fresh token unless another flow already replaced the token this request was sent with.
* Token fetch: OAuth2 POST (password grant, or refresh-token grant for identity tokens) when there is a
  secret, falling back to GET with Basic on 404/401/400 (and 405 with a username); GET without credentials
  for anonymous tokens; a ``registry_token`` credential is used directly as the bearer token.
* Token lifetime: ``expires_in`` seconds from receipt (the client's clock only, so server clock skew does
  not matter); when absent or not positive, ``default_token_ttl`` (60 s, the distribution token default)
  so a token without an expiry is re-fetched periodically rather than trusted forever. A token is refreshed
  a little before expiry (``refresh_margin``, at most a tenth of its lifetime).
* Errors name host, scopes and status, never secrets. Token fetch failures are not cached: the next request
  tries again.

Will not: do I/O, read clocks other than the injected ``clock``, sleep, retry transport errors or 5xx (the
driver does that for every request it sends, token requests included), follow redirects, or know keychains.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from soci_fs.errors import SociError, Unauthenticated, Unavailable
from soci_fs.registry.credentials import Credential, Credentials
from soci_fs.registry.redact import redact_url, short_body

DEFAULT_TOKEN_TTL = 60.0
DEFAULT_REFRESH_MARGIN = 10.0
CLIENT_ID = "containerd-client"
ECR_EXPIRED_MESSAGE = "Your authorization token has expired. Reauthenticate and try again."
MAX_TOKEN_BODY = 1 << 20

# --------------------------------------------------------------------------------------------------------
# Challenges

_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: a lower-cased scheme and its lower-cased parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(s for s in self.params.get("scope", "").split(" ") if s)

    @property
    def error(self) -> str:
        return self.params.get("error", "")


def _quoted(s: str, i: int) -> tuple[str, int]:
    """Parse a quoted string starting at ``s[i] == '"'``; an unterminated string runs to the end."""
    out = []
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n:
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    return "".join(out), i


def parse_challenges(values: str | Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (one string or several) into challenges, in order.

    Lenient by design: unknown characters are skipped, unquoted values run to the next comma or space,
    a repeated parameter keeps its first value, a token68 credential is ignored.
    """
    if isinstance(values, str):
        values = [values]
    out: list[tuple[str, dict[str, str]]] = []
    for s in values:
        cur: dict[str, str] | None = None
        i, n = 0, len(s)
        while i < n:
            while i < n and s[i] in " \t,":
                i += 1
            if i >= n:
                break
            m = _TOKEN_RE.match(s, i)
            if not m:
                i += 1
                continue
            tok, j = m.group(0), m.end()
            k = j
            while k < n and s[k] in " \t":
                k += 1
            is_param = cur is not None and k < n and s[k] == "=" and not (k + 1 < n and s[k + 1] == "=")
            if is_param and cur is not None:
                k += 1
                while k < n and s[k] in " \t":
                    k += 1
                if k < n and s[k] == '"':
                    val, k = _quoted(s, k)
                else:
                    start = k
                    while k < n and s[k] not in ", \t":
                        k += 1
                    val = s[start:k]
                cur.setdefault(tok.lower(), val)
                i = k
            elif cur is not None and k < n and s[k] == "=":
                # token68 (e.g. "Basic dXNlcg==") belongs to the current challenge; skip it.
                while k < n and s[k] == "=":
                    k += 1
                i = k
            else:
                cur = {}
                out.append((tok.lower(), cur))
                i = j
    return [Challenge(scheme, dict(params)) for scheme, params in out]


# --------------------------------------------------------------------------------------------------------
# Flow messages


@dataclass
class Request:
    """A request the flow wants sent. ``kind`` is ``"registry"`` or ``"token"``."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    scopes: tuple[str, ...] = ()
    kind: str = "registry"

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def with_header(self, name: str, value: str | None) -> Request:
        headers = {k: v for k, v in self.headers.items() if k.lower() != name.lower()}
        if value is not None:
            headers[name] = value
        return Request(self.method, self.url, headers, self.body, self.scopes, self.kind)


@dataclass
class Response:
    """What the driver tells the flow about a response.

    ``headers`` keys are matched case-insensitively. ``body`` is the whole body for token requests and a
    bounded prefix for registry responses with status 401/403 (empty otherwise). ``raw`` is the driver's own
    response object, returned untouched at the end of the flow.
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    www_authenticate: tuple[str, ...] = ()
    body: bytes = b""
    raw: Any = None

    def header(self, name: str) -> str:
        lname = name.lower()
        for k, v in self.headers.items():
            if k.lower() == lname:
                return v
        return ""


class PendingToken:
    """A token fetch in flight; followers wait on it. Thread-safe; completed exactly once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.token: Token | None = None
        self.error: BaseException | None = None

    def set(self, token: Token | None, error: BaseException | None) -> None:
        self.token, self.error = token, error
        self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)


@dataclass(frozen=True)
class Wait:
    """Yielded by the flow while another flow fetches the token it needs: the driver calls
    ``pending.wait(timeout)`` and sends ``None`` back."""

    pending: PendingToken


@dataclass(frozen=True)
class Token:
    value: str
    refresh_at: float  # clock value after which the token is refreshed before use
    expires_at: float

    def fresh(self, now: float) -> bool:
        return now < self.refresh_at


@dataclass(frozen=True)
class _Basic:
    header: str


@dataclass(frozen=True)
class _Bearer:
    realm: str
    service: str
    scopes: tuple[str, ...]


Flow = Generator["Request | Wait", "Response | None", Response]


def scope_for(repository: str, actions: str = "pull") -> str:
    """``repository:<repo>:<actions>``."""
    return f"repository:{repository}:{actions}"


def _scope_key(scopes: Iterable[str]) -> str:
    return " ".join(sorted(set(scopes)))


def _basic_value(username: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode()


def _registry_errors(body: bytes) -> list[dict[str, Any]]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return []
    errs = doc.get("errors") if isinstance(doc, dict) else None
    return [e for e in errs if isinstance(e, dict)] if isinstance(errs, list) else []


def is_expired_token_403(response: Response) -> bool:
    """A 403 whose registry-error body says the authorization token expired (ECR and similar)."""
    if response.status != 403:
        return False
    for err in _registry_errors(response.body):
        msg = str(err.get("message", ""))
        if msg == ECR_EXPIRED_MESSAGE:
            return True
        low = msg.lower()
        if "expired" in low and ("token" in low or "authoriz" in low or "credential" in low):
            return True
    return False


class Authenticator:
    """Authorization state for one client (one image reference by default), shared by its threads.

    Args:
        credential: ``(host, ref) -> Credentials | None``, called whenever credentials are needed (creating a
            Basic handler, fetching a token), so a rotated secret is picked up on the next refresh.
        ref: the image reference passed to ``credential``.
        clock: monotonic seconds; injected so the flow stays pure.
        user_agent: sent on token requests.
        default_token_ttl: lifetime of a token whose response has no positive ``expires_in``.
        refresh_margin: refresh this many seconds before expiry (capped at a tenth of the lifetime).
    """

    def __init__(
        self,
        credential: Credential | None,
        *,
        ref: str = "",
        clock: Callable[[], float],
        user_agent: str = "",
        default_token_ttl: float = DEFAULT_TOKEN_TTL,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        wait_timeout: float | None = 300.0,
    ) -> None:
        self._credential = credential
        self.ref = ref
        self._clock = clock
        self._user_agent = user_agent
        self._default_ttl = default_token_ttl
        self._margin = refresh_margin
        self.wait_timeout = wait_timeout
        self._lock = threading.Lock()
        self._handlers: dict[str, _Basic | _Bearer] = {}
        self._tokens: dict[tuple[str, str], Token] = {}
        self._pending: dict[tuple[str, str], PendingToken] = {}
        self.on_token_fetch: Callable[[str], None] | None = None  # metrics: a token fetch for host
        self._stats = {
            "token_fetches": 0,
            "token_failures": 0,
            "reauth": 0,
            "waits": 0,
            "credential_reads": 0,
        }

    # ---- introspection

    def statistics(self) -> dict[str, int]:
        """Counters: token fetches/failures, re-authentications, waits on another flow's fetch."""
        with self._lock:
            return dict(self._stats)

    def forget(self, host: str | None = None) -> None:
        """Drop handlers and tokens (for one host, or all)."""
        with self._lock:
            if host is None:
                self._handlers.clear()
                self._tokens.clear()
            else:
                self._handlers.pop(host, None)
                for k in [k for k in self._tokens if k[0] == host]:
                    del self._tokens[k]

    # ---- the flow

    def flow(self, request: Request) -> Flow:
        """Authorize ``request``, send it, and re-authenticate once if the registry asks for it.

        Yields ``Request`` (send it, send back a ``Response``) or ``Wait`` (wait, send back ``None``).
        Returns the ``Response`` of the last registry request sent.
        """
        host = request.host
        sent = yield from self._authorization(host, request.scopes, stale=None)
        response = yield request.with_header("Authorization", sent)
        assert isinstance(response, Response)
        if response.status == 401 or is_expired_token_403(response):
            challenges = parse_challenges(response.www_authenticate)
        else:
            return response
        with self._lock:
            self._stats["reauth"] += 1
        extra = yield from self._handle_challenge(host, challenges, sent)
        fresh = yield from self._authorization(host, request.scopes, stale=sent, extra=extra)
        response = yield request.with_header("Authorization", fresh)
        assert isinstance(response, Response)
        return response

    def _authorization(
        self, host: str, scopes: tuple[str, ...], stale: str | None, extra: tuple[str, ...] = ()
    ) -> Generator[Request | Wait, Response | None, str | None]:
        """The Authorization value for a request to ``host`` (fetching a token when needed)."""
        with self._lock:
            handler = self._handlers.get(host)
        if handler is None:
            return None
        if isinstance(handler, _Basic):
            return handler.header
        base = tuple(scopes) or handler.scopes
        key = _scope_key(base)
        stale_token = stale[len("Bearer ") :] if stale and stale.startswith("Bearer ") else None
        token = yield from self._obtain(host, key, handler, base + tuple(extra), stale_token)
        return "Bearer " + token.value

    def _handle_challenge(
        self, host: str, challenges: list[Challenge], sent: str | None
    ) -> Generator[Request | Wait, Response | None, tuple[str, ...]]:
        """Update the host's handler for a challenge; return extra scopes the challenge asks for."""
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        with self._lock:
            current = self._handlers.get(host)
        if bearer is not None:
            if not bearer.realm:
                raise Unauthenticated(f"registry {host}: no realm specified for token auth challenge")
            new = _Bearer(bearer.realm, bearer.service, bearer.scopes)
            with self._lock:
                cur = self._handlers.get(host)
                if (
                    bearer.error == "invalid_token"
                    or not isinstance(cur, _Bearer)
                    or (cur.realm, cur.service) != (new.realm, new.service)
                ):
                    self._handlers[host] = new
            # The token itself is fetched by _authorization(stale=sent): a fresh one, unless another flow
            # already replaced the token this request carried.
            return bearer.scopes
        if basic is not None or (not challenges and current is not None):
            if not challenges and isinstance(current, _Bearer):
                return ()  # expired-token 403 without a challenge: refetch with the handler we have
            if isinstance(current, _Basic) and sent is not None and current.header != sent:
                return ()  # another flow already re-read the credentials
            creds = self._read_credentials(host)
            if creds is None or not creds.username or not creds.password:
                raise Unauthenticated(f"registry {host} requires basic auth: no basic auth credentials")
            with self._lock:
                self._handlers[host] = _Basic(_basic_value(creds.username, creds.password))
            yield from ()
            return ()
        if not challenges:
            # A 403 "token expired" with no challenge and no handler yet: ECR's shape; use Basic.
            creds = self._read_credentials(host)
            if creds is None or not creds.username or not creds.password:
                raise Unauthenticated(f"registry {host}: authorization token expired and no credentials")
            with self._lock:
                self._handlers[host] = _Basic(_basic_value(creds.username, creds.password))
            return ()
        schemes = ", ".join(sorted({c.scheme for c in challenges})) or "none"
        raise Unauthenticated(f"registry {host}: failed to find supported auth scheme (offered: {schemes})")

    # ---- tokens

    def _obtain(
        self, host: str, key: str, handler: _Bearer, fetch_scopes: tuple[str, ...], stale: str | None
    ) -> Generator[Request | Wait, Response | None, Token]:
        """Return a usable token for (host, key): cached, awaited from another flow, or fetched here."""
        cache_key = (host, key)
        with self._lock:
            tok = self._tokens.get(cache_key)
            now = self._clock()
            if tok is not None and tok.fresh(now) and tok.value != stale:
                return tok
            pending = self._pending.get(cache_key)
            leader = pending is None
            if pending is None:
                pending = PendingToken()
                self._pending[cache_key] = pending
            else:
                self._stats["waits"] += 1
        if not leader:
            yield Wait(pending)
            if not pending.done:
                raise Unavailable(f"registry {host}: timed out waiting for a token fetch (scope {key!r})")
            if pending.error is not None:
                err = pending.error
                raise type(err)(str(err)) if isinstance(err, SociError) else Unavailable(str(err))
            assert pending.token is not None
            return pending.token
        try:
            tok = yield from self._fetch(host, handler, _scope_key(fetch_scopes).split(" "))
        except BaseException as exc:
            with self._lock:
                self._pending.pop(cache_key, None)
                self._stats["token_failures"] += 1
            pending.set(
                None, exc if isinstance(exc, SociError) else Unavailable(f"token fetch aborted: {exc}")
            )
            raise
        with self._lock:
            self._tokens[cache_key] = tok
            self._pending.pop(cache_key, None)
        pending.set(tok, None)
        return tok

    def _read_credentials(self, host: str) -> Credentials | None:
        with self._lock:
            self._stats["credential_reads"] += 1
        if self._credential is None:
            return None
        creds = self._credential(host, self.ref)
        if creds is not None and creds.is_empty():
            return None
        return creds

    def _make_token(self, value: str, expires_in: Any) -> Token:
        now = self._clock()
        try:
            lifetime = float(expires_in)
        except (TypeError, ValueError):
            lifetime = 0.0
        if not lifetime > 0:
            lifetime = self._default_ttl
        margin = min(self._margin, lifetime / 10)
        return Token(value, now + lifetime - margin, now + lifetime)

    def _fetch(
        self, host: str, handler: _Bearer, scopes: list[str]
    ) -> Generator[Request | Wait, Response | None, Token]:
        scopes = [s for s in scopes if s]
        what = f"registry {host} (scope {' '.join(scopes) or '-'!r})"
        creds = self._read_credentials(host)
        with self._lock:
            self._stats["token_fetches"] += 1
        if self.on_token_fetch is not None:
            with contextlib.suppress(Exception):  # metrics must not change the flow
                self.on_token_fetch(host)
        if creds is not None and creds.registry_token:
            return self._make_token(creds.registry_token, None)
        username = ""
        secret = ""
        if creds is not None:
            if creds.identity_token:
                secret = creds.identity_token
            else:
                username, secret = creds.username, creds.password
        headers = {"User-Agent": self._user_agent} if self._user_agent else {}
        realm = handler.realm
        if secret:
            form: list[tuple[str, str]] = []
            if scopes:
                form.append(("scope", " ".join(scopes)))
            form.append(("service", handler.service))
            form.append(("client_id", CLIENT_ID))
            if creds is not None and creds.identity_token:
                form += [("grant_type", "refresh_token"), ("refresh_token", secret)]
            else:
                form += [("grant_type", "password"), ("username", username), ("password", secret)]
            post = Request(
                "POST",
                realm,
                {**headers, "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
                urlencode(form).encode(),
                kind="token",
            )
            resp = yield post
            assert isinstance(resp, Response)
            if 200 <= resp.status < 300:
                value, expires_in = self._parse_token(resp, what, realm, oauth=True)
                return self._make_token(value, expires_in)
            if not (resp.status in (404, 401, 400) or (resp.status == 405 and username)):
                raise self._token_error(resp, what, realm, "POST", secret=secret)
        query: list[tuple[str, str]] = []
        if handler.service:
            query.append(("service", handler.service))
        query += [("scope", s) for s in scopes]
        sep = "&" if "?" in realm else "?"
        url = realm + (sep + urlencode(query) if query else "")
        get_headers = dict(headers)
        if secret:
            get_headers["Authorization"] = _basic_value(username, secret)
        resp = yield Request("GET", url, get_headers, kind="token")
        assert isinstance(resp, Response)
        if not 200 <= resp.status < 400:
            raise self._token_error(resp, what, realm, "GET", anonymous=not secret, secret=secret)
        value, expires_in = self._parse_token(resp, what, realm, oauth=False)
        return self._make_token(value, expires_in)

    @staticmethod
    def _parse_token(resp: Response, what: str, realm: str, *, oauth: bool) -> tuple[str, Any]:
        ctype = resp.header("Content-Type").split(";")[0].strip() or "none"
        try:
            doc = json.loads(resp.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise Unavailable(
                f"{what}: token server {redact_url(realm)} answered {resp.status} with a non-JSON body "
                f"(content-type {ctype})"
            ) from exc
        if not isinstance(doc, dict):
            raise Unavailable(f"{what}: token server {redact_url(realm)} answered JSON that is not an object")
        value = doc.get("access_token") or ("" if oauth else doc.get("token"))
        if not isinstance(value, str) or not value:
            raise Unauthenticated(
                f"{what}: authorization server {redact_url(realm)} did not include a token in the response"
            )
        return value, doc.get("expires_in")

    @staticmethod
    def _token_error(
        resp: Response, what: str, realm: str, method: str, *, anonymous: bool = False, secret: str = ""
    ) -> SociError:
        kind = "anonymous token" if anonymous else "token"
        body = short_body(resp.body, secrets=(secret,))
        msg = f"{what}: failed to fetch {kind}: {method} {redact_url(realm)} answered {resp.status}: {body}"
        if resp.status >= 500 or resp.status == 429:
            return Unavailable(msg)
        return Unauthenticated(msg)
