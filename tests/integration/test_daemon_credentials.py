"""The daemon's own credentials, end to end: each source alone makes a lazy pull, and the order rule holds.

Real parts only: Debian's docker-registry (htpasswd, or token auth against the harness token server) behind
the recording :class:`~tests.harness.registry.FaultProxy`, our ``soci-snapshotter-grpc`` as containerd's
``soci`` snapshotter, containerd 1.6 with CRI, credential helpers as real executables on the daemon's PATH,
and Kubernetes secrets served by :class:`~tests.harness.kube_api.KubeAPIServer` through the real
``kubernetes`` client. containerd gets its own credentials for the manifest and config straight through its
CRI socket (or, in the CRI-proxy case, through ours), so a layer reported ``lazy`` by the debug service
proves that the daemon fetched it with credentials from the source under test. The metrics endpoint says
which source answered the daemon's lookups; the daemon's log never holds a password, auth blob or token.

The order rule (/work/shared/seed/registry-authentication.txt): the sources are asked in order (Docker
config, CRI, Kubernetes secrets) until one answers with non-empty credentials, and the next is *not* tried
when those are invalid. So wrong Docker-config credentials shadow right CRI and Kubernetes ones: the layer is
not served lazily (containerd unpacks it instead) and the debug status says the registry refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from soci_grpc import debug
from tests.grpc.clihelp import run_exe
from tests.harness.containerd import CONTAINERD_BIN, Containerd
from tests.harness.credhelpers import HelperDir
from tests.harness.kube_api import KubeAPIServer, basic_auth, dockerconfigjson
from tests.harness.registry import PASSWORD, USER, FaultProxy, Registry, free_port
from tests.harness.token_server import LEEWAY, TokenServer
from tests.integration.sociimg import Pushed, data_entries, docker_config
from tests.integration.test_containerd_snapshots import Daemon
from tests.integration.test_daemon_lazy import FAST, Rig, blob_bytes, cri_pull, lazy_image, scrape, total

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists(CONTAINERD_BIN), reason="needs root and containerd"
    ),
]

ROTATED = "r0tated-Passw0rd"
WRONG = "wr0ng-Passw0rd"
TOKEN_TTL = 3  # seconds a token is accepted in the rotation test (the token server's ttl)


class EnvDaemon(Daemon):
    """The daemon with extra environment variables (``PATH`` for credential helpers, ``DOCKER_CONFIG``).

    ``Daemon.start`` hands this process's environment to the child; the extra variables are set for the
    duration of that call only.
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(workdir)
        self.env = dict(env or {})

    def start(self, timeout: float = 20.0, config: str = "") -> Daemon:
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return super().start(timeout, config)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@dataclass
class CredRig(Rig):
    """A :class:`Rig` that also knows the daemon's metrics port."""

    metrics_port: int = 0

    def explain(self, ref: str) -> str:
        return str(debug.call(self.daemon.socket, "ExplainAuth", {"ref": ref})["text"])

    def source_hits(self) -> dict[str, float]:
        m = scrape(self.metrics_port)
        return {
            s: total(m, "soci_credential_source_hits_total", source=s)
            for s in ("docker-config", "cri", "kubernetes-secrets", "none")
        }


@pytest.fixture
def rig_factory(
    tmp_path: Path,
    fault_proxy: Callable[..., FaultProxy],
    containerd_factory: Callable[..., Containerd],
) -> Iterator[Callable[..., CredRig]]:
    daemons: list[Daemon] = []

    def make(
        registry: Registry,
        *,
        top: str = "",
        tables: str = "",
        cri_keychain: bool = False,
        env: dict[str, str] | None = None,
    ) -> CredRig:
        """``top``: top-level config keys; ``tables``: config tables; ``env``: extra daemon environment."""
        proxy = fault_proxy(registry)
        d = EnvDaemon(tmp_path / f"soci{len(daemons)}", env)
        ctrd_dir = tmp_path / f"containerd{len(daemons)}"
        ctrd_dir.mkdir()
        if cri_keychain:
            sock = ctrd_dir / "containerd.sock"
            tables += f'\n[cri_keychain]\nenable_keychain = true\nimage_service_path = "{sock}"\n'
        port = free_port()
        d.start(config=f'metrics_address = "127.0.0.1:{port}"\n' + top + FAST + tables)
        daemons.append(d)
        ctrd = containerd_factory(
            workdir=ctrd_dir, registries=[proxy.host], proxy_socket=d.socket, snapshotter="soci"
        )
        return CredRig(proxy, d, ctrd, port)

    try:
        yield make
    finally:
        for d in daemons:
            d.close()


