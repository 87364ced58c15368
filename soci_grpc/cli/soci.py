"""The ``soci`` command line: the argparse tree, global flags and dispatch.

Commands live in ``cmd_*.py`` modules, each with ``register(subparsers, ...)``. Global flags
(cli-and-config.md §1) are accepted before the command name and, as upstream, also after it (each
subcommand parser repeats them with suppressed defaults, so a value given later wins).

``--content-store`` defaults to ``soci`` here (upstream: ``containerd``): the artifacts go to
``<root>/content``, which every command can use. ``containerd`` keeps them in containerd's content store
(``create``, ``convert`` and the read-only commands); ``push``, ``rebuild-db`` and ``index rm`` refuse it
with a clear message.

Exit codes and error printing come from :mod:`soci_grpc.cli.common`; argparse usage errors exit 2.
Logging is configured only when ``main`` runs as the program (``argv`` is ``None``), so in-process callers
keep their own logging set-up.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import metadata

from soci_fs.store import DEFAULT_ROOT
from soci_grpc.cli import (
    cmd_auth,
    cmd_base,
    cmd_convert,
    cmd_create,
    cmd_debug,
    cmd_image,
    cmd_index,
    cmd_mount,
    cmd_push,
    cmd_rebuild_db,
    cmd_ztoc,
)
from soci_grpc.cli.common import EXIT_USAGE, run_handler, setup_logging

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Go ``time.ParseDuration`` (seconds as a float): ``300ms``, ``1.5h``, ``1h2m3s``, ``-2s``, ``0``."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if m is None:
            raise argparse.ArgumentTypeError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s:
        raise argparse.ArgumentTypeError(f'time: invalid duration "{text}"')
    return sign * total


def _add_global_flags(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("global options")
    g.add_argument(
        "--address",
        "-a",
        default=d(os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock")),
        help="containerd socket (env CONTAINERD_ADDRESS)",
    )
    g.add_argument(
        "--namespace",
        "-n",
        default=d(os.environ.get("CONTAINERD_NAMESPACE", "default")),
        help="containerd namespace (env CONTAINERD_NAMESPACE)",
    )
    g.add_argument(
        "--timeout", type=parse_go_duration, default=d(None), help="timeout, a Go duration (e.g. 30s)"
    )
    g.add_argument("--debug", action="store_true", default=d(False), help="debug output")
    g.add_argument(
        "--content-store",
        type=cmd_base.content_store_type,
        default=d("soci"),
        help="where SOCI artifacts are kept: soci (<root>/content, default here) or containerd "
        "(containerd's content store; not for push, rebuild-db, index rm)",
    )
    g.add_argument("--root", default=d(DEFAULT_ROOT), help=f"soci root directory (default {DEFAULT_ROOT})")


def _version() -> str:
    try:
        v = metadata.version("soci-py")
    except metadata.PackageNotFoundError:
        v = "unknown"
    return f"soci version {v}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soci",
        description="A command line tool for SOCI (Seekable OCI): build, convert and inspect SOCI indexes.",
    )
    parser.add_argument("--version", "-v", action="version", version=_version())
    _add_global_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, suppress=True)
    parents = [common]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmd_create.register(sub, parents)
    cmd_convert.register(sub, parents)
    cmd_index.register(sub, parents)
    cmd_ztoc.register(sub, parents)
    cmd_rebuild_db.register(sub, parents)
    cmd_push.register(sub)
    cmd_auth.register(sub)
    cmd_debug.register(sub)
    cmd_mount.register(sub, parents)
    cmd_image.register(sub, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``soci`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    as_program = argv is None
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    if as_program:
        setup_logging(args.debug)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_handler(func, args)


if __name__ == "__main__":
    sys.exit(main())
