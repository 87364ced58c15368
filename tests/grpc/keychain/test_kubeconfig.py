"""The Kubernetes-secret keychain with the real ``kubernetes`` client against the test API server."""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from soci_grpc.keychain.kubeconfig import KubeSecretKeychain
from tests.harness.kube_api import KubeAPIServer, basic_auth, dockerconfigjson

REF = "reg.example/team/app:1"


def user_of(kc: KubeSecretKeychain, host: str = "reg.example", ref: str = REF) -> str | None:
    c = kc(host, ref)
    return c.username if c else None


def eventually(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def make_keychain(kube_api: KubeAPIServer, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    made: list[KubeSecretKeychain] = []

    def make(**kwargs) -> KubeSecretKeychain:  # type: ignore[no-untyped-def]
        path = kwargs.pop("path", None) or kube_api.write_kubeconfig(tmp_path / "kubeconfig")
        kwargs.setdefault("min_backoff", 0.02)
        kwargs.setdefault("max_backoff", 0.1)
        kc = KubeSecretKeychain(path, **kwargs)
        made.append(kc)
        kc.start()
        return kc

    yield make
    for kc in made:
        kc.stop()


def watching(kube_api: KubeAPIServer, n: int = 1) -> None:
    kube_api.wait_until(lambda: kube_api.open_watches() >= n)


def test_initial_list_and_watch_events(kube_api: KubeAPIServer, make_keychain) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret("default", "reg", dockerconfigjson({"reg.example": basic_auth("alice", "pw1")}))
    kube_api.put_secret("default", "other-type", b"{}", type="Opaque")
    kc = make_keychain()
    assert kc.wait_ready(10)
    c = kc("reg.example", REF)
    assert c is not None and (c.username, c.password, c.source) == ("alice", "pw1", "secret:default/reg")
    watching(kube_api)
    # The list and the watch carry the field selector; the watch starts from the list's version.
    lists = [p for p in kube_api.requests if "watch=true" not in p]
    watches = [parse_qs(urlsplit(p).query) for p in kube_api.requests if "watch=true" in p]
    assert "fieldSelector=type%3Dkubernetes.io" in lists[0] or "type=kubernetes.io" in lists[0]
    assert watches[0]["fieldSelector"] == ["type=kubernetes.io/dockerconfigjson"]
    assert watches[0]["resourceVersion"] == ["102"] and watches[0]["allowWatchBookmarks"] == ["true"]

    kube_api.put_secret(
        "default", "reg", dockerconfigjson({"reg.example": basic_auth("bob", "pw2")})
    )  # MODIFIED
    eventually(lambda: user_of(kc) == "bob")
    kube_api.put_secret(
        "ns2", "more", dockerconfigjson({"more.example": basic_auth("carol", "pw3")})
    )  # ADDED
    eventually(lambda: user_of(kc, "more.example", "more.example/x") == "carol")
    kube_api.delete_secret("default", "reg")  # DELETED
    eventually(lambda: user_of(kc) is None)
    assert kube_api.lists == 1  # all through one watch


def test_410_gone_relists_and_drops_what_was_deleted_meanwhile(
    kube_api: KubeAPIServer, make_keychain
) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret("default", "a", dockerconfigjson({"reg.example": basic_auth("alice", "pw")}))
    kc = make_keychain()
    assert kc.wait_ready(10)
    watching(kube_api)
    kube_api.hold_lists()
    kube_api.expire_watches()
    kube_api.wait_until(lambda: kube_api.open_watches() == 0)
    # Changes while the keychain has no watch: only the re-list can tell it.
    kube_api.delete_secret("default", "a")
    kube_api.put_secret("default", "b", dockerconfigjson({"reg.example": basic_auth("bea", "pw")}))
    kube_api.release_lists()
    eventually(lambda: user_of(kc) == "bea")
    assert [s.name for s in kc.secrets()] == ["b"]
    assert kc.statistics()["expired"] == 1


def test_watch_from_a_compacted_version_gets_410(kube_api: KubeAPIServer, make_keychain) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret("default", "a", dockerconfigjson({"reg.example": basic_auth("alice", "pw")}))
    kube_api.hold_watches()
    kc = make_keychain()
    assert kc.wait_ready(10)  # listed at version 101; its watch request is held
    kube_api.put_secret("default", "a", dockerconfigjson({"reg.example": basic_auth("anna", "pw")}))
    kube_api.compact()  # version 101 is now too old
    kube_api.release_watches()  # the held watch gets ERROR 410 at once; the keychain re-lists
    eventually(lambda: user_of(kc) == "anna")
    assert kube_api.lists == 2 and kc.statistics()["expired"] == 1


@pytest.mark.parametrize("reason", ["drop", "end"])
def test_disconnect_and_clean_end(kube_api: KubeAPIServer, make_keychain, reason: str) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret("default", "a", dockerconfigjson({"reg.example": basic_auth("alice", "pw")}))
    kc = make_keychain()
    assert kc.wait_ready(10)
    watching(kube_api)
    bookmark_rv = kube_api.send_bookmark()
    eventually(lambda: kc.statistics()["events"] >= 1)
    if reason == "drop":
        kube_api.drop_connections()  # abrupt: back off, then re-list
        kube_api.wait_until(lambda: kube_api.lists == 2 and kube_api.open_watches() == 1)
    else:
        kube_api.end_watches()  # clean end (server timeout): re-watch from the last version, no list
        kube_api.wait_until(lambda: kube_api.watches == 2 and kube_api.open_watches() == 1)
        assert kube_api.lists == 1
        last_watch = parse_qs(urlsplit([p for p in kube_api.requests if "watch=true" in p][-1]).query)
        assert last_watch["resourceVersion"] == [str(bookmark_rv)]  # BOOKMARK advanced it
    kube_api.put_secret("default", "a", dockerconfigjson({"reg.example": basic_auth("after", "pw")}))
    eventually(lambda: user_of(kc) == "after")


def test_namespace_narrowing(kube_api: KubeAPIServer, make_keychain) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret("team-a", "s", dockerconfigjson({"a.example": basic_auth("a", "pw")}))
    kube_api.put_secret("team-b", "s", dockerconfigjson({"b.example": basic_auth("b", "pw")}))
    kube_api.put_secret("team-c", "s", dockerconfigjson({"c.example": basic_auth("c", "pw")}))
    kc = make_keychain(namespaces=["team-a", "team-b"])
    assert kc.wait_ready(10)
    assert user_of(kc, "a.example", "a.example/x") == "a"
    assert user_of(kc, "b.example", "b.example/x") == "b"
    assert user_of(kc, "c.example", "c.example/x") is None
    assert all(p.startswith("/api/v1/namespaces/team-") for p in kube_api.requests)
    watching(kube_api, 2)
    kube_api.put_secret("team-c", "t", dockerconfigjson({"a.example": basic_auth("intruder", "pw")}))
    kube_api.put_secret("team-b", "s", dockerconfigjson({"b.example": basic_auth("b2", "pw")}))
    eventually(lambda: user_of(kc, "b.example", "b.example/x") == "b2")
    assert user_of(kc, "a.example", "a.example/x") == "a"
    # A 410 in one namespace re-lists that namespace only, keeping the other's secrets.
    kube_api.expire_watches()
    kube_api.wait_until(lambda: kube_api.lists == 4)
    assert {s.namespace for s in kc.secrets()} == {"team-a", "team-b"}


def test_label_selector_narrowing(kube_api: KubeAPIServer, make_keychain) -> None:  # type: ignore[no-untyped-def]
    cfg = dockerconfigjson({"reg.example": basic_auth("labelled", "pw")})
    kube_api.put_secret("default", "yes", cfg, labels={"soci.io/sync": "true"})
    kube_api.put_secret("default", "no", dockerconfigjson({"reg.example": basic_auth("aaa", "pw")}))
    kc = make_keychain(label_selector="soci.io/sync=true")
    assert kc.wait_ready(10)
    assert user_of(kc) == "labelled"
    watching(kube_api)
    kube_api.put_secret("default", "yes", cfg, labels={"soci.io/sync": "false"})  # stops matching: DELETED
    eventually(lambda: user_of(kc) is None)
    kube_api.put_secret(
        "default",
        "no",
        dockerconfigjson({"reg.example": basic_auth("now", "pw")}),
        labels={"soci.io/sync": "true"},
    )  # starts matching: ADDED
    eventually(lambda: user_of(kc) == "now")
    assert all("labelSelector=soci.io" in p for p in kube_api.requests)


def test_deterministic_choice(kube_api: KubeAPIServer, make_keychain) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret("zz", "host-only", dockerconfigjson({"reg.example": basic_auth("z-host", "pw")}))
    kube_api.put_secret(
        "aa", "host-only", dockerconfigjson({"https://reg.example": basic_auth("a-url", "pw")})
    )
    kube_api.put_secret("mm", "b", dockerconfigjson({"reg.example": basic_auth("m-host", "pw")}))
    kube_api.put_secret("zz", "team", dockerconfigjson({"reg.example/team": basic_auth("z-team", "pw")}))
    kube_api.put_secret("zz", "app", dockerconfigjson({"reg.example/team/app": basic_auth("z-app", "pw")}))
    kc = make_keychain()
    assert kc.wait_ready(10)
    assert user_of(kc, ref="reg.example/team/app:1") == "z-app"  # most specific path
    assert user_of(kc, ref="reg.example/team/other:1") == "z-team"
    # Host-only keys: the exact Docker key ("reg.example") first, then namespace/name order.
    assert user_of(kc, ref="reg.example/solo:1") == "m-host"
    assert user_of(kc, ref="") == "m-host"
    steps = kc.trace("reg.example", "reg.example/solo:1").steps
    assert steps[-1].startswith("chosen: secret mm/b")
    for _ in range(5):
        assert user_of(kc, ref="reg.example/solo:1") == "m-host"


@pytest.mark.expect_log
def test_malformed_secrets_are_skipped_and_logged_without_content(
    kube_api: KubeAPIServer, make_keychain, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    secret = "SECRET-PASSWORD-1"
    blob = base64.b64encode(f"user:{secret}".encode()).decode()
    kube_api.put_secret("default", "not-json", f"{{bad json {blob}".encode())
    kube_api.put_secret("default", "bad-auth", dockerconfigjson({"reg.example": {"auth": secret}}))
    kube_api.put_secret("default", "no-key", b"", raw_data={"other": blob})
    kube_api.put_secret("default", "not-b64", b"", raw_data={".dockerconfigjson": "%%" + secret})
    kube_api.put_secret("default", "good", dockerconfigjson({"reg.example": basic_auth("good", "pw")}))
    kc = make_keychain()
    assert kc.wait_ready(10)
    assert user_of(kc) == "good"
    assert [s.name for s in kc.secrets()] == ["good"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("not-json", "bad-auth", "no-key", "not-b64"):
        assert any(f"default/{name}" in m for m in warnings), name
    text = caplog.text
    assert secret not in text and blob not in text
    # A good secret turning bad is dropped, not kept stale.
    watching(kube_api)
    kube_api.put_secret("default", "good", b"[]")
    eventually(lambda: user_of(kc) is None)


def test_cred_helpers_in_secrets_are_never_run(kube_api: KubeAPIServer, make_keychain) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret(
        "default", "h", {"credHelpers": {"reg.example": "evil"}, "credsStore": "evil2", "auths": {}}
    )
    kc = make_keychain()
    assert kc.wait_ready(10)
    assert kc("reg.example", REF) is None


def test_kubeconfig_appearing_later(kube_api: KubeAPIServer, make_keychain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kube_api.put_secret("default", "a", dockerconfigjson({"reg.example": basic_auth("late", "pw")}))
    path = tmp_path / "later" / "kubeconfig"
    kc = make_keychain(path=path, file_poll_interval=0.05)
    assert not kc.wait_ready(0.2)
    assert kc("reg.example", REF) is None
    path.parent.mkdir()
    kube_api.write_kubeconfig(path)
    assert kc.wait_ready(10)
    assert user_of(kc) == "late"


def test_stop_is_prompt_while_watching(kube_api: KubeAPIServer, make_keychain) -> None:  # type: ignore[no-untyped-def]
    kc = make_keychain()
    assert kc.wait_ready(10)
    watching(kube_api)
    started = time.monotonic()
    kc.stop()
    assert time.monotonic() - started < 2
    assert kc._thread is not None and not kc._thread.is_alive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.expect_log
def test_unreachable_api_server_backs_off_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    server = KubeAPIServer()
    path = tmp_path / "kubeconfig"
    # Point at a port nothing listens on yet; the keychain retries with backoff.
    path.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "t",'
        f' "clusters": [{{"name": "t", "cluster": {{"server": "http://127.0.0.1:{port}"}}}}],'
        f' "users": [{{"name": "t", "user": {{"token": "{server.token}"}}}}],'
        ' "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}'
    )
    kc = KubeSecretKeychain(path, min_backoff=0.02, max_backoff=0.05, request_timeout=(0.5, 2.0))
    kc.start()
    try:
        eventually(lambda: kc.statistics()["errors"] >= 2)
        assert not kc.ready
        assert any("re-listing in" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert server.token not in caplog.text
    finally:
        kc.stop()


@pytest.mark.expect_log
def test_wrong_token_is_reported_without_the_token(
    kube_api: KubeAPIServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = kube_api.write_kubeconfig(tmp_path / "kubeconfig", token="WRONG-TOKEN-VALUE")
    kc = KubeSecretKeychain(path, min_backoff=0.02, max_backoff=0.05)
    kc.start()
    try:
        eventually(lambda: kc.statistics()["errors"] >= 1)
        assert any("API status 401" in r.getMessage() for r in caplog.records)
        assert "WRONG-TOKEN-VALUE" not in caplog.text
    finally:
        kc.stop()