@pytest.fixture
def kube_api() -> Iterator[KubeAPIServer]:
    server = KubeAPIServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token_settings(token_server: TokenServer) -> Iterator[TokenServer]:
    """The shared token server, given back with its password and token lifetime as they were."""
    with token_server.state.lock:
        ttl = token_server.state.ttl
    try:
        yield token_server
    finally:
        token_server.configure(ttl=ttl)
        token_server.set_password(USER, PASSWORD)


# ------------------------------------------------------------------------------------------------ helpers


def image_on(rig: CredRig, tmp_path: Path) -> Pushed:
    """The lazy test image (busybox, 3.2 MB of data, a small top layer) pushed behind ``rig.proxy``."""
    return lazy_image(rig.proxy.host, rig.proxy.upstream, tmp_path)


def file_digest(i: int) -> str:
    """sha256 (hex) of ``/data/f<i>.bin`` in the lazy test image."""
    entry = next(e for e in data_entries("data", 200, 16384) if e.name == f"data/f{i:04d}.bin")
    return hashlib.sha256(entry.data).hexdigest()


def ctr_run(rig: CredRig, ref: str, cid: str, script: str) -> subprocess.CompletedProcess[str]:
    """``ctr -n k8s.io run --rm --snapshotter soci REF cid /bin/sh -c script`` (CRI pulls are in k8s.io)."""
    return rig.run(ref, cid, "/bin/sh", "-c", script, check=False)


def assert_lazy(rig: CredRig, img: Pushed) -> dict[str, Any]:
    st = rig.image(img.manifest)
    assert st["state"] == "indexed", st
    assert [(x["digest"], x["mode"], x["reason"]) for x in st["layers"]] == [
        (d, "lazy", "") for d in img.layers
    ], st
    return st


def assert_runs(rig: CredRig, img: Pushed, cid: str, i: int = 100) -> None:
    """A container on the image prints the top layer's file and the right digest of a data file."""
    run = ctr_run(rig, img.ref, cid, f"cat /etc/top.txt; sha256sum /data/f{i:04d}.bin")
    assert run.returncode == 0, (run.stdout, run.stderr, rig.status())
    assert run.stdout.startswith("top layer\n") and file_digest(i) in run.stdout, run.stdout


def assert_no_secrets(rig: CredRig, *passwords: str, token_server: TokenServer | None = None) -> None:
    """No password, ``user:password`` auth blob or issued token in the daemon's log."""
    text = rig.daemon.log_path.read_text(errors="replace")
    assert text, "the daemon wrote no log"
    for pw in passwords:
        assert pw not in text
        assert base64.b64encode(f"{USER}:{pw}".encode()).decode() not in text
    if token_server is not None:
        with token_server.state.lock:
            tokens = [t["token"] for t in token_server.state.issued]
        assert tokens, "the token server issued no token"
        for tok in tokens:
            assert tok not in text and tok.split(".")[2] not in text


def slots(text: str) -> list[str]:
    """The numbered source lines of an explanation (``1. docker-config: ...``), stripped."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line[:3] in ("1. ", "2. ", "3. ")]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached in time: {what}"
        time.sleep(0.05)


def helper_config(path: Path, host: str, helper: str, how: str) -> Path:
    """A Docker config.json that sends ``host`` to ``docker-credential-<helper>`` (``credHelpers`` or
    ``credsStore``), with a decoy ``auths`` entry the helper must win over."""
    decoy = base64.b64encode(f"{USER}:{WRONG}".encode()).decode()
    doc: dict[str, Any] = {"auths": {host: {"auth": decoy}}}
    doc["credHelpers" if how == "credHelpers" else "credsStore"] = (
        {host: helper} if how == "credHelpers" else helper
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------------------------------------ each source alone is lazy


def test_docker_config_auths_with_a_token_registry(
    rig_factory: Callable[..., CredRig], token_registry: Registry, token_settings: TokenServer, tmp_path: Path
) -> None:
    """Plain ``auths`` (``docker_config = PATH``), no CRI keychain: the daemon's token fetches use them."""
    token_settings.reset()
    cfg = tmp_path / "docker" / "config.json"
    rig = rig_factory(token_registry, top=f'docker_config = "{cfg}"\n')
    docker_config(cfg, rig.proxy.host)
    img = image_on(rig, tmp_path)
    cri_pull(rig.containerd.address, img.ref)  # containerd's own credentials, straight to its CRI
    assert_lazy(rig, img)
    assert_runs(rig, img, "dc-token")
    assert blob_bytes(rig.proxy, img.layers[1]) < img.layer_sizes[1] // 5
    hits = rig.source_hits()
    assert hits["docker-config"] > 0 and hits["cri"] == hits["kubernetes-secrets"] == 0, hits
    assert_no_secrets(rig, PASSWORD, token_server=token_settings)


