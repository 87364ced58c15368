"""Suite-wide secrets audit: every auth scenario end to end, with every log record and every output captured.

The module runs its own registries on loopback (htpasswd, and token auth with its own token server) whose
users have distinctive, random passwords, so a match cannot happen by accident. Scenarios: ``soci push``
with ``--user``, with a Docker config ``auths`` entry, with an identity token, with a credential helper;
``soci auth explain`` without and with ``--check``; wrong passwords; a token refresh (expiry and rotation) in
a long-lived client. Each runs in-process (a root-logger handler at DEBUG records every log record,
formatted, with exception text) and/or as the installed ``.venv/bin/soci`` with ``--debug`` (stdout and
stderr captured). The check then looks for: each password, each identity token, every token the token server
issued during the scenario (whole, and its signature), the base64 ``user:password`` blobs (padded and not),
and the ``Basic``/``Bearer`` ``Authorization`` values. ``test_the_check_catches_a_leak`` proves the check
fails when a secret does appear, in each kind of capture.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from soci_fs import index as si
from soci_fs.oci import Descriptor as OciDescriptor
from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_fs.registry.reference import HttpConfig, RegistryConfig
from soci_fs.store import TYPE_INDEX, ArtifactEntry, Store, now_rfc3339
from soci_grpc.keychain.chain import CredentialChain
from soci_grpc.keychain.docker_config import DockerConfigKeychain
from soci_grpc.keychain.helpers import HelperRunner
from tests.grpc.clihelp import Result, run, run_exe
from tests.harness.credhelpers import HelperDir
from tests.harness.registry import RawPusher, Registry
from tests.harness.token_server import TokenServer

pytestmark = pytest.mark.integration

_TAG = secrets.token_hex(6)
USER = "audit-user"
PASSWORD = f"AuditPw-{_TAG}-Zq7xKv"
CONFIG_PASSWORD = f"AuditCfgPw-{_TAG}-Wm3pLr"  # the same user, after a rotation done through the config
HELPER_PASSWORD = f"AuditHelperPw-{_TAG}-Tj8sNd"
WRONG_PASSWORD = f"AuditWrongPw-{_TAG}-Bx5cHy"
FAST = RegistryConfig(http=HttpConfig(max_retries=2, min_wait_msec=1, max_wait_msec=20))


# ---------------------------------------------------------------------------------------------------------
# The check


def secret_forms(user: str, secret: str) -> set[str]:
    """Every form in which ``secret`` could leak: plain, in ``user:secret`` base64 (padded or not), and as
    ``Basic`` header values."""
    blob = base64.b64encode(f"{user}:{secret}".encode()).decode()
    out = {secret, blob, blob.rstrip("="), "Basic " + blob, f"{user}:{secret}"}
    out.add(base64.b64encode(secret.encode()).decode().rstrip("="))
    return out


def token_forms(token: str) -> set[str]:
    """A bearer token, its ``Authorization`` value, and its signature segment (the part that is secret)."""
    out = {token, "Bearer " + token}
    parts = token.split(".")
    if len(parts) == 3 and len(parts[2]) >= 16:
        out.add(parts[2])
    return out


def find_leaks(captured: Iterable[tuple[str, str]], forbidden: Iterable[str]) -> list[str]:
    """(where, secret prefix) for every forbidden string found in any captured (where, text)."""
    needles = sorted({f for f in forbidden if f and len(f) >= 8})
    leaks = []
    for where, text in captured:
        for n in needles:
            if n in text:
                leaks.append(f"{where}: contains {n[:6]}…")
    return leaks


class _RecordAll(logging.Handler):
    """Keeps every record formatted as text: message, args, exception and stack, plus extra attributes."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)  # includes exc_text and stack_info when present
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS}
        self.texts.append(f"{text} {extra!r} {record.args!r}")


_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


@dataclass
class Capture:
    """Everything a scenario printed or logged."""

    handler: _RecordAll
    outputs: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, r: Result) -> Result:
        self.outputs.append((f"{what} stdout", r.text))
        self.outputs.append((f"{what} stderr", r.err))
        return r

    def all(self) -> list[tuple[str, str]]:
        return [*self.outputs, *((f"log record {i}", t) for i, t in enumerate(self.handler.texts))]


