"""The ``soci`` argparse tree: help everywhere, usage errors, global flags, Go-compatible output helpers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from soci_grpc.cli import cmd_base
from soci_grpc.cli.soci import parse_go_duration
from tests.grpc.clihelp import ok, run, run_exe

COMMANDS = [
    [],
    ["create"],
    ["convert"],
    ["index"],
    ["index", "list"],
    ["index", "ls"],
    ["index", "info"],
    ["index", "rm"],
    ["index", "remove"],
    ["ztoc"],
    ["ztoc", "list"],
    ["ztoc", "info"],
    ["ztoc", "get-file"],
    ["rebuild-db"],
    ["push"],
    ["auth"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "soci")
def test_help_everywhere(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.rc == 0 and r.text.startswith("usage: soci")


def test_version_and_exe_help() -> None:
    r = run_exe("--version")
    assert r.rc == 0 and r.out.decode().startswith("soci version ")
    r = run_exe("ztoc", "get-file", "--help")
    assert r.rc == 0 and b"0600" in r.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments"),
        (["index", "info"], "the following arguments are required: DIGEST"),
        (["convert", "--standalone", "--format", "zip", "a", "b"], "invalid choice: 'zip'"),
        (
            ["--content-store", "nope", "index", "ls"],
            "unknown content store type: nope; must be one of [soci containerd]",
        ),
        (["index", "ls", "--content-store", "nope"], "unknown content store type: nope"),
        (["--timeout", "5 parsecs", "index", "ls"], 'time: invalid duration "5 parsecs"'),
        (["create", "--span-size", "big"], "invalid integer 'big'"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str) -> None:
    r = run(*argv)
    assert r.rc == 2 and message in r.err


def test_bare_command_groups_print_usage() -> None:
    assert run().rc == 2
    assert run("index").rc == 2


@pytest.mark.parametrize(
    ("argv", "rc", "message"),
    [
        (["create"], 2, "soci: source image needs to be specified\n"),
        (
            ["--address", "/nonexistent/containerd.sock", "create", "docker.io/library/x:1"],
            5,
            "cannot reach containerd",
        ),
        (
            ["convert", "a", "b"],
            2,
            'the destination image must be a tagged ref of the form "registry/repository:tag"',
        ),
        (
            ["create", "--oci-layout", "x", "--optimizations", "foo"],
            2,
            "optimization foo is not a valid optimization [xattr]",
        ),
        (["create", "--oci-layout", "x", "--prefetch-file", "/a"], 1, "prefetch artifacts"),
        (["convert", "--standalone", "/no/such/dir", "/tmp/x.tar"], 3, "no such file or directory"),
    ],
)
def test_command_errors(tmp_path: Path, argv: list[str], rc: int, message: str) -> None:
    r = run("--root", tmp_path / "root", *argv)
    assert r.rc == rc and message in r.err, r.err


def test_containerd_content_store_is_refused_where_not_built(tmp_path: Path) -> None:
    r = run("--root", tmp_path / "r", "--content-store", "containerd", "rebuild-db")
    assert r.rc == 1 and "containerd content store is not supported yet" in r.err


def test_ref_needs_containerd_without_layout(tmp_path: Path) -> None:
    r = run(
        "--address",
        "/nonexistent/containerd.sock",
        "--root",
        tmp_path / "r",
        "index",
        "ls",
        "--ref",
        "docker.io/library/x:1",
    )
    assert r.rc == 5 and "--oci-layout" in r.err


def test_root_parent_must_exist(tmp_path: Path) -> None:
    r = run("--root", tmp_path / "a" / "b", "index", "ls")
    assert r.rc == 3 and "parent directory does not exist" in r.err


def test_empty_store_tables(tmp_path: Path) -> None:
    r = ok(run("--root", tmp_path / "r", "index", "ls"))
    assert (
        r.text == "DIGEST    SIZE    IMAGE REF    PLATFORM    MEDIA TYPE    MANIFEST VERSION    CREATED    \n"
    )
    assert ok(run("ztoc", "ls", "--root", tmp_path / "r")).text == "DIGEST    SIZE    LAYER DIGEST    \n"


def test_tabwriter_matches_go() -> None:
    # Go: tabwriter.NewWriter(w, 8, 8, 4, ' ', 0) with "a\tbb\t\n" style lines.
    rows = [["DIGEST", "SIZE", "X"], ["sha256:abc", "1", ""], ["d", "1234567890", "é"]]
    assert cmd_base.tabwriter(rows) == (
        "DIGEST        SIZE          X       \n"
        "sha256:abc    1                     \n"
        "d             1234567890    é       \n"
    )
    assert cmd_base.tabwriter([]) == ""


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m0s"), (61, "1m1s"), (3600, "1h0m0s"), (86399, "23h59m59s"), (-5, "-5s")],
)
def test_go_duration(seconds: int, text: str) -> None:
    assert cmd_base.go_duration(seconds) == text


def test_created_text() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert cmd_base.created_text(now - dt.timedelta(seconds=3725.4), now) == "1h2m5s ago"
    assert cmd_base.created_text(None, now) == "n/a"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("30s", 30.0), ("1h2m3s", 3723.0), ("1.5h", 5400.0), ("300ms", 0.3), ("-2s", -2.0)],
)
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


def test_split_list() -> None:
    assert cmd_base.split_list(["a, b", "c", ",", " d "]) == ["a", "b", "c", "d"]
