"""The CRI credential store: record on PullImage, lookup by reference or repository, remove, expiry."""

from __future__ import annotations

import base64
import threading
from types import SimpleNamespace

import pytest

from soci_fs.errors import InvalidArgument
from soci_grpc.keychain.cri import AuthConfig, CriCredentialStore, CriEntry

DIGEST = "sha256:" + "b" * 64


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


AUTH_CASES = [
    # (AuthConfig fields, expected (username, password, identity_token, registry_token))
    ({"username": "u", "password": "p"}, ("u", "p", "", "")),
    ({"username": "u", "password": "p", "auth": b64("other:x")}, ("u", "p", "", "")),
    ({"auth": b64("a:b:c")}, ("a", "b:c", "", "")),
    ({"auth": b64("a:b\x00")}, ("a", "b", "", "")),
    ({"identity_token": "idt"}, ("", "", "idt", "")),
    ({"registry_token": "rt"}, ("", "", "", "rt")),
]


@pytest.mark.parametrize(("fields", "expected"), AUTH_CASES)
def test_auth_config_decoding(fields: dict, expected: tuple) -> None:
    store = CriCredentialStore()
    store.record("reg.example/app:1", AuthConfig(**fields))
    c = store("reg.example", "reg.example/app:1")
    assert c is not None
    assert (c.username, c.password, c.identity_token, c.registry_token) == expected
    assert c.source == "cri:reg.example/app:1"


def test_from_protobuf_like_objects_and_dicts() -> None:
    msg = SimpleNamespace(
        username="u", password="p", auth="", server_address="", identity_token="", registry_token=""
    )
    assert AuthConfig.from_message(msg) == AuthConfig(username="u", password="p")
    assert AuthConfig.from_message({"identity_token": "t"}) == AuthConfig(identity_token="t")
    assert AuthConfig.from_message(None) is None


@pytest.mark.parametrize(
    "fields", [{"auth": "%%SECRET%%"}, {"auth": b64("nocolon-SECRET")}, {"auth": b64(":SECRET")}]
)
def test_bad_auth_is_refused_at_record_time(fields: dict) -> None:
    store = CriCredentialStore()
    with pytest.raises(InvalidArgument, match=r"cri:reg.example/app:1") as err:
        store.record("reg.example/app:1", AuthConfig(**fields))
    assert "SECRET" not in str(err.value)
    assert store("reg.example", "reg.example/app:1") is None


LOOKUP_CASES = [
    # (recorded image, lookup host, lookup ref, expected user or None)
    ("nginx", "registry-1.docker.io", "docker.io/library/nginx:latest", "u"),
    ("docker.io/library/nginx:latest", "registry-1.docker.io", "nginx", "u"),
    (
        "nginx:1.25",
        "registry-1.docker.io",
        f"docker.io/library/nginx@{DIGEST}",
        "u",
    ),  # digest pull, same repo
    ("nginx:1.25", "registry-1.docker.io", "docker.io/library/nginx:other", "u"),  # other tag, same repo
    ("nginx:1.25", "registry-1.docker.io", "docker.io/library/redis:1", None),  # other repository
    ("reg.example/app:1", "mirror.example", "reg.example/app:1", None),  # never offered to another host
    ("reg.example/app:1", "reg.example", "reg.example/app/sub:1", None),
    ("reg.example:5000/app:1", "reg.example:5000", "reg.example:5000/app:1", "u"),
    ("reg.example/app:1", "reg.example", "not a ref", None),
]


@pytest.mark.parametrize(("image", "host", "ref", "user"), LOOKUP_CASES)
def test_lookup(image: str, host: str, ref: str, user: str | None) -> None:
    store = CriCredentialStore()
    store.record(image, AuthConfig(username="u", password="p"))
    c = store(host, ref)
    assert (c.username if c else None) == user


