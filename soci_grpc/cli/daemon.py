"""The ``soci-snapshotter-grpc`` entry point: flags, logging set-up and the ``config`` subcommands.

Owns the daemon's command line (cli-and-config.md §3): ``--address``, ``--config``, ``--root`` and
``--log-level`` with upstream's environment variables and defaults (also accepted after a subcommand name,
as upstream's CLI library allows), ``--version``; ``config dump`` (the effective configuration of
``--config`` as TOML) and ``config default`` (the defaults); the JSON-lines log format on stderr; and the
log-level names (case-insensitive; ``warning`` = ``warn``; ``trace`` is below ``debug``).

Every error is printed as ``soci-snapshotter-grpc: <error>`` with exit status 1 (usage errors too, as
upstream). Logging is configured only when :func:`main` runs as the program (``argv`` is ``None``).

With no subcommand it serves: creates ``<root>`` (0700) and ``<root>/snapshotter``, listens on the unix
socket of ``--address`` (a path or ``unix://<path>``; parent directory created 0700, a stale socket removed,
the socket chmod 0660). Before listening it detaches mounts a previous run left under
``<root>/snapshotter/snapshots`` and ``<root>/fuse``, mounts the FUSE session of the lazy layers
(:mod:`soci_grpc.layers`) and serves the remote snapshots of the previous run again. Then it serves
containerd's snapshots service (:mod:`soci_grpc.service`) with remote layers, the debug service
(:mod:`soci_grpc.debug`) and, with ``[cri_keychain] enable_keychain``, the CRI image service proxy; with
``metrics_address`` set, Prometheus metrics (:mod:`soci_grpc.metrics`: FUSE operations and latency, fetches,
cache hits, registry statuses and token fetches per host, credential sources, fallbacks); logs
``soci-snapshotter-grpc successfully started``, tells systemd ``READY=1`` when ``NOTIFY_SOCKET`` is set
(``STOPPING=1`` on the way out). SIGINT and SIGTERM stop it cleanly: every lazy layer and the FUSE session
are unmounted (running containers lose their lazy lower layers; the next start serves them again).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
from concurrent import futures
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from soci_fs.errors import InvalidArgument, SociError
from soci_grpc import config as configmod
from soci_grpc import sockact

PROG = "soci-snapshotter-grpc"
DEFAULT_ADDRESS = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"
ENV_ADDRESS = "SOCI_SNAPSHOTTER_ADDRESS"
ENV_CONFIG = "SOCI_SNAPSHOTTER_CONFIG"
ENV_LOG_LEVEL = "SOCI_SNAPSHOTTER_LOG_LEVEL"
ENV_ROOT = "SOCI_SNAPSHOTTER_ROOT"
EXIT_FAILURE = 1

TRACE = 5
FATAL = logging.CRITICAL
PANIC = logging.CRITICAL + 5
LOG_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": FATAL,
    "panic": PANIC,
}
_LEVEL_NAMES = {
    TRACE: "trace",
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    FATAL: "fatal",
    PANIC: "panic",
}
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
log = logging.getLogger(__name__)


def parse_log_level(text: str) -> int:
    """A log-level name (any case; ``warning`` = ``warn``) as a ``logging`` level.

    Raises:
        ValueError: ``failed to prepare logger: ...`` naming the value and the accepted names.
    """
    level = LOG_LEVELS.get(text.strip().lower())
    if level is None:
        raise ValueError(
            f'failed to prepare logger: not a valid log level: "{text}" '
            "(trace, debug, info, warn, error, fatal, panic)"
        )
    return level


class JsonFormatter(logging.Formatter):
    """One JSON object per line, keys sorted: ``level``, ``msg``, ``time`` plus ``extra`` fields.

    ``time`` is RFC 3339 with nine fraction digits and the local offset (``Z`` for UTC). An exception is
    reported in an ``error`` field (its message only, no traceback).
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created).astimezone()
        offset = when.strftime("%z")
        zone = "Z" if offset in ("+0000", "") else f"{offset[:3]}:{offset[3:]}"
        nanos = round(record.created * 1e9) % 1_000_000_000
        doc: dict[str, Any] = {
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "msg": record.getMessage(),
            "time": when.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}{zone}",
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                doc[key] = (
                    value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
                )
        if record.exc_info and record.exc_info[1] is not None and "error" not in doc:
            doc["error"] = str(record.exc_info[1])
        return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def setup_logging(level: int) -> None:
    """Daemon logging: JSON lines on stderr at ``level`` and above."""
    logging.addLevelName(TRACE, "TRACE")
    logging.addLevelName(PANIC, "PANIC")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _version() -> str:
    try:
        v = metadata.version("soci-py")
    except metadata.PackageNotFoundError:
        v = "unknown"
    return f"{PROG} version {v}"


