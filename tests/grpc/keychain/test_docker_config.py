"""The Docker config keychain: file location, format, host matching, store selection, rotation, bad input."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from soci_fs.errors import FormatError, InvalidArgument
from soci_grpc.keychain.docker_config import (
    HUB_KEY,
    DockerConfigKeychain,
    default_config_path,
    jwt_expiry,
    match_auths,
    parse_docker_config,
    reduce_key,
    registry_key,
    split_reference,
)
from soci_grpc.keychain.helpers import HelperRunner
from tests.grpc.keychain.conftest import write_config
from tests.harness.credhelpers import HelperDir


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def make_jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


# ------------------------------------------------------------------------------------------ location


@pytest.mark.parametrize(
    ("explicit", "env", "expected"),
    [
        ("/etc/soci/docker.json", {"DOCKER_CONFIG": "/x", "HOME": "/h"}, "/etc/soci/docker.json"),
        (None, {"DOCKER_CONFIG": "/x", "HOME": "/h"}, "/x/config.json"),
        (None, {"HOME": "/h"}, "/h/.docker/config.json"),
        (None, {"DOCKER_CONFIG": "", "HOME": "/h"}, "/h/.docker/config.json"),
    ],
)
def test_config_path(explicit: str | None, env: dict, expected: str) -> None:
    assert default_config_path(explicit, env) == Path(expected)


def test_config_path_without_home_uses_the_users_home() -> None:
    path = default_config_path(None, {})
    assert path.name == "config.json" and path.parent.name == ".docker"
    assert str(path).startswith(os.path.expanduser("~"))


# ------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("docker.io", HUB_KEY),
        ("registry-1.docker.io", HUB_KEY),
        ("index.docker.io", HUB_KEY),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("ghcr.io", "ghcr.io"),
    ],
)
def test_registry_key(host: str, key: str) -> None:
    assert registry_key(host) == key


@pytest.mark.parametrize(
    ("key", "reduced"),
    [
        (HUB_KEY, ("index.docker.io", "")),
        ("https://reg.example:5000/v2/", ("reg.example:5000", "")),
        ("http://reg.example/", ("reg.example", "")),
        ("reg.example/team/app", ("reg.example", "team/app")),
        ("https://reg.example/team", ("reg.example", "team")),
        ("REG.example", ("reg.example", "")),
        ("docker.io", ("index.docker.io", "")),
    ],
)
def test_reduce_key(key: str, reduced: tuple[str, str]) -> None:
    assert reduce_key(key) == reduced


def test_split_reference_normalizes_like_docker() -> None:
    assert str(split_reference("nginx")) == "docker.io/library/nginx:latest"
    assert str(split_reference("index.docker.io/foo/bar:1")) == "docker.io/foo/bar:1"
    digest = "sha256:" + "a" * 64
    assert str(split_reference(f"reg.example:5000/a/b:tag@{digest}")) == f"reg.example:5000/a/b@{digest}"
    with pytest.raises(InvalidArgument):
        split_reference("Not/Valid")


# ------------------------------------------------------------------------------------------ format


ENTRY_CASES = [
    # (entry, expected (username, password, identity_token, registry_token))
    ({"auth": b64("alice:pw")}, ("alice", "pw", "", "")),
    ({"auth": b64("alice:pw:with:colons")}, ("alice", "pw:with:colons", "", "")),
    ({"auth": b64("alice:pw\x00\x00")}, ("alice", "pw", "", "")),
    ({"username": "bob", "password": "x"}, ("bob", "x", "", "")),
    ({"auth": b64("alice:pw"), "username": "bob", "password": "x"}, ("alice", "pw", "", "")),
    ({"identitytoken": "idt"}, ("", "", "idt", "")),
    ({"auth": b64("alice:pw"), "identitytoken": "idt"}, ("alice", "pw", "idt", "")),
    ({"registrytoken": "rt"}, ("", "", "", "rt")),
    ({"email": "a@b"}, ("", "", "", "")),
    ({}, ("", "", "", "")),
]


@pytest.mark.parametrize(("entry", "expected"), ENTRY_CASES)
def test_parse_entries(entry: dict, expected: tuple[str, str, str, str]) -> None:
    cfg = parse_docker_config(json.dumps({"auths": {"reg.example": entry}}), "t")
    e = cfg.auths[0]
    assert (e.username, e.password, e.identity_token, e.registry_token) == expected


@pytest.mark.parametrize(
    ("entry", "expected_kind"),
    [
        ({"auth": b64("alice:pw")}, ("alice", "pw", "", "")),
        ({"auth": b64("alice:pw"), "identitytoken": "idt"}, ("", "", "idt", "")),  # identity token wins
        ({"registrytoken": "rt"}, ("", "", "", "rt")),
    ],
)
def test_entry_credentials(entry: dict, expected_kind: tuple[str, str, str, str]) -> None:
    cfg = parse_docker_config(json.dumps({"auths": {"reg.example": entry}}), "t")
    c = cfg.auths[0].credentials("src")
    assert c is not None
    assert (c.username, c.password, c.identity_token, c.registry_token) == expected_kind
    assert c.source == "src"


BAD_CONFIGS = [
    ("{not json", "not valid JSON at line 1"),
    ("[]", "top level must be a JSON object"),
    ('{"auths": []}', "'auths' must be an object"),
    ('{"auths": {"r": "x"}}', "auths['r'] must be an object"),
    ('{"auths": {"r": {"auth": 5}}}', "auths['r'].auth must be a string"),
    ('{"auths": {"r": {"auth": "%%%SECRETVALUE%%%"}}}', "'auth' is not standard base64"),
    ('{"auths": {"r": {"auth": "' + b64("nocolon") + '"}}}', "no ':'"),
    ('{"auths": {"r": {"auth": "' + b64(":pw") + '"}}}', "empty user name"),
    ('{"auths": {"r": {"auth": "' + base64.b64encode(b"\xff\xfe:x").decode() + '"}}}', "UTF-8"),
    ('{"auths": {"r": {"auth": "YWxpY2U6cHc"}}}', "not standard base64"),  # padding missing
    ('{"credHelpers": []}', "'credHelpers' must be an object"),
    ('{"credHelpers": {"r": 1}}', "must be a string"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_CONFIGS)
def test_malformed_config_is_a_loud_error(tmp_path: Path, text: str, problem: str) -> None:
    path = write_config(tmp_path / "config.json", text)
    kc = DockerConfigKeychain(path)
    with pytest.raises(FormatError) as err:
        kc("r", "")
    msg = str(err.value)
    assert str(path) in msg and problem in msg
    assert "SECRETVALUE" not in msg


@pytest.mark.parametrize("name", ["../evil", "a b", "x;rm -rf /", "-flag", "a/b", "$(id)", ""])
def test_bad_helper_names_are_refused(tmp_path: Path, name: str) -> None:
    path = write_config(tmp_path / "config.json", {"credHelpers": {"r": name}})
    with pytest.raises(InvalidArgument, match="not a plain name"):
        DockerConfigKeychain(path)("r", "")
    path = write_config(tmp_path / "config.json", {"credsStore": name} if name else {"credsStore": "a b"})
    with pytest.raises(InvalidArgument, match="credsStore"):
        DockerConfigKeychain(path)("r", "")


def test_directory_instead_of_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()
    with pytest.raises(InvalidArgument, match="is a directory"):
        DockerConfigKeychain(tmp_path / "config.json")("r", "")


def test_missing_file_means_no_credentials(tmp_path: Path) -> None:
    kc = DockerConfigKeychain(tmp_path / "nope.json")
    assert kc("r", "") is None
    assert any("does not exist" in s for s in kc.trace("r", "").steps)


# ------------------------------------------------------------------------------------------ matching

AUTHS = {
    HUB_KEY: {"auth": b64("hub:1")},
    "reg.example": {"auth": b64("host:2")},
    "https://reg.example/v2/": {"auth": b64("url:3")},
    "reg.example/team": {"auth": b64("team:4")},
    "reg.example/team/app": {"auth": b64("app:5")},
    "other.example:5000": {"auth": b64("other:6")},
    "https://plain.example:8443/v1/": {"auth": b64("plain:7")},
}

MATCH_CASES = [
    # (host, ref, strict_paths, expected user)
    ("registry-1.docker.io", "docker.io/library/nginx:1", False, "hub"),
    ("docker.io", "", False, "hub"),
    ("reg.example", "reg.example/team/app:1", True, "app"),
    ("reg.example", "reg.example/team/other:1", True, "team"),
    ("reg.example", "reg.example/solo:1", True, "host"),
    ("reg.example", "", True, "host"),
    ("other.example:5000", "other.example:5000/x", True, "other"),
    ("other.example", "other.example/x", True, None),
    ("plain.example:8443", "", False, "plain"),
    ("unknown.example", "", False, None),
]


@pytest.mark.parametrize(("host", "ref", "strict", "user"), MATCH_CASES)
def test_match_auths(host: str, ref: str, strict: bool, user: str | None) -> None:
    cfg = parse_docker_config(json.dumps({"auths": AUTHS}), "t")
    from soci_grpc.keychain.docker_config import repository_of

    got = match_auths(cfg.auths, host, repository_of(ref), strict_paths=strict)
    assert (got[0][1].username if got else None) == user


def test_exact_key_beats_other_spellings_of_the_host() -> None:
    cfg = parse_docker_config(
        json.dumps(
            {
                "auths": {
                    "https://reg.example/v2/": {"auth": b64("url:1")},
                    "reg.example": {"auth": b64("k:2")},
                }
            }
        ),
        "t",
    )
    assert match_auths(cfg.auths, "reg.example", "", strict_paths=False)[0][1].username == "k"


def test_docker_compat_keeps_non_matching_path_entries_last() -> None:
    cfg = parse_docker_config(json.dumps({"auths": {"reg.example/team": {"auth": b64("team:1")}}}), "t")
    assert [e.username for _, e in match_auths(cfg.auths, "reg.example", "other/x", strict_paths=False)] == [
        "team"
    ]
    assert match_auths(cfg.auths, "reg.example", "other/x", strict_paths=True) == []


def test_keychain_answers_from_auths(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", {"auths": AUTHS})
    kc = DockerConfigKeychain(path)
    c = kc("registry-1.docker.io", "docker.io/library/nginx:latest")
    assert c is not None and (c.username, c.password) == ("hub", "1")
    assert c.source == f"docker-config:{path}"
    assert kc("nothing.example", "") is None


def test_empty_entries_are_skipped(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.json",
        {"auths": {"reg.example": {"email": "x"}, "https://reg.example": {"auth": b64("u:p")}}},
    )
    c = DockerConfigKeychain(path)("reg.example", "")
    assert c is not None and c.username == "u"


# ------------------------------------------------------------------------------------------ stores


def test_store_selection(tmp_path: Path, helper_dir: HelperDir) -> None:
    """credHelpers[key] > credsStore > auths; the selected store is the only one asked."""
    helper_dir.good("per-host", {"reg.example": ("from-helper", "s1")})
    helper_dir.good("store", {"other.example": ("from-store", "s2")})
    path = write_config(
        tmp_path / "config.json",
        {
            "auths": {"reg.example": {"auth": b64("from-file:x")}, "third.example": {"auth": b64("file3:y")}},
            "credHelpers": {"reg.example": "per-host"},
            "credsStore": "store",
        },
    )
    kc = DockerConfigKeychain(path, helpers=HelperRunner(search_path=helper_dir.path))
    c = kc("reg.example", "")
    assert c is not None and c.username == "from-helper" and c.source == "helper:per-host"
    c = kc("other.example", "")
    assert c is not None and c.username == "from-store" and c.source == "helper:store"
    # credsStore has nothing for third.example: no credentials, the file's auths entry is not used.
    assert kc("third.example", "") is None
    assert helper_dir.calls("store") == ["other.example", "third.example"]


def test_helper_for_docker_hub_gets_the_hub_key(tmp_path: Path, helper_dir: HelperDir) -> None:
    helper_dir.good("hub", {HUB_KEY: ("hubuser", "tok")})
    path = write_config(tmp_path / "config.json", {"credHelpers": {HUB_KEY: "hub"}})
    kc = DockerConfigKeychain(path, helpers=HelperRunner(search_path=helper_dir.path))
    c = kc("registry-1.docker.io", "docker.io/library/nginx:latest")
    assert c is not None and c.username == "hubuser"
    assert helper_dir.calls("hub") == [HUB_KEY]


def test_cred_helpers_keyed_by_url_match_the_host(tmp_path: Path, helper_dir: HelperDir) -> None:
    helper_dir.good("h", {"reg.example": ("u", "s")})
    path = write_config(tmp_path / "config.json", {"credHelpers": {"https://reg.example": "h"}})
    kc = DockerConfigKeychain(path, helpers=HelperRunner(search_path=helper_dir.path))
    assert kc("reg.example", "") is not None


def test_env_auth_config_wins_over_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", {"auths": {"reg.example": {"auth": b64("file:1")}}})
    env = {
        "HOME": str(tmp_path),
        "DOCKER_AUTH_CONFIG": json.dumps({"auths": {"reg.example": {"auth": b64("env:2")}}}),
    }
    kc = DockerConfigKeychain(path, env=env)
    c = kc("reg.example", "")
    assert c is not None and c.username == "env" and c.source == "env:DOCKER_AUTH_CONFIG"


@pytest.mark.parametrize(
    "value",
    [
        "{bad",
        json.dumps({"auths": {"r": {"username": "u", "password": "SECRETPW"}}}),
        json.dumps({"auths": {"r": {"auth": "SECRET***"}}}),
        json.dumps({"other": 1}),
    ],
)
def test_malformed_env_auth_config_is_an_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidArgument, match="DOCKER_AUTH_CONFIG") as err:
        DockerConfigKeychain(tmp_path / "c.json", env={"HOME": "/h", "DOCKER_AUTH_CONFIG": value})
    assert "SECRET" not in str(err.value)


# ------------------------------------------------------------------------------------------ rotation


def test_rewritten_file_is_reread(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", {"auths": {"reg.example": {"auth": b64("old:1")}}})
    kc = DockerConfigKeychain(path)
    assert kc("reg.example", "").username == "old"  # type: ignore[union-attr]
    assert kc("reg.example", "").username == "old"  # type: ignore[union-attr]
    assert kc.reads == 1  # unchanged file: parsed once
    # Same size, same mtime: only the inode/ctime tells (an atomic rename, as `docker login` does).
    st = path.stat()
    new = write_config(tmp_path / "new.json", {"auths": {"reg.example": {"auth": b64("new:2")}}})
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    new.replace(path)
    assert kc("reg.example", "").username == "new"  # type: ignore[union-attr]
    # In-place rewrite with a new mtime.
    write_config(path, {"auths": {"reg.example": {"auth": b64("newer:3")}}})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert kc("reg.example", "").username == "newer"  # type: ignore[union-attr]
    path.unlink()
    assert kc("reg.example", "") is None
    assert kc.reads == 3


def test_file_appearing_later_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    kc = DockerConfigKeychain(path)
    assert kc("reg.example", "") is None
    write_config(path, {"auths": {"reg.example": {"auth": b64("late:1")}}})
    assert kc("reg.example", "").username == "late"  # type: ignore[union-attr]


def test_jwt_expiry() -> None:
    assert jwt_expiry(make_jwt({"exp": 1700000000})) == 1700000000.0
    assert jwt_expiry(make_jwt({"sub": "x"})) is None
    assert jwt_expiry("opaque") is None
    assert jwt_expiry("a.b.c") is None


def test_identity_token_expiry_is_reported(tmp_path: Path) -> None:
    tok = make_jwt({"exp": 1800000000})
    path = write_config(tmp_path / "config.json", {"auths": {"reg.example": {"identitytoken": tok}}})
    c = DockerConfigKeychain(path)("reg.example", "")
    assert c is not None and c.identity_token == tok and c.expires_at == 1800000000.0