@pytest.mark.parametrize(
    ("server_address", "host", "found"),
    [
        ("https://reg.example", "reg.example", True),
        ("reg.example", "reg.example", True),  # upstream: scheme-less never matches; we accept it
        ("https://index.docker.io/v1/", "registry-1.docker.io", True),
        ("https://elsewhere.example", "reg.example", False),
    ],
)
def test_server_address_must_name_the_host(server_address: str, host: str, found: bool) -> None:
    store = CriCredentialStore()
    image = "docker.io/library/app:1" if "docker" in host else "reg.example/app:1"
    store.record(image, AuthConfig(username="u", password="p", server_address=server_address))
    assert (store(host, image) is not None) == found


def test_newest_pull_of_the_repository_wins_and_exact_first() -> None:
    store = CriCredentialStore()
    store.record("reg.example/app:1", AuthConfig(username="old", password="p"))
    store.record("reg.example/app:2", AuthConfig(username="new", password="p"))
    assert store("reg.example", f"reg.example/app@{DIGEST}").username == "new"  # type: ignore[union-attr]
    assert store("reg.example", "reg.example/app:1").username == "old"  # type: ignore[union-attr]
    store.record("reg.example/app:1", AuthConfig(username="again", password="p"))
    assert store("reg.example", "reg.example/app:3").username == "again"  # type: ignore[union-attr]
    assert store.statistics()["repository"] == 2


def test_anonymous_pull_replaces_credentials_of_that_reference() -> None:
    store = CriCredentialStore()
    store.record("reg.example/app:1", AuthConfig(username="u", password="p"))
    store.record("reg.example/app:1", None)
    assert store("reg.example", "reg.example/app:1") is None


def test_remove_image() -> None:
    store = CriCredentialStore()
    store.record("reg.example/app:1", AuthConfig(username="u", password="p"))
    assert store.remove("reg.example/app:1") is True
    assert store("reg.example", "reg.example/app:1") is None
    assert store.remove("reg.example/app:1") is False
    assert store.remove("NOT VALID") is False


def test_expiry_from_ttl_and_jwt() -> None:
    now = [1000.0]
    store = CriCredentialStore(ttl=60, clock=lambda: now[0])
    store.record("reg.example/app:1", AuthConfig(username="u", password="p"))
    assert store("reg.example", "reg.example/app:1").expires_at == 1060.0  # type: ignore[union-attr]
    payload = base64.urlsafe_b64encode(b'{"exp": 1030}').decode().rstrip("=")
    store.record("reg.example/app:1", AuthConfig(identity_token=f"h.{payload}.s"))
    assert store("reg.example", "reg.example/app:1").expires_at == 1030.0  # type: ignore[union-attr]
    # Expired credentials are still the answer: the chain does not fall through on expiry.
    now[0] = 5000.0
    assert store("reg.example", "reg.example/app:1") is not None


def test_persister_hook_is_called() -> None:
    class Memory:
        def __init__(self) -> None:
            self.saved: tuple[CriEntry, ...] = ()

        def load(self) -> list[CriEntry]:
            return list(self.saved)

        def save(self, entries: tuple[CriEntry, ...]) -> None:
            self.saved = entries

    mem = Memory()
    store = CriCredentialStore(persist=mem)
    store.record("reg.example/app:1", AuthConfig(username="u", password="p"))
    assert len(mem.saved) == 1
    again = CriCredentialStore(persist=mem)
    assert again("reg.example", "reg.example/app:1") is not None
    store.remove("reg.example/app:1")
    assert mem.saved == ()


def test_concurrent_record_and_lookup() -> None:
    store = CriCredentialStore()
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(200):
                store.record(f"reg.example/app{i}:{j}", AuthConfig(username=f"u{i}", password="p"))
                store.remove(f"reg.example/app{i}:{j - 1}")
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(400):
                store("reg.example", "reg.example/app1:5")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [
        threading.Thread(target=reader) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.statistics()["entries"] == 4


def test_invalid_image_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        CriCredentialStore().record("UPPER/case", AuthConfig(username="u"))


def test_repr_hides_secrets() -> None:
    a = AuthConfig(username="u", password="PW-SECRET", auth="AUTH-SECRET", identity_token="ID-SECRET")
    assert "SECRET" not in repr(a)
