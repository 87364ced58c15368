"""The credential-helper protocol against real helper executables."""

from __future__ import annotations

import time

import pytest

from soci_fs.errors import InvalidArgument
from soci_grpc.keychain.helpers import (
    CredentialHelperError,
    CredentialHelperTimeout,
    HelperRunner,
    validate_helper_name,
)
from tests.harness.credhelpers import HelperDir, process_gone


@pytest.mark.parametrize("name", ["ecr-login", "gcloud", "pass", "osxkeychain", "desktop.exe", "a_b+c", "x1"])
def test_plain_names_are_accepted(name: str) -> None:
    assert validate_helper_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", "../x", "a/b", "a b", "a;b", "a|b", "$(x)", "`x`", "a\nb", "a&b", "é"]
)
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_helper_name(name)


def test_good_helper(helper_dir: HelperDir) -> None:
    helper_dir.good("good", {"reg.example": ("alice", "s3cret")})
    runner = HelperRunner(search_path=helper_dir.path)
    c = runner.get("good", "reg.example")
    assert c is not None and (c.username, c.password, c.source) == ("alice", "s3cret", "helper:good")
    assert helper_dir.calls("good") == ["reg.example"]  # server URL on stdin, no newline
    assert runner.statistics()["good"]["calls"] == 1


def test_token_username_means_identity_token(helper_dir: HelperDir) -> None:
    helper_dir.good("tok", {"reg.example": ("<token>", "refresh-xyz")})
    c = HelperRunner(search_path=helper_dir.path).get("tok", "reg.example")
    assert c is not None and c.identity_token == "refresh-xyz" and c.username == "" and c.password == ""


def test_not_found_means_no_credentials(helper_dir: HelperDir) -> None:
    helper_dir.good("good", {"reg.example": ("alice", "s3cret")})
    assert HelperRunner(search_path=helper_dir.path).get("good", "other.example") is None


def test_empty_answer_means_no_credentials(helper_dir: HelperDir) -> None:
    helper_dir.garbage("empty", '{"ServerURL": "r", "Username": "", "Secret": ""}')
    assert HelperRunner(search_path=helper_dir.path).get("empty", "r") is None


def test_missing_helper(helper_dir: HelperDir) -> None:
    with pytest.raises(CredentialHelperError, match="'docker-credential-absent' not found on PATH"):
        HelperRunner(search_path=helper_dir.path).get("absent", "reg.example")


@pytest.mark.parametrize(
    "output",
    [
        "not json at all SECRET-IN-OUTPUT",
        '["SECRET-IN-OUTPUT"]',
        '{"Username": 5, "Secret": "SECRET-IN-OUTPUT"}',
        '{"Username": "u", "Secret": "SECRET-IN-OUTPUT"',
    ],
)
def test_garbage_output(helper_dir: HelperDir, output: str) -> None:
    helper_dir.garbage("junk", output)
    with pytest.raises(CredentialHelperError) as err:
        HelperRunner(search_path=helper_dir.path).get("junk", "reg.example")
    assert "docker-credential-junk" in str(err.value) and "reg.example" in str(err.value)
    assert "SECRET-IN-OUTPUT" not in str(err.value)


def test_non_zero_exit_hides_output(helper_dir: HelperDir) -> None:
    helper_dir.failing("bad", status=3, stdout="token=SECRET-IN-OUTPUT", stderr="debug: SECRET-IN-STDERR")
    with pytest.raises(CredentialHelperError) as err:
        HelperRunner(search_path=helper_dir.path).get("bad", "reg.example")
    msg = str(err.value)
    assert "docker-credential-bad" in msg and "status 3" in msg
    assert "SECRET" not in msg


def test_timeout_kills_the_process_group(helper_dir: HelperDir) -> None:
    helper_dir.hanging("slow")
    runner = HelperRunner(search_path=helper_dir.path, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(CredentialHelperTimeout, match=r"docker-credential-slow.*no answer within 1 s"):
        runner.get("slow", "reg.example")
    assert time.monotonic() - started < 5
    helper_pid, grandchild_pid = helper_dir.hanging_pids("slow")
    deadline = time.monotonic() + 5
    while not (process_gone(helper_pid) and process_gone(grandchild_pid)):
        assert time.monotonic() < deadline, "helper or its child survived the timeout"
        time.sleep(0.02)
    assert runner.statistics()["slow"]["timeouts"] == 1


def test_rotating_answer_is_seen_on_the_next_call(helper_dir: HelperDir) -> None:
    helper_dir.rotating("rot", "u1", "first")
    runner = HelperRunner(search_path=helper_dir.path)
    assert runner.get("rot", "r").password == "first"  # type: ignore[union-attr]
    helper_dir.set_answer("rot", "u2", "second")
    c = runner.get("rot", "r")
    assert c is not None and (c.username, c.password) == ("u2", "second")


def test_helper_gets_home_when_unset(helper_dir: HelperDir) -> None:
    exe = helper_dir.dir / "docker-credential-home"
    helper_dir.good("home", {})
    body = exe.read_text().replace(
        'print("credentials not found',
        'print(json.dumps({"Username": os.environ.get("HOME", ""), "Secret": "s"}))\nsys.exit(0)\nprint("',
    )
    exe.write_text(body)
    c = HelperRunner(search_path=helper_dir.path, env={"PATH": "/usr/bin:/bin"}).get("home", "r")
    assert c is not None and c.username  # HOME was filled in


def test_timeout_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        HelperRunner(timeout=0)
