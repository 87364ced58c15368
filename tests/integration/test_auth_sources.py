"""Every credential source, through the real registry: pulls, rotation without a restart, and the order rule.

The chain is the one the daemon builds (Docker config, then CRI, then Kubernetes secrets); the registry is
Debian's docker-registry with token auth (and htpasswd for the plain pulls), the helper is a real
executable, the secrets come from the test Kubernetes API server through the real ``kubernetes`` client.
The client's clock is frozen and moved by hand, so "after the old token expires" needs no sleeping.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from soci_fs.errors import Unauthenticated
from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_fs.registry.credentials import Credentials
from soci_fs.registry.reference import HttpConfig, RegistryConfig
from soci_grpc.keychain.chain import CredentialChain
from soci_grpc.keychain.cri import AuthConfig, CriCredentialStore
from soci_grpc.keychain.docker_config import DockerConfigKeychain
from soci_grpc.keychain.helpers import HelperRunner
from soci_grpc.keychain.kubeconfig import KubeSecretKeychain
from tests.harness.credhelpers import HelperDir
from tests.harness.kube_api import KubeAPIServer, basic_auth, dockerconfigjson
from tests.harness.registry import PASSWORD, USER, RawPusher, Registry
from tests.harness.token_server import TokenServer

FAST = RegistryConfig(http=HttpConfig(max_retries=2, min_wait_msec=1, max_wait_msec=20))
ROTATED = "r0tated-Passw0rd"
_n = iter(range(100_000))


class Clock:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def kube_api() -> Iterator[KubeAPIServer]:
    server = KubeAPIServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token_password(token_server: TokenServer) -> Iterator[Callable[[str], None]]:
    """Change the password the token server accepts; the shared server gets its own back afterwards."""
    yield lambda pw: token_server.set_password(USER, pw)
    token_server.set_password(USER, PASSWORD)


def push_image(registry: Registry) -> tuple[str, str, bytes]:
    """A fresh repository with one image; returns (ref, layer digest, layer bytes)."""
    repo = f"auth/e2e{next(_n)}"
    layer = bytes(range(256)) * 4000
    img = RawPusher(registry).push_image(repo, "v1", [layer])
    return f"{registry.host}/{repo}:v1", img["layers"][0], layer


def pull(client: RegistryClient, ref: str, digest: str, layer: bytes) -> None:
    """What the snapshotter does: the manifest, then range reads of a layer."""
    parsed = reference.parse(ref)
    client.get_manifest(parsed)
    blob = client.blob(parsed, digest)
    assert blob.read(1000, 5000) == layer[1000:6000]


def docker_config(path: Path, host: str, user: str, password: str) -> Path:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def kube_keychain(kube_api: KubeAPIServer, tmp_path: Path) -> KubeSecretKeychain:
    kc = KubeSecretKeychain(kube_api.write_kubeconfig(tmp_path / "kubeconfig"), min_backoff=0.02)
    kc.start()
    assert kc.wait_ready(10)
    return kc


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture(params=["htpasswd", "token"])
def registry(request: pytest.FixtureRequest) -> Registry:
    return request.getfixturevalue(f"{request.param}_registry")


# ------------------------------------------------------------------------ each source alone makes a pull


def test_pull_with_docker_config_auths(registry: Registry, tmp_path: Path) -> None:
    ref, digest, layer = push_image(registry)
    chain = CredentialChain(
        DockerConfigKeychain(docker_config(tmp_path / "c.json", registry.host, USER, PASSWORD))
    )
    with RegistryClient(chain, ref=ref, config=FAST) as client:
        pull(client, ref, digest, layer)
    assert chain.statistics()["docker-config"] >= 1


def test_pull_with_a_credential_helper(registry: Registry, tmp_path: Path) -> None:
    ref, digest, layer = push_image(registry)
    helpers = HelperDir(tmp_path / "bin")
    helpers.good("e2e", {registry.host: (USER, PASSWORD)})
    (tmp_path / "c.json").write_text(json.dumps({"credHelpers": {registry.host: "e2e"}}))
    keychain = DockerConfigKeychain(tmp_path / "c.json", helpers=HelperRunner(search_path=helpers.path))
    with RegistryClient(CredentialChain(keychain), ref=ref, config=FAST) as client:
        pull(client, ref, digest, layer)
    assert helpers.calls("e2e"), "the helper executable was not run"


def test_pull_with_cri_credentials_only(registry: Registry, tmp_path: Path) -> None:
    ref, digest, layer = push_image(registry)
    cri = CriCredentialStore()
    cri.record(ref, AuthConfig(username=USER, password=PASSWORD))
    chain = CredentialChain(DockerConfigKeychain(tmp_path / "absent.json"), cri)
    with RegistryClient(chain, ref=ref, config=FAST) as client:
        pull(client, ref, digest, layer)
    assert chain.statistics()["cri"] >= 1 and chain.statistics()["docker-config"] == 0


def test_pull_with_kubernetes_secret_only(
    registry: Registry, tmp_path: Path, kube_api: KubeAPIServer
) -> None:
    ref, digest, layer = push_image(registry)
    kube_api.put_secret("team", "pull", dockerconfigjson({registry.host: basic_auth(USER, PASSWORD)}))
    kc = kube_keychain(kube_api, tmp_path)
    try:
        chain = CredentialChain(DockerConfigKeychain(tmp_path / "absent.json"), CriCredentialStore(), kc)
        with RegistryClient(chain, ref=ref, config=FAST) as client:
            pull(client, ref, digest, layer)
        assert chain.statistics()["kubernetes-secrets"] >= 1
    finally:
        kc.stop()


def test_no_credentials_is_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    ref, digest, layer = push_image(registry)
    chain = CredentialChain(DockerConfigKeychain(tmp_path / "absent.json"))
    with RegistryClient(chain, ref=ref, config=FAST) as client, pytest.raises(Unauthenticated) as err:
        pull(client, ref, digest, layer)
    assert registry.host in str(err.value)


# -------------------------------------------------------------- rotation after the old token has expired


def _rotate_and_pull(
    token_registry: Registry,
    chain: CredentialChain,
    rotate_source: Callable[[], None],
    token_password: Callable[[str], None],
) -> None:
    ref, digest, layer = push_image(token_registry)
    clock = Clock()
    with RegistryClient(chain, ref=ref, config=FAST, clock=clock) as client:
        pull(client, ref, digest, layer)
        token_password(ROTATED)  # the registry's side of the rotation: the old password is now refused
        rotate_source()
        clock.t += 3600  # the token issued for the old password has expired
        pull(client, ref, digest, layer)  # same client, no restart: the chain is asked again
    # and the registry really refuses the old password now (so the pull above used the rotated one)
    with (
        RegistryClient(lambda h, r: Credentials(USER, PASSWORD), ref=ref, config=FAST) as old,
        pytest.raises(Unauthenticated),
    ):
        pull(old, ref, digest, layer)


def test_rotation_through_the_docker_config_file(
    token_registry: Registry, tmp_path: Path, token_password: Callable[[str], None]
) -> None:
    cfg = docker_config(tmp_path / "config.json", token_registry.host, USER, PASSWORD)
    chain = CredentialChain(DockerConfigKeychain(cfg))

    def rotate() -> None:  # what `docker login` does: a new file in place
        time.sleep(0.01)
        docker_config(tmp_path / "new.json", token_registry.host, USER, ROTATED).replace(cfg)

    _rotate_and_pull(token_registry, chain, rotate, token_password)
    assert chain.last_answer(token_registry.host).credentials.password == ROTATED  # type: ignore[union-attr]


def test_rotation_through_a_credential_helper(
    token_registry: Registry, tmp_path: Path, token_password: Callable[[str], None]
) -> None:
    helpers = HelperDir(tmp_path / "bin")
    helpers.rotating("rot", USER, PASSWORD)
    (tmp_path / "c.json").write_text(json.dumps({"credsStore": "rot"}))
    chain = CredentialChain(
        DockerConfigKeychain(tmp_path / "c.json", helpers=HelperRunner(search_path=helpers.path))
    )
    _rotate_and_pull(token_registry, chain, lambda: helpers.set_answer("rot", USER, ROTATED), token_password)
    assert len(helpers.calls("rot")) >= 2


def test_rotation_through_a_kubernetes_secret(
    token_registry: Registry, tmp_path: Path, kube_api: KubeAPIServer, token_password: Callable[[str], None]
) -> None:
    host = token_registry.host
    kube_api.put_secret("team", "pull", dockerconfigjson({host: basic_auth(USER, PASSWORD)}))
    kc = kube_keychain(kube_api, tmp_path)
    try:
        chain = CredentialChain(DockerConfigKeychain(tmp_path / "absent.json"), None, kc)

        def rotate() -> None:
            kube_api.put_secret("team", "pull", dockerconfigjson({host: basic_auth(USER, ROTATED)}))
            wait_for(lambda: (c := kc(host, f"{host}/x:1")) is not None and c.password == ROTATED)

        _rotate_and_pull(token_registry, chain, rotate, token_password)
    finally:
        kc.stop()


# ----------------------------------------------------------------------------------------- the order rule


def test_docker_config_is_used_before_a_kubernetes_secret_and_wrong_ones_do_not_fall_through(
    token_registry: Registry, tmp_path: Path, kube_api: KubeAPIServer
) -> None:
    """Docker config and a secret both have credentials for the host: the Docker config ones are used.
    When they are wrong the pull fails, although the secret holds the right password (the seed's rule)."""
    ref, digest, layer = push_image(token_registry)
    host = token_registry.host
    kube_api.put_secret("team", "pull", dockerconfigjson({host: basic_auth(USER, PASSWORD)}))
    kc = kube_keychain(kube_api, tmp_path)
    try:
        cfg = docker_config(tmp_path / "config.json", host, USER, PASSWORD)
        chain = CredentialChain(DockerConfigKeychain(cfg), CriCredentialStore(), kc)
        with RegistryClient(chain, ref=ref, config=FAST) as client:
            pull(client, ref, digest, layer)
        assert chain.last_answer(host).source == "docker-config"  # type: ignore[union-attr]

        docker_config(tmp_path / "config.json", host, USER, "wrong-password")
        chain = CredentialChain(DockerConfigKeychain(cfg), CriCredentialStore(), kc)
        with RegistryClient(chain, ref=ref, config=FAST) as client, pytest.raises(Unauthenticated):
            pull(client, ref, digest, layer)
        stats = chain.statistics()
        assert stats["docker-config"] >= 1 and stats["kubernetes-secrets"] == 0
    finally:
        kc.stop()
