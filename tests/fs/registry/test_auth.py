"""The pure auth flow, driven by hand with next()/send(); challenge parsing tables."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest

from soci_fs.errors import Unauthenticated, Unavailable
from soci_fs.registry import auth
from soci_fs.registry.credentials import Credentials

REG = "http://reg.test/v2/repo/blobs/sha256:" + "0" * 64
REALM = "https://auth.test/token"
SCOPE = "repository:repo:pull"
BEARER = f'Bearer realm="{REALM}",service="reg",scope="{SCOPE}"'


# ---- challenge parsing


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ('Basic realm="r"', [("basic", {"realm": "r"})]),
        (BEARER, [("bearer", {"realm": REALM, "service": "reg", "scope": SCOPE})]),
        ('BEARER Realm="x", Service=svc', [("bearer", {"realm": "x", "service": "svc"})]),
        (
            "Bearer realm=https://a.test/t,service=s",
            [("bearer", {"realm": "https://a.test/t", "service": "s"})],
        ),
        (r'Bearer realm="a\"b\\c"', [("bearer", {"realm": 'a"b\\c'})]),
        ('Bearer realm="unterminated', [("bearer", {"realm": "unterminated"})]),
        (
            'Bearer realm = "spaced" , error="invalid_token"',
            [("bearer", {"realm": "spaced", "error": "invalid_token"})],
        ),
        (
            'Basic realm="b", Bearer realm="t",scope="x y"',
            [("basic", {"realm": "b"}), ("bearer", {"realm": "t", "scope": "x y"})],
        ),
        (['Basic realm="b"', 'Bearer realm="t"'], [("basic", {"realm": "b"}), ("bearer", {"realm": "t"})]),
        ('Bearer realm="first",realm="second"', [("bearer", {"realm": "first"})]),
        ("Basic dXNlcjpwYXNz==", [("basic", {})]),
        ('Negotiate, Bearer realm="t"', [("negotiate", {}), ("bearer", {"realm": "t"})]),
        ("", []),
        ('Bearer realm="t",,, service="s"', [("bearer", {"realm": "t", "service": "s"})]),
    ],
)
def test_parse_challenges(values, expected):
    got = [(c.scheme, dict(c.params)) for c in auth.parse_challenges(values)]
    assert got == expected


def test_challenge_scopes_split_on_spaces():
    (c,) = auth.parse_challenges('Bearer realm="r",scope="a:b:pull c:d:push"')
    assert c.scopes == ("a:b:pull", "c:d:push")


# ---- helpers to drive flows


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Creds:
    def __init__(self, value: Credentials | None) -> None:
        self.value = value
        self.calls = 0

    def __call__(self, host: str, ref: str) -> Credentials | None:
        self.calls += 1
        return self.value


_UP = Credentials("u", "p")


def make(creds: Credentials | None = _UP, **kw):
    clock = Clock()
    cred = Creds(creds)
    return auth.Authenticator(cred, ref="reg.test/repo:v1", clock=clock, **kw), clock, cred


def resp(status: int, body: bytes | dict = b"", challenge: str = "", **headers: str) -> auth.Response:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    return auth.Response(status, headers, (challenge,) if challenge else (), body)


def token_resp(token: str = "T1", expires_in: int | None = 300) -> auth.Response:
    doc: dict = {"access_token": token}
    if expires_in is not None:
        doc["expires_in"] = expires_in
    return resp(200, doc)


def start(a: auth.Authenticator, scopes=(SCOPE,)):
    flow = a.flow(auth.Request("GET", REG, {"Range": "bytes=0-1"}, scopes=scopes))
    return flow, next(flow)


def finish(flow, response):
    with pytest.raises(StopIteration) as stop:
        flow.send(response)
    return stop.value.value


def authenticate(a, token="T1", expires_in=300):
    """Run one flow through a bearer challenge and a POST token fetch; return the final request."""
    flow, _ = start(a)
    tok_req = flow.send(resp(401, challenge=BEARER))
    assert tok_req.kind == "token"
    again = flow.send(token_resp(token, expires_in))
    finish(flow, resp(200))
    return tok_req, again


# ---- flows


def test_first_request_goes_unauthenticated_and_password_grant_posts_form():
    a, _, cred = make()
    flow, first = start(a)
    assert "Authorization" not in first.headers and first.headers["Range"] == "bytes=0-1"
    tok = flow.send(resp(401, challenge=BEARER))
    assert (tok.method, tok.url, tok.kind) == ("POST", REALM, "token")
    assert tok.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    form = {k: v[0] for k, v in parse_qs(tok.body.decode()).items()}
    assert form == {
        "scope": SCOPE,
        "service": "reg",
        "client_id": "containerd-client",
        "grant_type": "password",
        "username": "u",
        "password": "p",
    }
    again = flow.send(token_resp("T1"))
    assert again.headers["Authorization"] == "Bearer T1" and again.url == REG
    final = finish(flow, resp(200))
    assert final.status == 200
    assert cred.calls == 1
    # the next request reuses the cached token: no token request
    flow, first = start(a)
    assert first.headers["Authorization"] == "Bearer T1"
    assert finish(flow, resp(206)).status == 206


@pytest.mark.parametrize("post_status", [404, 401, 400, 405])
def test_post_failure_falls_back_to_get_with_basic(post_status):
    a, _, _ = make()
    flow, _ = start(a)
    flow.send(resp(401, challenge=BEARER))
    get = flow.send(resp(post_status))
    assert get.method == "GET" and get.kind == "token"
    q = parse_qs(urlsplit(get.url).query)
    assert q == {"service": ["reg"], "scope": [SCOPE]}
    assert get.headers["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    again = flow.send(resp(200, {"token": "G1", "expires_in": 60}))
    assert again.headers["Authorization"] == "Bearer G1"


def test_identity_token_uses_refresh_grant_and_405_without_username_is_an_error():
    a, _, _ = make(Credentials(identity_token="IDT"))
    flow, _ = start(a)
    post = flow.send(resp(401, challenge=BEARER))
    form = parse_qs(post.body.decode())
    assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == ["IDT"]
    assert "username" not in form
    with pytest.raises(Unauthenticated) as e:
        flow.send(resp(405, b"nope"))
    assert "405" in str(e.value) and "IDT" not in str(e.value)


def test_anonymous_token_is_a_get_without_authorization():
    a, _, _ = make(None)
    flow, _ = start(a)
    get = flow.send(resp(401, challenge=BEARER))
    assert get.method == "GET" and "Authorization" not in get.headers
    again = flow.send(resp(200, {"token": "ANON"}))
    assert again.headers["Authorization"] == "Bearer ANON"


def test_anonymous_token_refused_is_unauthenticated_naming_host_and_scope():
    a, _, _ = make(None)
    flow, _ = start(a)
    flow.send(resp(401, challenge=BEARER))
    with pytest.raises(Unauthenticated) as e:
        flow.send(resp(401, {"errors": [{"code": "UNAUTHORIZED"}]}))
    msg = str(e.value)
    assert "reg.test" in msg and SCOPE in msg and "401" in msg and "anonymous" in msg


def test_registry_token_is_used_directly():
    a, _, _ = make(Credentials(registry_token="RT"))
    flow, _ = start(a)
    again = flow.send(resp(401, challenge=BEARER))
    assert again.kind == "registry" and again.headers["Authorization"] == "Bearer RT"


def test_basic_challenge():
    a, _, cred = make()
    flow, _ = start(a)
    again = flow.send(resp(401, challenge='Basic realm="r"'))
    assert again.headers["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    finish(flow, resp(200))
    flow, first = start(a)
    assert first.headers["Authorization"].startswith("Basic ")
    assert cred.calls == 1


def test_basic_without_credentials():
    a, _, _ = make(None)
    flow, _ = start(a)
    with pytest.raises(Unauthenticated, match="no basic auth credentials"):
        flow.send(resp(401, challenge='Basic realm="r"'))


def test_unsupported_scheme_and_missing_realm():
    a, _, _ = make()
    flow, _ = start(a)
    with pytest.raises(Unauthenticated, match="supported auth scheme"):
        flow.send(resp(401, challenge='Negotiate realm="x"'))
    flow, _ = start(a)
    with pytest.raises(Unauthenticated, match="no realm"):
        flow.send(resp(401, challenge='Bearer service="x"'))


def test_exactly_one_retry_then_the_second_401_is_returned():
    a, _, cred = make()
    flow, _ = start(a)
    flow.send(resp(401, challenge=BEARER))
    flow.send(token_resp("T1"))
    final = finish(flow, resp(401, challenge=BEARER + ',error="invalid_token"'))
    assert final.status == 401
    assert cred.calls == 1


def test_expired_token_refreshes_proactively_and_rereads_credentials():
    a, clock, cred = make()
    authenticate(a, "T1", expires_in=30)
    clock.t += 29  # inside the refresh margin (min(10, 30/10) = 3 s)
    cred.value = Credentials("u", "rotated")
    flow, tok = start(a)
    assert tok.kind == "token" and "rotated" in tok.body.decode()
    again = flow.send(token_resp("T2"))
    assert again.headers["Authorization"] == "Bearer T2"
    assert cred.calls == 2


def test_token_without_expiry_gets_the_default_lifetime():
    a, clock, _ = make()
    authenticate(a, "T1", expires_in=None)
    clock.t += auth.DEFAULT_TOKEN_TTL * 0.9 - 1  # margin: min(10 s, a tenth of the lifetime)
    flow, first = start(a)
    assert first.headers["Authorization"] == "Bearer T1"
    finish(flow, resp(200))
    clock.t += 2
    flow, first = start(a)
    assert first.kind == "token"


def test_401_with_a_valid_cached_token_forces_a_fresh_fetch():
    a, _, cred = make()
    authenticate(a, "T1")
    flow, first = start(a)
    assert first.headers["Authorization"] == "Bearer T1"
    tok = flow.send(resp(401, challenge=BEARER + ',error="invalid_token"'))
    assert tok.kind == "token"
    again = flow.send(token_resp("T2"))
    assert again.headers["Authorization"] == "Bearer T2"
    assert cred.calls == 2


def test_ecr_style_expired_403_without_challenge_refreshes():
    a, _, _ = make()
    authenticate(a, "T1")
    flow, _ = start(a)
    body = {"errors": [{"code": "DENIED", "message": auth.ECR_EXPIRED_MESSAGE}]}
    tok = flow.send(resp(403, body))
    assert tok.kind == "token"
    again = flow.send(token_resp("T2"))
    assert again.headers["Authorization"] == "Bearer T2"


def test_ecr_style_expired_403_with_no_handler_uses_basic():
    a, _, _ = make()
    flow, _ = start(a)
    body = {"errors": [{"code": "DENIED", "message": auth.ECR_EXPIRED_MESSAGE}]}
    again = flow.send(resp(403, body))
    assert again.headers["Authorization"].startswith("Basic ")


def test_genuine_403_is_returned_without_retry():
    a, _, cred = make()
    authenticate(a)
    flow, _ = start(a)
    final = finish(flow, resp(403, {"errors": [{"code": "DENIED", "message": "requested access is denied"}]}))
    assert final.status == 403 and cred.calls == 1


def test_single_flight_two_flows_one_token_request():
    a, _, cred = make()
    authenticate(a, "T1")
    f1, _ = start(a)
    f2, _ = start(a)
    ch = resp(401, challenge=BEARER + ',error="invalid_token"')
    tok = f1.send(ch)
    assert tok.kind == "token"
    w = f2.send(ch)
    assert isinstance(w, auth.Wait) and not w.pending.done
    again1 = f1.send(token_resp("T2"))
    assert w.pending.done
    again2 = f2.send(None)
    assert again1.headers["Authorization"] == again2.headers["Authorization"] == "Bearer T2"
    # a third flow that was sent with T1 and fails later reuses T2 without fetching
    _, r3 = start(a)
    assert r3.headers["Authorization"] == "Bearer T2"
    assert cred.calls == 2
    assert a.statistics()["waits"] == 1


def test_single_flight_failure_is_shared_and_not_cached():
    a, _, _ = make()
    authenticate(a, "T1")
    f1, _ = start(a)
    f2, _ = start(a)
    ch = resp(401, challenge=BEARER + ',error="invalid_token"')
    f1.send(ch)
    w = f2.send(ch)
    with pytest.raises(Unavailable):
        f1.send(resp(503, b"down"))
    with pytest.raises(Unavailable):
        f2.send(None)
    assert isinstance(w, auth.Wait)
    _, r3 = start(a)  # T1 still cached and fresh -> used; nothing cached for the failure
    assert r3.headers["Authorization"] == "Bearer T1"


def test_abandoned_leader_releases_waiters():
    a, _, _ = make()
    authenticate(a, "T1")
    f1, _ = start(a)
    f2, _ = start(a)
    ch = resp(401, challenge=BEARER + ',error="invalid_token"')
    f1.send(ch)
    w = f2.send(ch)
    f1.close()  # the driver gave up (e.g. connection error) -> GeneratorExit in the leader
    assert w.pending.done
    with pytest.raises(Unavailable):
        f2.send(None)


@pytest.mark.parametrize(
    ("token_response", "error", "fragment"),
    [
        (resp(200, b"<html>login</html>", **{"Content-Type": "text/html"}), Unavailable, "non-JSON"),
        (resp(200, {"expires_in": 5}), Unauthenticated, "did not include a token"),
        (resp(500, b"boom"), Unavailable, "500"),
        (resp(429, b"slow down"), Unavailable, "429"),
        (resp(403, b"no"), Unauthenticated, "403"),
        (resp(200, b"[1,2]"), Unavailable, "not an object"),
    ],
)
def test_bad_token_responses(token_response, error, fragment):
    a, _, _ = make(Credentials("u", "hunter2-secret"))
    flow, _ = start(a)
    flow.send(resp(401, challenge=BEARER))
    with pytest.raises(error) as e:
        flow.send(token_response)
    msg = str(e.value)
    assert fragment in msg and "reg.test" in msg and "hunter2-secret" not in msg


def test_invalid_token_challenge_replaces_handler_realm():
    a, _, _ = make()
    authenticate(a, "T1")
    flow, _ = start(a)
    tok = flow.send(
        resp(401, challenge='Bearer realm="https://other.test/t",service="s2",error="invalid_token"')
    )
    assert tok.url == "https://other.test/t"


def test_insufficient_scope_adds_the_challenge_scope_to_the_fetch():
    a, _, _ = make()
    authenticate(a, "T1")
    flow, _ = start(a)
    extra = "repository:other:pull"
    tok = flow.send(
        resp(
            401, challenge=f'Bearer realm="{REALM}",service="reg",scope="{extra}",error="insufficient_scope"'
        )
    )
    scopes = parse_qs(tok.body.decode())["scope"][0].split(" ")
    assert set(scopes) == {SCOPE, extra}


def test_errors_never_contain_secrets():
    a, _, _ = make(Credentials("user", "pa55word-xyz"))
    flow, _ = start(a)
    flow.send(resp(401, challenge=BEARER))
    get = flow.send(resp(401, b"{}"))  # POST refused: fall back to GET
    assert get.method == "GET"
    with pytest.raises(Unauthenticated) as e:
        flow.send(resp(401, b'{"error":"bad password pa55word-xyz","token":"leaky"}'))
    assert "pa55word-xyz" not in str(e.value) and "leaky" not in str(e.value)