@dataclass
class World:
    """The module's own registries, token server and secrets."""

    basic: Registry
    token: Registry
    ts: TokenServer
    identity_token: str
    work: Path

    def forbidden(self) -> set[str]:
        out: set[str] = set()
        for pw in (PASSWORD, CONFIG_PASSWORD, HELPER_PASSWORD, WRONG_PASSWORD):
            out |= secret_forms(USER, pw)
        out |= secret_forms("<token>", self.identity_token) | secret_forms("", self.identity_token)
        with self.ts.state.lock:
            issued = [t["token"] for t in self.ts.state.issued]
        for tok in issued:
            out |= token_forms(tok)
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("audit")
    ts = TokenServer(work / "token").start()
    ts.set_password(USER, PASSWORD)
    basic = token = None
    try:
        basic = Registry(work / "basic", auth="htpasswd", users={USER: PASSWORD}).start()
        token = Registry(work / "tok", auth="token", token_server=ts).start()
        yield World(basic, token, ts, ts.issue_identity_token(USER), work)
    finally:
        for reg in (basic, token):
            if reg is not None:
                reg.stop()
        ts.stop()


@pytest.fixture
def capture(world: World) -> Iterator[Capture]:
    """Record every log record at DEBUG; at the end, fail if any secret appears in any capture."""
    handler = _RecordAll()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    world.ts.set_password(USER, PASSWORD)
    world.basic.set_password(USER, PASSWORD)
    cap = Capture(handler)
    try:
        yield cap
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    leaks = find_leaks(cap.all(), world.forbidden())
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
    assert handler.texts, "nothing was logged: the capture is not working"


_counter = iter(range(10_000))


def seeded_root(world: World, reg: Registry, root: Path) -> tuple[str, str]:
    """An image pushed to ``reg`` (with the harness's own raw pusher) and a v1 index for it recorded in the
    local store at ``root`` (a fake zTOC: push does not read zTOCs). Returns (ref, index digest)."""
    repo = f"audit/img{next(_counter)}"
    pusher = RawPusher(reg, USER, PASSWORD)
    img = pusher.push_image(repo, "v1", [secrets.token_bytes(2048)])
    mdoc = img["manifest_doc"]
    mbytes = json.dumps(mdoc).encode()
    layer = OciDescriptor(mdoc["layers"][0]["mediaType"], img["layers"][0], mdoc["layers"][0]["size"])
    ztoc = b"fake-ztoc-" + secrets.token_bytes(64)
    zdesc = si.ztoc_descriptor(si.sha256_digest(ztoc), len(ztoc), layer, 65536, False)
    subject = OciDescriptor("application/vnd.oci.image.manifest.v1+json", img["manifest"], len(mbytes))
    data = si.index_manifest([zdesc], version=1, subject=subject).marshal()
    with Store.open(root) as store:
        store.content.put(ztoc)
        store.content.put(si.EMPTY_CONFIG)
        digest = store.content.put(data)
        store.db.put(
            ArtifactEntry(
                digest=digest,
                size=len(data),
                location=img["manifest"],
                type=TYPE_INDEX,
                oci_digest=img["manifest"],
                image_digest=img["manifest"],
                platform="linux/amd64",
                media_type="application/vnd.oci.image.manifest.v1+json",
                artifact_type=si.ARTIFACT_TYPE_V1,
                created_at=now_rfc3339(),
            )
        )
    return f"{reg.host}/{repo}:v1", digest


def docker_config(dirpath: Path, doc: dict) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "config.json").write_text(json.dumps(doc))
    return dirpath


def auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def isolated_env(tmp: Path, **extra: str) -> dict[str, str]:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "DOCKER_CONFIG": str(tmp / "no-docker-config"), **extra}


@pytest.fixture(params=["htpasswd", "token"])
def reg(request: pytest.FixtureRequest, world: World) -> Registry:
    return world.basic if request.param == "htpasswd" else world.token


# ---------------------------------------------------------------------------------------------------------
# Scenarios