@pytest.mark.parametrize(
    ("how", "registry_kind"),
    [("credHelpers", "htpasswd"), ("credsStore", "token")],
    ids=["credHelpers", "credsStore"],
)
def test_docker_config_credential_helper(
    rig_factory: Callable[..., CredRig],
    request: pytest.FixtureRequest,
    how: str,
    registry_kind: str,
    tmp_path: Path,
) -> None:
    """The Docker config names a helper; the daemon runs the real executable found on its PATH."""
    registry: Registry = request.getfixturevalue(f"{registry_kind}_registry")
    helpers = HelperDir(tmp_path / "bin")
    cfg = tmp_path / "docker" / "config.json"
    env = {"PATH": f"{helpers.path}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    rig = rig_factory(registry, top=f'docker_config = "{cfg}"\n', env=env)
    helpers.good("soci-e2e", {rig.proxy.host: (USER, PASSWORD)})
    helper_config(cfg, rig.proxy.host, "soci-e2e", how)
    img = image_on(rig, tmp_path)
    cri_pull(rig.containerd.address, img.ref)
    assert_lazy(rig, img)
    assert_runs(rig, img, f"helper-{registry_kind}")
    assert rig.proxy.host in helpers.calls("soci-e2e"), helpers.calls("soci-e2e")
    hits = rig.source_hits()
    assert hits["docker-config"] > 0 and hits["none"] == 0, hits
    text = rig.explain(img.ref)
    assert "credential helper 'soci-e2e'" in text and "<- picked" in text, text
    ts = registry.token_server if registry_kind == "token" else None
    assert_no_secrets(rig, PASSWORD, WRONG, token_server=ts)


def test_cri_credentials_through_the_proxy_only(
    rig_factory: Callable[..., CredRig], token_registry: Registry, token_settings: TokenServer, tmp_path: Path
) -> None:
    """No Docker config on the host (``DOCKER_CONFIG`` is an empty directory): the credentials the kubelet
    passes in ``PullImage`` through our proxy are the daemon's only source."""
    token_settings.reset()
    empty = tmp_path / "empty-docker"
    empty.mkdir()
    rig = rig_factory(token_registry, cri_keychain=True, env={"DOCKER_CONFIG": str(empty)})
    img = image_on(rig, tmp_path)
    cri_pull(rig.daemon.socket, img.ref)  # through our CRI proxy: recorded, then forwarded to containerd
    assert_lazy(rig, img)
    assert_runs(rig, img, "cri-only")
    assert blob_bytes(rig.proxy, img.layers[1]) < img.layer_sizes[1] // 5
    hits = rig.source_hits()
    assert hits["cri"] > 0 and hits["docker-config"] == hits["kubernetes-secrets"] == 0, hits
    text = rig.explain(img.ref)
    assert f"file {empty / 'config.json'} does not exist" in text, text
    picked = [s for s in slots(text) if s.endswith("<- picked")]
    assert len(picked) == 1 and picked[0].startswith(f"2. cri: user '{USER}', password"), text
    assert_no_secrets(rig, PASSWORD, token_server=token_settings)


def test_kubernetes_secret_only_and_rotation_after_the_token_expired(
    kube_api: KubeAPIServer,
    rig_factory: Callable[..., CredRig],
    token_registry: Registry,
    token_settings: TokenServer,
    tmp_path: Path,
) -> None:
    """Only a ``dockerconfigjson`` secret gives the daemon credentials; after the password is rotated in the
    registry and in the secret, and every token issued for the old password has expired, reads of spans
    not fetched yet still work (the watch delivered the new secret, the daemon asks the chain again)."""
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    tables = f'\n[kubeconfig_keychain]\nenable_keychain = true\nkubeconfig_path = "{kubeconfig}"\n'
    rig = rig_factory(token_registry, top=f'docker_config = "{tmp_path / "absent.json"}"\n', tables=tables)
    host = rig.proxy.host
    kube_api.put_secret("team", "pull", dockerconfigjson({host: basic_auth(USER, PASSWORD)}))
    img = image_on(rig, tmp_path)
    wait_for(lambda: f"auths entry '{host}'" in rig.explain(img.ref), "the daemon synced the secret")
    token_settings.reset()
    token_settings.configure(ttl=TOKEN_TTL)  # from now on (the push is done) tokens live TOKEN_TTL seconds

    cri_pull(rig.containerd.address, img.ref)  # containerd's credentials go to containerd only
    assert_lazy(rig, img)
    assert_runs(rig, img, "kube1", i=100)
    hits = rig.source_hits()
    assert hits["kubernetes-secrets"] > 0 and hits["docker-config"] == hits["cri"] == 0, hits

    # rotation: the registry takes only the new password, the secret is updated in place (same name); the
    # new version spells its key as a URL so the daemon's explanation shows which version it holds
    token_settings.set_password(USER, ROTATED)
    kube_api.put_secret("team", "pull", dockerconfigjson({f"http://{host}": basic_auth(USER, ROTATED)}))
    wait_for(lambda: f"auths entry 'http://{host}'" in rig.explain(img.ref), "the watch delivered the update")
    with token_settings.state.lock:
        last_exp = max(t["exp"] for t in token_settings.state.issued)
    while time.time() <= last_exp + LEEWAY + 1:  # every token issued so far is refused by the registry now
        time.sleep(0.2)
    before = token_settings.counts
    fetched = blob_bytes(rig.proxy, img.layers[1])
    assert_runs(rig, img, "kube2", i=180)  # spans of f0180 were not fetched before
    after = token_settings.counts
    assert blob_bytes(rig.proxy, img.layers[1]) > fetched  # this read went to the registry
    assert after["password"] > before["password"], (before, after)  # a fresh token, with the new password
    assert after["denied"] == before["denied"], (before, after)  # the old password was never tried again
    assert {x["mode"] for x in rig.image(img.manifest)["layers"]} == {"lazy"}
    assert_no_secrets(rig, PASSWORD, ROTATED, token_server=token_settings)


# ---------------------------------------------------------------------------------------- the order rule


def test_wrong_docker_config_credentials_win_and_do_not_fall_through(
    kube_api: KubeAPIServer,
    rig_factory: Callable[..., CredRig],
    htpasswd_registry: Registry,
    tmp_path: Path,
) -> None:
    """All three sources have an entry for the registry: the Docker config's (wrong), the CRI pull's and the
    Kubernetes secret's (both right). The seed: the first source with non-empty credentials is used and
    the next is not tried when they are invalid. So the daemon cannot serve the image lazily; it leaves the
    layers to containerd (which has right credentials) and says the registry refused."""
    cfg = docker_config(tmp_path / "docker" / "config.json", "placeholder.invalid")
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    tables = f'\n[kubeconfig_keychain]\nenable_keychain = true\nkubeconfig_path = "{kubeconfig}"\n'
    rig = rig_factory(htpasswd_registry, top=f'docker_config = "{cfg}"\n', tables=tables, cri_keychain=True)
    host = rig.proxy.host
    docker_config(cfg, host, USER, WRONG)
    kube_api.put_secret("team", "pull", dockerconfigjson({host: basic_auth(USER, PASSWORD)}))
    img = image_on(rig, tmp_path)
    wait_for(lambda: "secret team/pull" in rig.explain(img.ref), "the daemon synced the secret")

    cri_pull(rig.daemon.socket, img.ref)  # right credentials, recorded by our proxy, and containerd pulls
    st = rig.image(img.manifest)
    assert st["state"] == "error" and "401" in st["detail"], st
    assert [(x["digest"], x["mode"], x["reason"]) for x in st["layers"]] == [
        (d, "deferred", "resolve_failed") for d in img.layers
    ], st
    for layer in st["layers"]:
        assert "unauthorized" in layer["detail"] and host in layer["detail"], layer
    hits = rig.source_hits()
    assert hits["docker-config"] > 0 and hits["cri"] == hits["kubernetes-secrets"] == 0, hits

    # containerd unpacked the layers itself (whole-blob GETs), so the container still runs
    assert blob_bytes(rig.proxy, img.layers[1]) >= 1 << 40
    assert_runs(rig, img, "order1")

    # the CLI shows the daemon's chain: the three sources in order, Docker config picked, no secret
    r = run_exe("auth", "explain", img.ref, "--snapshotter-address", rig.daemon.socket)
    assert r.rc == 0, r.err
    out = r.text
    assert "evaluated by the running soci-snapshotter-grpc" in out, out
    chain = slots(out)
    assert [s.split(":")[0] for s in chain] == ["1. docker-config", "2. cri", "3. kubernetes-secrets"], out
    assert chain[0].startswith(f"1. docker-config: user '{USER}', password, from docker-config:{cfg}"), out
    assert chain[0].endswith("<- picked") and not any(s.endswith("<- picked") for s in chain[1:]), out
    assert chain[1].startswith(f"2. cri: user '{USER}', password"), out
    assert chain[2].startswith(f"3. kubernetes-secrets: user '{USER}', password, from secret:team/pull"), out
    assert "does not fall through" in out, out
    for secret in (PASSWORD, WRONG):
        assert secret not in out and secret not in r.err
        assert base64.b64encode(f"{USER}:{secret}".encode()).decode() not in out
    assert_no_secrets(rig, PASSWORD, WRONG)
