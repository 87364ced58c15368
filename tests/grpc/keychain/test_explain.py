"""``soci auth explain`` and the explain report; no secret reaches logs or CLI output."""

from __future__ import annotations

import argparse
import base64
import json
import logging
from pathlib import Path

import pytest

from soci_fs.registry.credentials import Credentials
from soci_grpc.cli import cmd_auth
from soci_grpc.cli.common import EXIT_UNAUTHENTICATED, EXIT_USAGE, run_handler
from soci_grpc.keychain.chain import CredentialChain
from soci_grpc.keychain.cri import AuthConfig, CriCredentialStore
from soci_grpc.keychain.docker_config import DockerConfigKeychain
from soci_grpc.keychain.explain import describe_credentials, explain, render
from soci_grpc.keychain.helpers import HelperRunner
from tests.grpc.keychain.conftest import write_config
from tests.harness.credhelpers import HelperDir
from tests.harness.kube_api import KubeAPIServer, basic_auth, dockerconfigjson
from tests.harness.registry import PASSWORD, USER, Registry

# Every secret used below; none may appear in logs or output.
SECRETS = {
    "file": "FILE-PASSWORD-111",
    "helper": "HELPER-SECRET-222",
    "token": "IDENTITY-TOKEN-333",
    "k8s": "K8S-PASSWORD-444",
    "cri": "CRI-PASSWORD-555",
    "bad": "BAD-AUTH-666",
    "junk": "JUNK-OUTPUT-777",
}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def forbidden() -> list[str]:
    out = list(SECRETS.values())
    out += [b64(f"{u}:{p}") for u in ("alice", "bob", "kate", "user") for p in SECRETS.values()]
    return out


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soci")
    sub = parser.add_subparsers()
    cmd_auth.register(sub)
    args = parser.parse_args(argv)
    return run_handler(args.func, args)


def test_describe_credentials() -> None:
    assert describe_credentials(None) == "no credentials"
    c = Credentials(username="u", password="pw", source="docker-config:/x", expires_at=1000.0)
    text = describe_credentials(c, now=900.0)
    assert text == "user 'u', password, from docker-config:/x, expires 1970-01-01T00:16:40Z (in 100 s)"
    assert "expired" in describe_credentials(c, now=2000.0)
    assert "pw" not in text
    assert describe_credentials(Credentials(identity_token="t")) == "no user name, identity token"


def test_report_shows_every_source_and_the_pick(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "config.json", {"auths": {"reg.example": {"auth": b64("alice:" + SECRETS["file"])}}}
    )
    cri = CriCredentialStore()
    cri.record("reg.example/app:1", AuthConfig(username="carl", password=SECRETS["cri"]))
    chain = CredentialChain(DockerConfigKeychain(cfg), cri, None)
    report = explain(chain, "reg.example", "reg.example/app:1")
    assert [s.name for s in report.sources] == ["docker-config", "cri", "kubernetes-secrets"]
    assert report.picked == "docker-config"
    text = render(report)
    assert "1. docker-config: user 'alice', password" in text and "<- picked" in text
    assert "2. cri: user 'carl'" in text  # shadowed, still shown
    assert "3. kubernetes-secrets: not evaluated (disabled)" in text
    assert "does not fall through" in text
    for s in forbidden():
        assert s not in text