def test_push_with_user(world: World, reg: Registry, capture: Capture, tmp_path: Path) -> None:
    ref, index = seeded_root(world, reg, tmp_path / "root")
    r = capture.add(
        "in-process push", run("--root", tmp_path / "root", "push", "-u", f"{USER}:{PASSWORD}", ref)
    )
    assert r.rc == 0, r.err
    assert f"pushing soci index with digest: {index}" in r.text
    # The in-process run really logged its requests (and the token handshake) into the capture.
    assert any("soci_fs.registry.client" in t and "/manifests/" in t for t in capture.handler.texts)
    ref2, _ = seeded_root(world, reg, tmp_path / "root2")
    r = capture.add(
        "exe push --debug",
        run_exe(
            "--debug",
            "--root",
            tmp_path / "root2",
            "push",
            "--user",
            f"{USER}:{PASSWORD}",
            ref2,
            env=isolated_env(tmp_path),
        ),
    )
    assert r.rc == 0, r.err
    assert "level=DEBUG" in r.err  # the debug lines really were produced


def test_push_with_docker_config_and_identity_token(
    world: World, reg: Registry, capture: Capture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = docker_config(tmp_path / "dc", {"auths": {reg.host: auth_entry(USER, PASSWORD)}})
    ref, _ = seeded_root(world, reg, tmp_path / "root")
    r = capture.add(
        "exe push config",
        run_exe(
            "--debug",
            "--root",
            tmp_path / "root",
            "push",
            ref,
            env=isolated_env(tmp_path, DOCKER_CONFIG=str(cfg)),
        ),
    )
    assert r.rc == 0, r.err
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    ref, _ = seeded_root(world, reg, tmp_path / "root-in")
    r = capture.add("in-process push config", run("--root", tmp_path / "root-in", "push", ref))
    assert r.rc == 0, r.err
    if reg is world.token:
        cfg = docker_config(
            tmp_path / "dc-idt", {"auths": {reg.host: {"identitytoken": world.identity_token}}}
        )
        monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
        ref, _ = seeded_root(world, reg, tmp_path / "root-idt")
        before = world.ts.counts["refresh_token"]
        r = capture.add(
            "in-process push identity token", run("--debug", "--root", tmp_path / "root-idt", "push", ref)
        )
        assert r.rc == 0, r.err
        assert world.ts.counts["refresh_token"] > before


def test_push_with_credential_helper(world: World, reg: Registry, capture: Capture, tmp_path: Path) -> None:
    ref, _ = seeded_root(world, reg, tmp_path / "root")
    if reg is world.token:
        world.ts.set_password(USER, HELPER_PASSWORD)
    else:
        reg.set_password(USER, HELPER_PASSWORD)
        time.sleep(0.05)
    helpers = HelperDir(tmp_path / "bin")
    helpers.good("audit", {reg.host: (USER, HELPER_PASSWORD)})
    cfg = docker_config(tmp_path / "dc", {"credHelpers": {reg.host: "audit"}})
    env = isolated_env(tmp_path, DOCKER_CONFIG=str(cfg), PATH=f"{helpers.path}:/usr/bin:/bin")
    r = capture.add("exe push helper", run_exe("--debug", "--root", tmp_path / "root", "push", ref, env=env))
    assert r.rc == 0, r.err
    assert helpers.calls("audit") and set(helpers.calls("audit")) == {reg.host}
    r = capture.add(
        "exe explain --check helper",
        run_exe(
            "auth", "explain", ref, "--docker-config", cfg / "config.json", "--check", "--plain-http", env=env
        ),
    )
    assert r.rc == 0, r.err + r.text
    assert "helper:audit" in r.text


def test_explain_with_and_without_check(
    world: World, reg: Registry, capture: Capture, tmp_path: Path
) -> None:
    cfg = docker_config(tmp_path / "dc", {"auths": {reg.host: auth_entry(USER, PASSWORD)}})
    ref, _ = seeded_root(world, reg, tmp_path / "root")
    path = cfg / "config.json"
    r = capture.add("in-process explain", run("auth", "explain", ref, "--docker-config", path))
    assert r.rc == 0 and USER in r.text, r.err
    r = capture.add(
        "in-process explain --check", run("auth", "explain", ref, "--docker-config", path, "--check")
    )
    assert r.rc == 0 and "accepted" in r.text, r.text + r.err
    r = capture.add(
        "exe explain --check",
        run_exe(
            "--debug", "auth", "explain", ref, "--docker-config", path, "--check", env=isolated_env(tmp_path)
        ),
    )
    assert r.rc == 0, r.err


@pytest.mark.expect_log
def test_wrong_passwords(world: World, reg: Registry, capture: Capture, tmp_path: Path) -> None:
    ref, _ = seeded_root(world, reg, tmp_path / "root")
    r = capture.add(
        "in-process push wrong",
        run("--root", tmp_path / "root", "push", "-u", f"{USER}:{WRONG_PASSWORD}", ref),
    )
    assert r.rc == 4, r.err
    r = capture.add(
        "exe push wrong --debug",
        run_exe(
            "--debug",
            "--root",
            tmp_path / "root",
            "push",
            "-u",
            f"{USER}:{WRONG_PASSWORD}",
            ref,
            env=isolated_env(tmp_path),
        ),
    )
    assert r.rc == 4, r.err
    cfg = docker_config(tmp_path / "dc", {"auths": {reg.host: auth_entry(USER, WRONG_PASSWORD)}})
    r = capture.add(
        "in-process explain --check wrong",
        run("auth", "explain", ref, "--docker-config", cfg / "config.json", "--check"),
    )
    assert r.rc == 4, r.text + r.err
    r = capture.add(
        "exe push config wrong",
        run_exe(
            "--debug",
            "--root",
            tmp_path / "root",
            "push",
            ref,
            env=isolated_env(tmp_path, DOCKER_CONFIG=str(cfg)),
        ),
    )
    assert r.rc == 4, r.err


def test_token_refresh_and_rotation_in_a_long_lived_client(
    world: World, capture: Capture, tmp_path: Path
) -> None:
    """Expiry (the client's clock jumps) and rotation (new password in the config and on the server)."""
    ref, _ = seeded_root(world, world.token, tmp_path / "root")
    cfg = docker_config(tmp_path / "dc", {"auths": {world.token.host: auth_entry(USER, PASSWORD)}})
    chain = CredentialChain(DockerConfigKeychain(cfg / "config.json", env={}, helpers=HelperRunner()))
    now = [time.monotonic()]
    parsed = reference.parse(ref)
    world.ts.reset()
    with RegistryClient(chain, config=FAST, clock=lambda: now[0], ref=ref) as c:
        c.get_manifest(parsed)
        now[0] += 3600  # the token is past its expiry: a new one is fetched
        c.get_manifest(parsed)
        assert world.ts.total_token_requests() == 2
        world.ts.set_password(USER, CONFIG_PASSWORD)
        (cfg / "config.json").write_text(
            json.dumps({"auths": {world.token.host: auth_entry(USER, CONFIG_PASSWORD)}})
        )
        now[0] += 3600
        c.get_manifest(parsed)
        assert world.ts.total_token_requests() == 3
    with world.ts.state.lock:
        assert len(world.ts.state.issued) >= 3  # the tokens the check looks for really exist


# ---------------------------------------------------------------------------------------------------------
# The check itself


def test_the_check_catches_a_leak(world: World, tmp_path: Path) -> None:
    """A secret planted in a log record, in stdout, or in a subprocess's stderr is reported."""
    handler = _RecordAll()
    log = logging.getLogger("soci.audit.selftest")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        log.debug(
            "request with %s",
            {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
        )
        log.debug("harmless line")
    finally:
        root.removeHandler(handler)
    cap = Capture(handler)
    assert any("log record 0" in x for x in find_leaks(cap.all(), world.forbidden()))
    assert not find_leaks([("log record 1", handler.texts[1])], world.forbidden())

    token, _ = world.ts.make_token(USER, ["repository:x:pull"])
    cap2 = Capture(_RecordAll())
    cap2.add("fake stdout", Result(0, f"token was {token.split('.')[2]}".encode(), ""))
    cap2.add("fake stderr", Result(0, b"", "password: " + HELPER_PASSWORD))
    leaks = find_leaks(cap2.all(), world.forbidden())
    assert any(x.startswith("fake stdout stdout") for x in leaks)
    assert any(x.startswith("fake stderr stderr") for x in leaks)
    r = run_exe(
        "push", "--user", f"{USER}:{WRONG_PASSWORD}", "bad ref with spaces", env=isolated_env(tmp_path)
    )
    assert r.rc == 2
    # The reference error message does not repeat the password; a subprocess that did would be caught:
    assert find_leaks([("echo", f"echo {WRONG_PASSWORD}")], world.forbidden())