def _add_flags(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    def d(env: str, value: str) -> str:
        return argparse.SUPPRESS if suppress else os.environ.get(env, value)

    p.add_argument(
        "--address",
        default=d(ENV_ADDRESS, DEFAULT_ADDRESS),
        help=f"address for the snapshotter's gRPC server: a path, unix://<path> or fd:// (env {ENV_ADDRESS}; "
        f"default {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--config",
        default=d(ENV_CONFIG, configmod.DEFAULT_CONFIG_PATH),
        help=f"path to the configuration file (env {ENV_CONFIG}; default {configmod.DEFAULT_CONFIG_PATH})",
    )
    p.add_argument(
        "--log-level",
        default=d(ENV_LOG_LEVEL, "info"),
        help=f"log level: trace, debug, info, warn, error, fatal, panic (env {ENV_LOG_LEVEL}; default info)",
    )
    p.add_argument(
        "--root",
        default=d(ENV_ROOT, configmod.DEFAULT_ROOT),
        help=f"root directory for this snapshotter (env {ENV_ROOT}; default {configmod.DEFAULT_ROOT})",
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1, as every other error does."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAILURE, f"{PROG}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The SOCI snapshotter: a containerd remote snapshotter.")
    parser.add_argument("--version", "-v", action="version", version=_version())
    _add_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    cfg = sub.add_parser("config", parents=[common], help="Manage configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="COMMAND", parser_class=_Parser)
    dump = cfg_sub.add_parser(
        "dump", parents=[common], help="Dump configuration (the effective configuration of --config)"
    )
    dump.set_defaults(func=_cmd_config_dump)
    default = cfg_sub.add_parser("default", parents=[common], help="Print default configuration")
    default.set_defaults(func=_cmd_config_default)
    cfg.set_defaults(func=lambda args: _usage(cfg))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_FAILURE


def _cmd_config_dump(args: argparse.Namespace) -> int:
    sys.stdout.write(configmod.dump(configmod.load(args.config)))
    return 0


def _cmd_config_default(args: argparse.Namespace) -> int:
    sys.stdout.write(configmod.default_toml())
    return 0


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's ``NOTIFY_SOCKET``; False when unset or unreachable."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as exc:  # systemd gone or not listening: nothing to tell
        log.debug("sd_notify %s to %s failed: %s", state, addr, exc)
        return False
    return True


def socket_path(address: str) -> str:
    """The unix socket path of ``--address`` (a path or ``unix://<path>``; ``fd://`` is
    :mod:`soci_grpc.sockact`'s)."""
    path = address.removeprefix("unix://")
    if not path:
        raise InvalidArgument(f"address {address!r}: no socket path")
    return os.path.abspath(path)


def _listen_path(path: str) -> None:
    """Make the socket's parent directory (0700 when missing) and remove a stale socket file."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"address {path!r} exists and is not a socket")
    os.unlink(path)


def _fuse_observer(metrics: Any) -> Any:
    def observe(op: str, seconds: float, num: int) -> None:
        metrics.fuse_op(op, seconds)
        if num:
            metrics.fuse_error(op, num)

    return observe


def _serve(args: argparse.Namespace) -> int:
    import grpc

    from soci_grpc import cri_proxy, debug, service
    from soci_grpc import metrics as metricsmod
    from soci_grpc.cli.cmd_mount import mount_options
    from soci_grpc.keychain.factory import build_chain
    from soci_grpc.layers import LABEL_REMOTE, RemoteLayers, unmount_all_under
    from soci_grpc.snapshotter import Snapshotter

    version = _version().rsplit(" ", 1)[-1]
    log.info("starting %s", PROG, extra={"version": version, "revision": ""})
    cfg = configmod.load(args.config)
    log.debug("configuration loaded from %s", cfg.source or "defaults")
    if not args.address.startswith(sockact.FD_SCHEME):
        socket_path(args.address)  # a bad address fails before anything is started
    root = os.path.abspath(args.root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    keychains = build_chain(cfg)  # Docker config always; CRI store and Kubernetes secrets when enabled
    metrics = metricsmod.DaemonMetrics()
    chain = keychains.chain

    def credential(host: str, ref: str) -> Any:
        creds = chain(host, ref)
        answer = chain.last_answer(host)
        metrics.credential_hit((answer.source if answer is not None else "") or "none")
        return creds

    layers = RemoteLayers(root, cfg, credential, metrics)
    metrics.layers(layers.layer_stats)
    metrics_server = None
    core: Snapshotter | None = None
    server = None
    proxy = None
    # fd:// (systemd socket activation): grpc serves a private socket, systemd's listener is relayed to it
    act = sockact.activate(args.address, DEFAULT_ADDRESS)
    path = act.grpc_path if act is not None else socket_path(args.address)
    try:
        # mounts left by a previous run (killed, or stopped without unmounting) are dead: detach them
        stale = unmount_all_under(Path(root) / "snapshotter" / "snapshots")
        if stale:
            log.info("detached %d stale snapshot mount(s) of a previous run", stale)
        layers.start(replace(mount_options(cfg), observer=_fuse_observer(metrics)))
        core = Snapshotter(os.path.join(root, "snapshotter"), layer_provider=layers)
        remote = core.remote_snapshots(LABEL_REMOTE)
        if remote:
            restored = layers.restore(remote)
            log.info("restored %d of %d remote snapshot(s)", restored, len(remote))
        # containerd allows 16 MiB messages; CRI image lists can be large.
        limits = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="grpc"), options=limits
        )
        service.add_to_server(core, server)
        debug.add_to_server(server, debug.DebugService(layers, keychains.chain, version))
        if keychains.cri is not None:  # [cri_keychain] enable_keychain: the kubelet's image service endpoint
            proxy = cri_proxy.add_to_server(server, keychains.cri, cfg.cri_keychain.image_service_path)
        metrics_server = metricsmod.from_config(cfg, metrics.registry)
        if metrics_server is not None:
            log.info("serving metrics on %s", metrics_server.where)
        _listen_path(path)
        if server.add_insecure_port("unix:" + path) == 0:
            raise InvalidArgument(f"failed to listen on {path!r}")
        server.start()
        os.chmod(path, 0o660)
        if act is not None:
            act.start()
        address = act.address if act is not None else path
        log.info("%s successfully started", PROG, extra={"address": address, "root": root})
        sd_notify("READY=1")
        stop.wait()
        log.info("shutting down %s", PROG)
        sd_notify("STOPPING=1")
    finally:
        if server is not None:
            server.stop(grace=2).wait()
        if proxy is not None:
            proxy.close()
        if metrics_server is not None:
            metrics_server.close()
        layers.close()  # unmounts every lazy layer and the FUSE session
        keychains.stop()
        if core is not None:
            core.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if act is not None:
            act.close()
    log.info("%s stopped", PROG)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``soci-snapshotter-grpc`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    as_program = argv is None
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_FAILURE)
    try:
        level = parse_log_level(args.log_level)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if as_program:
        setup_logging(level)
    func = getattr(args, "func", _serve)
    try:
        return func(args)
    except SociError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as exc:  # e.g. the root or socket directory cannot be created: say what, no traceback
        log.debug("failed", exc_info=True)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
