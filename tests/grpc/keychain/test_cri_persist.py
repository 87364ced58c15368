"""``[cri_keychain] persist``: the CRI store's entries in a root-only file, across a store (daemon) restart.

Real files in a temp dir: the round trip, the file's mode and atomic replacement, expiry at load, and every
way a file is refused or found malformed (a WARNING naming the file and the cause, an empty store, never
an exception and never a secret in a log record). Then the real daemon: a CRI ``PullImage`` through its
proxy (to a stand-in backend image service), SIGTERM, start again, and ``soci auth explain`` (the installed
executable, asking the daemon) still shows the CRI credentials, with no password in its output or the log.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from soci_grpc import config as c
from soci_grpc._proto.cri import api_pb2
from soci_grpc.keychain.cri import AuthConfig, CredentialFile, CriCredentialStore
from soci_grpc.keychain.factory import build_chain
from tests.grpc.clihelp import SOCI_EXE

SECRET = "pers1st-S3cret"


def jwt(exp: int) -> str:
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': exp})}.sig"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def no_secret_logged(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    text = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    for s in (SECRET, *secrets):
        assert s not in text


def store(path: Path, *, ttl: float | None = None, clock: Clock | None = None) -> CriCredentialStore:
    return CriCredentialStore(ttl=ttl, clock=clock or Clock(), persist=CredentialFile(path))


def test_entries_survive_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "run" / "soci" / "cri-credentials.json"
    clock = Clock(1000.0)
    a = store(path, ttl=600, clock=clock)
    a.record("reg.example/app:1", AuthConfig(username="alice", password=SECRET))
    a.record("reg.example/tok:1", AuthConfig(identity_token="idt-" + SECRET))
    a.record("reg.example/anon:1", None)
    a.record("docker.io/library/busybox:latest", AuthConfig(username="bob", password="pw", server_address=""))

    # root-only: the directory made 0700, the file 0600, owned by us; no temp file left behind
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.geteuid())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert json.loads(path.read_text())["version"] == 1

    clock.now = 1100.0
    b = store(path, ttl=600, clock=clock)
    creds = b("reg.example", "reg.example/app:1")
    assert creds is not None and (creds.username, creds.password) == ("alice", SECRET)
    assert creds.source == "cri:reg.example/app:1" and creds.expires_at == 1600.0
    tok = b("reg.example", "reg.example/tok:1")
    assert tok is not None and tok.identity_token == "idt-" + SECRET
    assert b("reg.example", "reg.example/anon:1") is None
    assert "pulled without credentials" in " ".join(b.trace("reg.example", "reg.example/anon:1").steps)
    assert b("registry-1.docker.io", "busybox") is not None  # Docker Hub normalization kept
    assert b.statistics()["entries"] == 4
    assert any("4 persisted entries loaded (0 expired" in r.getMessage() for r in caplog.records)
    no_secret_logged(caplog)

    # remove rewrites the file without the entry
    assert b.remove("reg.example/app:1")
    c2 = store(path, ttl=600, clock=clock)
    assert c2("reg.example", "reg.example/app:1") is None and c2.statistics()["entries"] == 3


def test_newest_pull_order_continues_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    a = store(path)
    a.record("reg.example/app:1", AuthConfig(username="old", password="p1"))
    a.record("reg.example/app:2", AuthConfig(username="mid", password="p2"))
    b = store(path)
    b.record("reg.example/app:3", AuthConfig(username="new", password="p3"))
    # another tag of the repository: the newest pull wins, so the new sequence numbers follow the loaded ones
    creds = b("reg.example", "reg.example/app@sha256:" + "c" * 64)
    assert creds is not None and creds.username == "new"
    again = store(path)
    creds = again("reg.example", "reg.example/app:9")
    assert creds is not None and creds.username == "new"


def test_expired_entries_are_dropped_at_load(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    clock = Clock(1000.0)
    a = store(path, ttl=60, clock=clock)
    a.record("reg.example/short:1", AuthConfig(username="u", password="p"))  # expires at 1060
    clock.now = 1050.0
    a.record("reg.example/later:1", AuthConfig(username="u", password="p"))  # expires at 1110
    a.record("reg.example/jwt:1", AuthConfig(registry_token=jwt(1070)))  # JWT exp sooner than the TTL

    clock.now = 1065.0
    b = store(path, ttl=60, clock=clock)
    assert [str(e.ref) for e in b.entries()] == ["reg.example/later:1", "reg.example/jwt:1"]
    clock.now = 1080.0
    b = store(path, ttl=60, clock=clock)
    assert [str(e.ref) for e in b.entries()] == ["reg.example/later:1"]

    # a file written without a TTL: the TTL configured now applies to recorded_at
    path2 = tmp_path / "creds2.json"
    clock.now = 1000.0
    store(path2, clock=clock).record("reg.example/app:1", AuthConfig(username="u", password="p"))
    clock.now = 5000.0
    assert store(path2, clock=clock).entries() != ()
    assert store(path2, ttl=3600, clock=clock).entries() == ()


def test_concurrent_records_all_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    a = store(path)

    def pull(i: int) -> None:
        for j in range(10):
            a.record(f"reg.example/app{i}:{j}", AuthConfig(username=f"u{i}", password="p"))

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(path.read_text())["entries"]) == 80
    assert store(path).statistics()["entries"] == 80
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


GOOD_ENTRY = {
    "ref": {"host": "reg.example", "repository": "app", "tag": "1", "digest": ""},
    "server_host": "",
    "recorded_at": 1000.0,
    "seq": 1,
    "expires_at": None,
    "credentials": {"username": "u", "password": SECRET, "source": "cri:reg.example/app:1"},
}


def entry(**changes: object) -> dict:
    return {**GOOD_ENTRY, **changes}


MALFORMED = [
    (b'{"version": 1, "entries": [' + SECRET.encode(), "not JSON at line 1 column 28"),
    (b"\xff\xfe" + SECRET.encode(), "not JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"version": 2, "entries": []}).encode(), "unknown version 2"),
    (json.dumps({"entries": []}).encode(), "unknown version None"),
    (json.dumps({"version": 1, "entries": {}}).encode(), '"entries" is not a list'),
    (json.dumps({"version": 1, "entries": [SECRET]}).encode(), "entry 0 is not an object"),
    (json.dumps({"version": 1, "entries": [entry(ref=SECRET)]}).encode(), "entry 0: ref is not an object"),
    (
        json.dumps(
            {"version": 1, "entries": [entry(ref={**GOOD_ENTRY["ref"], "host": "Bad Host!"})]}
        ).encode(),
        "entry 0: ref is not a normalized image reference",
    ),
    (
        json.dumps({"version": 1, "entries": [GOOD_ENTRY, entry(seq=-1)]}).encode(),
        "entry 1: seq is not a non-negative integer",
    ),
    (
        json.dumps({"version": 1, "entries": [entry(recorded_at="yesterday")]}).encode(),
        "entry 0: recorded_at is not a time",
    ),
    (
        json.dumps({"version": 1, "entries": [entry(expires_at=True)]}).encode(),
        "entry 0: expires_at is not a time",
    ),
    (
        json.dumps({"version": 1, "entries": [entry(credentials={"password": 5})]}).encode(),
        "entry 0: credentials is not an object of strings",
    ),
    (
        json.dumps({"version": 1, "entries": [entry(credentials={"source": "x"})]}).encode(),
        "entry 0: credentials carry no way to authenticate",
    ),
    (
        json.dumps({"version": 1, "entries": [entry(server_host=None)]}).encode(),
        "server_host is not a string",
    ),
]


@pytest.mark.expect_log
@pytest.mark.parametrize(("content", "cause"), MALFORMED)
def test_malformed_file_warns_and_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, cause: str
) -> None:
    path = tmp_path / "creds.json"
    path.write_bytes(content)
    path.chmod(0o600)
    s = store(path)
    assert s.entries() == ()
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    msg = warning.getMessage()
    assert str(path) in msg and "malformed" in msg and cause in msg, msg
    no_secret_logged(caplog)
    # the next change replaces the file with a good one
    s.record("reg.example/new:1", AuthConfig(username="u", password="p"))
    assert [str(e.ref) for e in store(path).entries()] == ["reg.example/new:1"]


def good_file(path: Path) -> Path:
    path.write_text(json.dumps({"version": 1, "entries": [GOOD_ENTRY]}))
    path.chmod(0o600)
    return path


def test_a_good_file_written_by_hand_loads(tmp_path: Path) -> None:
    s = store(good_file(tmp_path / "creds.json"))
    creds = s("reg.example", "reg.example/app:1")
    assert creds is not None and creds.password == SECRET


@pytest.mark.expect_log
@pytest.mark.parametrize(
    ("spoil", "cause"),
    [
        (lambda p: p.chmod(0o644), "its mode is 0644; it must not be accessible to group or others"),
        (lambda p: p.chmod(0o640), "its mode is 0640"),
        (lambda p: p.chmod(0o602), "its mode is 0602"),
        (lambda p: os.chown(p, 65534, 65534), "it is owned by uid 65534, not by this daemon's uid"),
    ],
)
def test_file_with_wrong_owner_or_mode_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: object, cause: str
) -> None:
    if os.geteuid() != 0 and "owned" in cause:
        pytest.skip("chown needs root")
    path = good_file(tmp_path / "creds.json")
    spoil(path)  # type: ignore[operator]
    s = store(path)
    assert s.entries() == ()
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    msg = warning.getMessage()
    assert (
        msg.startswith(f"cri keychain: refusing to load persisted credentials from {path}: ") and cause in msg
    )
    no_secret_logged(caplog)
    s.record("reg.example/new:1", AuthConfig(username="u", password="p"))  # replaced by a proper file
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.geteuid())


@pytest.mark.expect_log
def test_symlink_and_non_files_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = good_file(tmp_path / "elsewhere.json")
    link = tmp_path / "creds.json"
    link.symlink_to(target)
    s = store(link)
    assert s.entries() == ()
    assert any("it is a symbolic link" in r.getMessage() for r in caplog.records)
    s.record("reg.example/new:1", AuthConfig(username="u", password="p"))
    assert not link.is_symlink() and json.loads(target.read_text())["entries"] == [GOOD_ENTRY]  # not followed

    d = tmp_path / "dir.json"
    d.mkdir()
    assert store(d).entries() == ()
    assert any("it is not a regular file" in r.getMessage() for r in caplog.records)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo, 0o600)
    assert store(fifo).entries() == ()  # never blocks on a FIFO
    no_secret_logged(caplog)


@pytest.mark.expect_log
def test_unwritable_location_warns_and_keeps_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = blocker / "creds.json"
    s = store(path)
    s.record("reg.example/app:1", AuthConfig(username="u", password=SECRET))
    assert s("reg.example", "reg.example/app:1") is not None  # still served from memory
    read, write = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert read == f"cri keychain: cannot read persisted credentials from {path}: Not a directory"
    assert write.startswith(f"cri keychain: cannot persist credentials to {path}: ")
    assert write.endswith("; they are kept in memory only")
    no_secret_logged(caplog)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


def test_config_and_factory(tmp_path: Path) -> None:
    cfg = c.parse("[cri_keychain]\nenable_keychain = true\npersist = true\n")
    assert cfg.cri_keychain.persist_path == c.DEFAULT_CRI_PERSIST_PATH
    assert cfg.keychain_settings().cri_persist_path == "/run/soci-snapshotter-grpc/cri-credentials.json"
    assert (
        c.parse("[cri_keychain]\npersist_path = ''\n").cri_keychain.persist_path == c.DEFAULT_CRI_PERSIST_PATH
    )
    with pytest.raises(c.ConfigError) as exc:
        c.parse("[cri_keychain]\npersist = true\npersist_path = 'relative/creds.json'\n")
    assert (exc.value.line, exc.value.key) == (3, "cri_keychain.persist_path")
    assert "not an absolute path" in str(exc.value)

    path = good_file(tmp_path / "creds.json")
    text = f"[cri_keychain]\nenable_keychain = true\npersist = true\npersist_path = '{path}'\n"
    with build_chain(c.parse(text)) as built:
        assert built.cri is not None
        creds = built.chain("reg.example", "reg.example/app:1")
        assert creds is not None and creds.password == SECRET
        built.cri.record("reg.example/two:1", AuthConfig(username="u2", password="p2"))
    assert len(json.loads(path.read_text())["entries"]) == 2
    # persist off: the file is neither read nor written
    text = f"[cri_keychain]\nenable_keychain = true\npersist_path = '{path}'\n"
    with build_chain(c.parse(text)) as built:
        assert built.cri is not None and built.cri.entries() == ()
        built.cri.record("reg.example/three:1", AuthConfig(username="u3", password="p3"))
    assert len(json.loads(path.read_text())["entries"]) == 2


# --------------------------------------------------------------------------------------------------------
# the daemon: PullImage through its CRI proxy, SIGTERM, start again, the credentials are still there


@pytest.fixture(scope="session")
def _grpc_stays_initialized() -> Iterator[None]:
    """An idle channel held to the end of the session: gRPC core then never shuts down in a background
    thread while this test forks (``soci auth explain``), which can hang in gRPC's prefork handler."""
    ch = grpc.insecure_channel("unix:///nonexistent/soci-test-keepalive.sock")
    try:
        yield
    finally:
        ch.close()


