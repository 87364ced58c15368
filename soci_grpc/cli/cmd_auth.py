"""``soci auth explain REF``: which credential source answers for an image, and why.

Owns the command line of the ``auth`` group. It builds the same chain the daemon builds (Docker config
always; Kubernetes secrets when ``--kubeconfig`` or ``--kubernetes`` is given), evaluates every source
*in this process* and prints each answer (user name, kind, origin, expiry — never a secret) and the chain's
pick.

The running daemon is asked first (its debug service on ``--snapshotter-address``), so the answer is the
daemon's own chain, CRI credentials recorded by its proxy included (redacted the same way). With
``--local``, with ``--docker-config``/``--kubeconfig``/``--kubernetes`` (questions about particular files), or
when no daemon answers, this process evaluates the local sources itself and its header says so; the CRI
keychain is then listed but not evaluated (it lives in the daemon's memory).

With ``--check`` it then asks the registry for REF's manifest (HEAD) through the registry client with the
same chain, so the token handshake runs with the picked credentials, and reports whether the registry
accepted them (exit 4 when it refused, 5 when it could not be reached). Without ``--check`` it never
contacts a registry.
"""

from __future__ import annotations

import argparse
import sys
import time

from soci_fs.errors import NotFound, SociError, Unauthenticated, Unavailable
from soci_fs.registry import reference
from soci_fs.registry.reference import registry_host
from soci_grpc import debug
from soci_grpc.cli.cmd_debug import snapshotter_address_flag
from soci_grpc.cli.common import EXIT_UNAUTHENTICATED, EXIT_UNAVAILABLE
from soci_grpc.keychain.chain import CredentialChain
from soci_grpc.keychain.docker_config import DockerConfigKeychain, split_reference
from soci_grpc.keychain.explain import explain, render
from soci_grpc.keychain.helpers import DEFAULT_TIMEOUT, HelperRunner
from soci_grpc.keychain.kubeconfig import KubeSecretKeychain

LOCAL_HEADER = (
    "evaluated by this soci process from the local sources (not by the running daemon; "
    "CRI credentials live only in the daemon's memory)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("auth", help="inspect registry credentials")
    p.set_defaults(func=_usage, _auth_parser=p)
    group = p.add_subparsers(dest="auth_command", metavar="COMMAND")
    e = group.add_parser(
        "explain",
        help="show what each credential source answers for REF and which one is used",
        description="Show, for the registry of REF, each credential source in chain order, what it answers "
        "(secrets redacted) and which answer is used.",
    )
    e.add_argument("ref", metavar="REF", help="image reference (Docker shorthand accepted)")
    e.add_argument(
        "--docker-config", metavar="PATH", help="Docker config file (default: as the daemon finds it)"
    )
    e.add_argument(
        "--kubeconfig", metavar="PATH", help="enable the Kubernetes-secret source with this kubeconfig"
    )
    e.add_argument(
        "--kubernetes",
        action="store_true",
        help="enable the Kubernetes-secret source with the default kubeconfig",
    )
    e.add_argument(
        "--namespace", action="append", default=[], metavar="NS", help="only secrets in NS (repeat)"
    )
    e.add_argument("--label-selector", default="", metavar="SEL", help="only secrets matching SEL")
    e.add_argument(
        "--sync-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the first list of secrets (default 10)",
    )
    e.add_argument(
        "--helper-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"credential helper timeout (default {DEFAULT_TIMEOUT:g})",
    )
    e.add_argument(
        "--check",
        action="store_true",
        help="also ask the registry for REF's manifest with the picked credentials (token handshake)",
    )
    e.add_argument("--plain-http", action="store_true", help="with --check: use http for the registry")
    e.add_argument(
        "--local", action="store_true", help="do not ask the running daemon; evaluate the local sources here"
    )
    snapshotter_address_flag(e)
    e.set_defaults(func=run_explain)


def _usage(args: argparse.Namespace) -> int:
    args._auth_parser.print_help(sys.stderr)
    return 2


def _ask_daemon(args: argparse.Namespace) -> tuple[str | None, str]:
    """The daemon's explanation text, or ``(None, why not)``."""
    if args.local or args.docker_config or args.kubeconfig or args.kubernetes:
        return None, ""
    try:
        answer = debug.call(args.snapshotter_address, "ExplainAuth", {"ref": args.ref})
    except (NotFound, Unavailable) as exc:
        return None, f"no daemon answered ({exc})"
    return str(answer.get("text", "")), ""


def run_explain(args: argparse.Namespace) -> int:
    ref = split_reference(args.ref)
    host = registry_host(ref.host)
    text, why_local = _ask_daemon(args)
    if text is not None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if args.check:
            docker = DockerConfigKeychain(None, helpers=HelperRunner(timeout=args.helper_timeout))
            return _check(CredentialChain(docker, None, None), str(ref), plain_http=args.plain_http)
        return 0
    docker = DockerConfigKeychain(args.docker_config, helpers=HelperRunner(timeout=args.helper_timeout))
    kube: KubeSecretKeychain | None = None
    notes = {"cri": "lives in the daemon's memory; not visible to this process"}
    if args.kubeconfig or args.kubernetes:
        kube = KubeSecretKeychain(
            args.kubeconfig or None, namespaces=args.namespace, label_selector=args.label_selector
        )
    else:
        notes["kubernetes-secrets"] = "disabled; give --kubeconfig PATH or --kubernetes to evaluate it"
    header = LOCAL_HEADER if not why_local else f"{LOCAL_HEADER}; {why_local}"
    try:
        if kube is not None:
            kube.start()
            if not kube.wait_ready(args.sync_timeout):
                header += f"\nwarning: Kubernetes secrets not fully synced after {args.sync_timeout:g} s"
        chain = CredentialChain(docker, None, kube)
        report = explain(chain, host, str(ref), notes=notes)
        sys.stdout.write(render(report, header=header))
        sys.stdout.flush()
        if args.check:
            return _check(chain, str(ref), plain_http=args.plain_http)
    finally:
        if kube is not None:
            kube.stop()
    return 0


def _check(chain: CredentialChain, ref: str, *, plain_http: bool) -> int:
    """HEAD the manifest through the registry client (which runs the auth flow with ``chain``)."""
    from soci_fs.registry.client import RegistryClient  # only --check needs requests and the client

    parsed = reference.parse(ref)
    rc = 0
    started = time.time()
    try:
        with RegistryClient(chain, ref=ref, plain_http=plain_http) as client:
            desc = client.head_manifest(parsed)
        if desc is None:
            line = "the registry accepted the request; the manifest was not found (404)"
        else:
            line = f"the registry accepted the credentials; manifest {desc.digest or parsed.object} found"
    except Unauthenticated as exc:
        line, rc = f"the registry refused: {exc}", EXIT_UNAUTHENTICATED
    except Unavailable as exc:
        line, rc = f"the registry could not be reached: {exc}", EXIT_UNAVAILABLE
    except SociError as exc:
        line, rc = f"failed: {exc}", 1
    answer = chain.last_answer(registry_host(parsed.host))
    if answer is None or answer.at < started:
        used = "none: the registry did not ask for credentials before the check ended"
    elif answer.source:
        used = answer.source
    else:
        used = "no credentials (anonymous)"
    sys.stdout.write(f"check: {line}\ncheck: credentials used: {used}\n")
    return rc