def test_cli_explain_with_all_local_sources(
    tmp_path: Path,
    helper_dir: HelperDir,
    kube_api: KubeAPIServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    helper_dir.good("vault", {"helped.example": ("bob", SECRETS["helper"])})
    monkeypatch.setenv("PATH", helper_dir.path + ":" + __import__("os").environ["PATH"])
    cfg = write_config(
        tmp_path / "config.json",
        {
            "auths": {"reg.example": {"auth": b64("alice:" + SECRETS["file"])}},
            "credHelpers": {"helped.example": "vault"},
        },
    )
    kube_api.put_secret("ns", "pull", dockerconfigjson({"k8s.example": basic_auth("kate", SECRETS["k8s"])}))
    kc = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    common = ["--docker-config", str(cfg), "--kubeconfig", str(kc)]

    assert run_cli(["auth", "explain", "k8s.example/team/app:1", *common]) == 0
    out = capsys.readouterr().out
    assert "not by the running daemon" in out
    assert "registry host: k8s.example" in out
    assert "1. docker-config: no credentials" in out
    assert "2. cri: not evaluated (lives in the daemon's memory" in out
    assert "3. kubernetes-secrets: user 'kate', password, from secret:ns/pull  <- picked" in out
    assert (
        "kubernetes-secrets is the first source in order with non-empty credentials after docker-config"
        in out
    )

    assert run_cli(["auth", "explain", "helped.example/x", *common]) == 0
    out = capsys.readouterr().out
    assert "1. docker-config: user 'bob', password, from helper:vault  <- picked" in out
    assert "credential helper 'vault'" in out

    assert run_cli(["auth", "explain", "nginx", "--docker-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "reference: docker.io/library/nginx:latest" in out and "registry host: registry-1.docker.io" in out
    assert "3. kubernetes-secrets: not evaluated (disabled; give" in out
    assert "no source has credentials" in out
    for s in forbidden():
        assert s not in out


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["auth", "explain", "Bad/Ref"]) == EXIT_USAGE
    assert "bad path component" in capsys.readouterr().err
    bad = write_config(tmp_path / "config.json", {"auths": {"reg.example": {"auth": SECRETS["bad"]}}})
    assert run_cli(["auth", "explain", "reg.example/x", "--docker-config", str(bad)]) == 0
    out = capsys.readouterr().out
    assert "1. docker-config: ERROR: docker config" in out and "not standard base64" in out
    assert "the chain stops at docker-config" in out
    assert SECRETS["bad"] not in out
    assert run_cli(["auth"]) == 2


@pytest.mark.expect_log
def test_no_secret_in_any_log_record_or_output(
    tmp_path: Path,
    helper_dir: HelperDir,
    kube_api: KubeAPIServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run every scenario with DEBUG logging everywhere; no password, token or auth blob may show up."""
    caplog.set_level(logging.DEBUG)
    helper_dir.good("vault", {"helped.example": ("bob", SECRETS["helper"])})
    helper_dir.good("tok", {"tok.example": ("<token>", SECRETS["token"])})
    helper_dir.garbage("junk", "garbage " + SECRETS["junk"])
    helper_dir.failing("fail", stdout=SECRETS["junk"], stderr=SECRETS["junk"])
    monkeypatch.setenv("PATH", helper_dir.path + ":" + __import__("os").environ["PATH"])
    cfg = write_config(
        tmp_path / "config.json",
        {
            "auths": {"reg.example": {"auth": b64("alice:" + SECRETS["file"])}},
            "credHelpers": {
                "helped.example": "vault",
                "tok.example": "tok",
                "junk.example": "junk",
                "fail.example": "fail",
            },
        },
    )
    kube_api.put_secret("ns", "good", dockerconfigjson({"k8s.example": basic_auth("kate", SECRETS["k8s"])}))
    kube_api.put_secret("ns", "bad", dockerconfigjson({"k8s.example": {"auth": SECRETS["bad"]}}))
    kube_api.put_secret("ns", "junk", f"{{{b64('user:' + SECRETS['bad'])}".encode())
    kc = kube_api.write_kubeconfig(tmp_path / "kubeconfig")

    for ref in (
        "reg.example/a",
        "helped.example/a",
        "tok.example/a",
        "junk.example/a",
        "fail.example/a",
        "k8s.example/a",
        "none.example/a",
    ):
        run_cli(
            [
                "auth",
                "explain",
                ref,
                "--docker-config",
                str(cfg),
                "--kubeconfig",
                str(kc),
                "--helper-timeout",
                "5",
            ]
        )

    # The chain itself, with debug logging of each answer.
    cri = CriCredentialStore()
    cri.record("cri.example/a:1", AuthConfig(auth=b64("user:" + SECRETS["cri"])))
    chain = CredentialChain(DockerConfigKeychain(cfg, helpers=HelperRunner()), cri, None)
    for host in ("reg.example", "helped.example", "tok.example", "cri.example"):
        chain(host, f"{host}/a:1")
    for host in ("junk.example", "fail.example"):
        with pytest.raises(Exception) as err:
            chain(host, f"{host}/a:1")
        for s in forbidden():
            assert s not in str(err.value)
    broken = write_config(tmp_path / "broken.json", json.dumps({"auths": {"r": {"auth": SECRETS["bad"]}}}))
    with pytest.raises(Exception) as err:
        DockerConfigKeychain(broken)("r", "")
    assert SECRETS["bad"] not in str(err.value)

    captured = capsys.readouterr()
    texts = [captured.out, captured.err, caplog.text] + [str(r.args) + r.getMessage() for r in caplog.records]
    assert "user 'kate'" in captured.out and "identity token" in captured.out  # the scenarios did run
    for text in texts:
        for s in forbidden():
            assert s not in text, f"secret leaked: {s[:8]}..."


def test_cli_check_against_a_real_registry(
    tmp_path: Path,
    htpasswd_registry: Registry,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = htpasswd_registry.host
    good = write_config(tmp_path / "good.json", {"auths": {host: {"auth": b64(f"{USER}:{PASSWORD}")}}})
    bad = write_config(tmp_path / "bad.json", {"auths": {host: {"auth": b64(f"{USER}:" + SECRETS["bad"])}}})
    ref = f"{host}/keychain-check/app:1"

    assert run_cli(["auth", "explain", ref, "--docker-config", str(good), "--check"]) == 0
    out = capsys.readouterr().out
    assert "check: the registry accepted the request" in out
    assert "check: credentials used: docker-config" in out

    assert run_cli(["auth", "explain", ref, "--docker-config", str(bad), "--check"]) == EXIT_UNAUTHENTICATED
    captured = capsys.readouterr()
    assert "check: the registry refused" in captured.out
    for text in (captured.out, captured.err, caplog.text):
        assert PASSWORD not in text and SECRETS["bad"] not in text
        assert b64(f"{USER}:{PASSWORD}") not in text