@pytest.fixture
def fake_image_service(tmp_path: Path, _grpc_stays_initialized: None) -> Iterator[str]:
    """A stand-in for containerd's CRI image service: ``PullImage`` answers an image id."""
    sock = str(tmp_path / "backend.sock")

    def pull(request: bytes, context: grpc.ServicerContext) -> bytes:
        req = api_pb2.PullImageRequest.FromString(request)
        return api_pb2.PullImageResponse(
            image_ref="sha256:" + "a" * 64 if req.image.image else ""
        ).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "runtime.v1.ImageService", {"PullImage": grpc.unary_unary_rpc_method_handler(pull)}
            ),
        )
    )
    server.add_insecure_port("unix:" + sock)
    server.start()
    try:
        yield sock
    finally:
        server.stop(None).wait()


def explain(sock: str, ref: str) -> str:
    p = subprocess.run(
        [str(SOCI_EXE), "auth", "explain", ref, "--snapshotter-address", sock],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p.stdout + p.stderr


@pytest.mark.integration
@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="the daemon needs root and /dev/fuse"
)
def test_daemon_keeps_cri_credentials_across_a_restart(tmp_path: Path, fake_image_service: str) -> None:
    from tests.integration.test_containerd_snapshots import Daemon
    from tests.integration.test_daemon_lazy import cri_pull

    persisted = tmp_path / "run" / "cri-credentials.json"
    config = (
        f"docker_config = '{tmp_path / 'no-docker-config.json'}'\n"
        "[cri_keychain]\nenable_keychain = true\npersist = true\n"
        f"image_service_path = '{fake_image_service}'\npersist_path = '{persisted}'\n"
    )
    ref = "127.0.0.1:5999/persist/app:1"
    workdir = tmp_path / "soci"
    d = Daemon(workdir).start(config=config)
    try:
        assert cri_pull(d.socket, ref, user="kubelet", password=SECRET) == "sha256:" + "a" * 64
        before = explain(d.socket, ref)
        assert "cri: user 'kubelet', password, from cri:127.0.0.1:5999/persist/app:1  <- picked" in before
        assert stat.S_IMODE(persisted.stat().st_mode) == 0o600
        assert d.stop() == 0  # SIGTERM
    finally:
        d.close()
    os.unlink(d.notify_path)
    d2 = Daemon(workdir).start(config=config)
    try:
        after = explain(d2.socket, ref)
        assert f"running soci-snapshotter-grpc (pid {d2.proc.pid if d2.proc else 0})" in after
        assert "cri: user 'kubelet', password, from cri:127.0.0.1:5999/persist/app:1  <- picked" in after
        assert SECRET not in before + after
        assert any("1 persisted entry loaded" in str(r["msg"]) for r in d2.logs())
    finally:
        d2.close()
    assert SECRET not in d2.log_path.read_text()
