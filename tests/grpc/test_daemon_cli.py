"""The ``soci-snapshotter-grpc`` command line: through the installed executable, plus in-process checks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from soci_grpc import config as c
from soci_grpc.cli import daemon

REPO = Path(__file__).resolve().parents[2]
EXE = REPO / ".venv" / "bin" / "soci-snapshotter-grpc"
ENV_KEYS = (
    "SOCI_SNAPSHOTTER_ADDRESS",
    "SOCI_SNAPSHOTTER_CONFIG",
    "SOCI_SNAPSHOTTER_LOG_LEVEL",
    "SOCI_SNAPSHOTTER_ROOT",
)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def logs(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.err.splitlines() if line.startswith("{")]


def run(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> Result:
    base = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    p = subprocess.run(
        [str(EXE), *map(str, argv)],
        capture_output=True,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
        text=True,
    )
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text("debug = true\n\n[http]\nMaxRetries = 'eight'\n")
    return p


def test_config_default() -> None:
    r = run("config", "default")
    assert (r.rc, r.err) == (0, "")
    assert r.out == c.default_toml()
    assert c.parse(r.out) == c.Config()


def test_config_dump_prints_the_effective_config(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text(
        "max_concurrency = 0\n[http]\nmaxretries = 3\n[blob]\ncheck_always = true\n"
        "[[resolver.host.'docker.io'.mirrors]]\nhost = 'mirror.example'\n"
    )
    r = run("config", "dump", "--config", p)
    assert (r.rc, r.err) == (0, "")
    assert r.out == c.dump(c.load(p))
    assert "max_concurrency = 100\n" in r.out and "  MaxRetries = 3\n" in r.out
    assert "  max_retries = 3\n  min_wait_msec = 30\n" in r.out and "  valid_interval = 0\n" in r.out
    assert c.parse(r.out) == c.load(p)


def test_global_flags_before_or_after_the_subcommand_and_from_the_environment(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text("debug = true\n")
    for argv, env in [
        (("--config", p, "config", "dump"), None),
        (("config", "--config", p, "dump"), None),
        (("config", "dump", f"--config={p}"), None),
        (("config", "dump"), {"SOCI_SNAPSHOTTER_CONFIG": str(p)}),
        (("--config", "/nonexistent", "config", "dump", "--config", p), None),  # the later value wins
    ]:
        r = run(*argv, env=env)
        assert (r.rc, r.err) == (0, ""), argv
        assert "debug = true\n" in r.out, argv


def test_default_config_path_missing_means_defaults() -> None:
    if Path(c.DEFAULT_CONFIG_PATH).exists():
        pytest.skip(f"{c.DEFAULT_CONFIG_PATH} exists on this machine")
    r = run("config", "dump")
    assert (r.rc, r.out, r.err) == (0, c.default_toml(), "")


def test_bad_file_exits_1_naming_file_line_and_key(bad_file: Path) -> None:
    r = run("config", "dump", "--config", bad_file)
    assert (r.rc, r.out) == (1, "")
    assert r.err == (
        f'soci-snapshotter-grpc: config file at "{bad_file}": failed to parse config: line 4: '
        "http.MaxRetries: expected an integer, got a string\n"
    )
    assert "Traceback" not in r.err


def test_malformed_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[fuse]\nattr_timeout = = 1\n")
    r = run("config", "dump", "--config", p)
    assert r.rc == 1 and r.out == ""
    assert r.err.startswith(f'soci-snapshotter-grpc: failed to load config file "{p}": line 2, column ')
    assert "(key fuse.attr_timeout)" in r.err and "Traceback" not in r.err


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    r = run("--config", tmp_path / "nope.toml", "config", "dump")
    assert r.rc == 1
    missing = tmp_path / "nope.toml"
    assert (
        r.err == f'soci-snapshotter-grpc: failed to open config file "{missing}": No such file or directory\n'
    )


def test_unknown_keys_are_logged_as_json_warnings(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text("debug = true\nsurprise = 1\n")
    r = run("config", "dump", "--config", p)
    assert r.rc == 0 and "debug = true" in r.out
    (entry,) = r.logs()
    assert list(entry) == sorted(entry)
    assert entry["level"] == "warning"
    assert entry["msg"] == f"config file {p}, line 2: unknown key surprise ignored"
    assert str(entry["time"]).count(".") == 1 and len(str(entry["time"]).split(".")[1].rstrip("Z")) >= 9
    quiet = run("config", "dump", "--config", p, "--log-level", "error")
    assert (quiet.rc, quiet.err) == (0, "")


@pytest.mark.parametrize(
    "level", ["warning", "WARN", "Warning", "info", "DEBUG", "trace", "error", "fatal", "panic"]
)
def test_log_levels_case_insensitive(level: str) -> None:
    r = run("--log-level", level, "config", "default")
    assert (r.rc, r.err) == (0, "")
    r = run("config", "default", env={"SOCI_SNAPSHOTTER_LOG_LEVEL": level})
    assert (r.rc, r.err) == (0, "")


@pytest.mark.parametrize("args", [("--log-level", "loud"), ("--log-level", "")])
def test_bad_log_level(args: tuple[str, str]) -> None:
    r = run(*args, "config", "default")
    assert r.rc == 1 and r.out == ""
    assert r.err.startswith(
        f'soci-snapshotter-grpc: failed to prepare logger: not a valid log level: "{args[1]}"'
    )
    r = run("config", "default", env={"SOCI_SNAPSHOTTER_LOG_LEVEL": "loud"})
    assert r.rc == 1 and "failed to prepare logger" in r.err


def test_serving_checks_the_config_and_address_first(tmp_path: Path, bad_file: Path) -> None:
    # serving itself is tested end to end in tests/integration/test_containerd_snapshots.py, fd:// in
    # tests/packaging/test_sockact.py
    good = tmp_path / "good.toml"
    good.write_text("")
    r = run("--config", good, "--root", tmp_path / "root", "--address", "unix://")
    assert r.rc == 1
    assert r.err.endswith("soci-snapshotter-grpc: address 'unix://': no socket path\n")
    assert r.logs()[0]["msg"] == "starting soci-snapshotter-grpc" and r.logs()[0]["level"] == "info"
    r = run("--config", bad_file, "--root", tmp_path / "root", "--address", tmp_path / "s.sock")
    assert r.rc == 1 and "http.MaxRetries" in r.err and not (tmp_path / "root").exists()


def test_usage_errors_and_help() -> None:
    r = run("--no-such-flag")
    assert r.rc == 1 and "soci-snapshotter-grpc: unrecognized arguments: --no-such-flag" in r.err
    r = run("config")
    assert r.rc == 1 and "dump" in r.err and "default" in r.err
    r = run("config", "frobnicate")
    assert r.rc == 1 and "invalid choice" in r.err
    r = run("--help")
    assert r.rc == 0
    for flag, env in [
        ("--address", "SOCI_SNAPSHOTTER_ADDRESS"),
        ("--config", "SOCI_SNAPSHOTTER_CONFIG"),
        ("--log-level", "SOCI_SNAPSHOTTER_LOG_LEVEL"),
        ("--root", "SOCI_SNAPSHOTTER_ROOT"),
    ]:
        assert flag in r.out and env in r.out
    r = run("--version")
    assert r.rc == 0 and r.out.startswith("soci-snapshotter-grpc version ")


# ---- in process


def test_flag_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    args = daemon.build_parser().parse_args([])
    assert (args.address, args.config, args.log_level, args.root) == (
        "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
        "/etc/soci-snapshotter-grpc/config.toml",
        "info",
        "/var/lib/soci-snapshotter-grpc/",
    )
    monkeypatch.setenv("SOCI_SNAPSHOTTER_ADDRESS", "unix:///tmp/a.sock")
    monkeypatch.setenv("SOCI_SNAPSHOTTER_ROOT", "/tmp/root")
    args = daemon.build_parser().parse_args(["config", "dump"])
    assert (args.address, args.root) == ("unix:///tmp/a.sock", "/tmp/root")
    args = daemon.build_parser().parse_args(["config", "dump", "--address", "fd://"])
    assert args.address == "fd://"


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("trace", daemon.TRACE),
        ("debug", logging.DEBUG),
        ("Info", logging.INFO),
        ("warn", logging.WARNING),
        ("WARNING", logging.WARNING),
        (" error ", logging.ERROR),
        ("fatal", daemon.FATAL),
        ("panic", daemon.PANIC),
    ],
)
def test_parse_log_level(text: str, level: int) -> None:
    assert daemon.parse_log_level(text) == level


def test_json_formatter_fields() -> None:
    rec = logging.makeLogRecord(
        {"msg": "hello %s", "args": ("x",), "levelno": logging.WARNING, "levelname": "WARNING", "key": "k1"}
    )
    doc = json.loads(daemon.JsonFormatter().format(rec))
    assert doc["level"] == "warning" and doc["msg"] == "hello x" and doc["key"] == "k1"
    assert list(doc) == sorted(doc)
