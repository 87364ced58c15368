"""The chain: order, first non-empty answer wins, no fall-through on wrong credentials or errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from soci_fs.errors import FormatError, SociError
from soci_fs.registry.credentials import Credentials
from soci_grpc.keychain.chain import SOURCE_ORDER, CredentialChain, pick
from soci_grpc.keychain.cri import AuthConfig, CriCredentialStore
from soci_grpc.keychain.docker_config import DockerConfigKeychain
from soci_grpc.keychain.kubeconfig import KubeSecretKeychain
from tests.grpc.keychain.conftest import write_config
from tests.harness.kube_api import KubeAPIServer, basic_auth, dockerconfigjson


def fixed(answer: Credentials | Exception | None, calls: list[str], name: str):  # type: ignore[no-untyped-def]
    def source(host: str, ref: str) -> Credentials | None:
        calls.append(name)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return source


A = Credentials(username="a", password="1", source="A")
B = Credentials(username="b", password="2", source="B")
C = Credentials(identity_token="t", source="C")
EMPTY = Credentials()

CASES = [
    # (docker, cri, kube, expected answer, expected calls)
    (A, B, C, A, ["docker"]),
    (None, B, C, B, ["docker", "cri"]),
    (EMPTY, None, C, C, ["docker", "cri", "kube"]),
    (None, None, None, None, ["docker", "cri", "kube"]),
    (None, "disabled", C, C, ["docker", "kube"]),
    (None, B, "disabled", B, ["docker", "cri"]),
]


@pytest.mark.parametrize(("docker", "cri", "kube", "expected", "calls"), CASES)
def test_order_and_first_non_empty_wins(docker, cri, kube, expected, calls) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    chain = CredentialChain(
        fixed(docker, seen, "docker"),
        None if cri == "disabled" else fixed(cri, seen, "cri"),
        None if kube == "disabled" else fixed(kube, seen, "kube"),
    )
    assert chain("reg.example", "reg.example/x:1") == expected
    assert seen == calls


def test_an_error_stops_the_chain() -> None:
    seen: list[str] = []
    chain = CredentialChain(fixed(FormatError("bad file"), seen, "docker"), fixed(B, seen, "cri"))
    with pytest.raises(FormatError):
        chain("reg.example", "")
    assert seen == ["docker"]
    last = chain.last_answer("reg.example")
    assert last is not None and last.source == "docker-config" and last.error == "bad file"
    assert chain.statistics()["error"] == 1


def test_records_which_source_answered() -> None:
    seen: list[str] = []
    chain = CredentialChain(fixed(None, seen, "d"), fixed(B, seen, "c"), fixed(C, seen, "k"))
    chain("reg.example", "reg.example/x:1")
    chain("reg.example", "reg.example/x:1")
    last = chain.last_answer("reg.example")
    assert last is not None and last.source == "cri" and last.credentials == B
    stats = chain.statistics()
    assert stats["cri"] == 2 and stats["docker-config"] == 0
    assert [name for name, _ in chain.slots()] == list(SOURCE_ORDER)


def test_pick_reasons() -> None:
    assert pick([]) == ("", "no source is enabled; requests go out anonymously")
    name, reason = pick([("docker-config", None, ""), ("cri", B, "")])
    assert name == "cri" and "after docker-config had nothing" in reason and "does not fall through" in reason
    name, reason = pick([("docker-config", None, "boom"), ("cri", B, "")])
    assert name == "" and "stops at docker-config" in reason


def test_docker_config_wins_over_kubernetes_secrets_and_wrong_ones_do_not_fall_through(
    tmp_path: Path, kube_api: KubeAPIServer
) -> None:
    """With credentials for the host in both the Docker config and a secret, the Docker ones are used —
    even when they are wrong (the registry will refuse them; the secret is never offered instead)."""
    cfg = write_config(
        tmp_path / "config.json",
        {"auths": {"reg.example": {"auth": base64.b64encode(b"docker-user:WRONG").decode()}}},
    )
    kube_api.put_secret("default", "s", dockerconfigjson({"reg.example": basic_auth("k8s-user", "right")}))
    kube = KubeSecretKeychain(kube_api.write_kubeconfig(tmp_path / "kc"), min_backoff=0.02)
    kube.start()
    try:
        assert kube.wait_ready(10)
        cri = CriCredentialStore()
        chain = CredentialChain(DockerConfigKeychain(cfg), cri, kube)
        c = chain("reg.example", "reg.example/app:1")
        assert c is not None and (c.username, c.password) == ("docker-user", "WRONG")
        # A second lookup (after the registry said 401, the auth flow asks again) gives the same answer.
        assert chain("reg.example", "reg.example/app:1") == c
        assert chain.statistics()["docker-config"] == 2 and chain.statistics()["kubernetes-secrets"] == 0
        # CRI credentials for the host also lose to the Docker config, and win over the secret.
        cri.record("reg.example/app:1", AuthConfig(username="cri-user", password="x"))
        assert chain("reg.example", "reg.example/app:1").username == "docker-user"  # type: ignore[union-attr]
        cfg.write_text(json.dumps({"auths": {}}))
        assert chain("reg.example", "reg.example/app:1").username == "cri-user"  # type: ignore[union-attr]
        cri.remove("reg.example/app:1")
        assert chain("reg.example", "reg.example/app:1").username == "k8s-user"  # type: ignore[union-attr]
    finally:
        kube.stop()


def test_a_malformed_docker_config_does_not_fall_through(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.json", "{broken")
    cri = CriCredentialStore()
    cri.record("reg.example/app:1", AuthConfig(username="cri-user", password="x"))
    chain = CredentialChain(DockerConfigKeychain(cfg), cri)
    with pytest.raises(SociError, match=r"config\.json: not valid JSON"):
        chain("reg.example", "reg.example/app:1")
