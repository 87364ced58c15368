"""``soci push``: upload SOCI artifacts to the image's registry (cli-and-config.md §2; auth: §8 of
registry-and-auth.md).

Two modes:

* ``soci push IMAGE_REF`` (upstream's command): pushes the v1 SOCI indexes recorded in the local store for
  the image's platform manifests — the index manifest (with its ``subject``), its zTOCs, prefetch blobs and
  the ``{}`` config — with upstream's messages, quiet mode and ``--existing-index`` handling. Upstream finds
  the platform manifests in containerd; soci-py resolves the image in the registry instead (it must be there
  already: that is where the index goes). Per platform the newest v1
  index recorded for that manifest digest is pushed; v2 indexes are skipped with upstream's warning. The
  registry client keeps the referrers fallback tag (``sha256-<hex>``) up to date when the registry has no
  referrers API, so the index is discoverable either way.
* ``soci push --oci-layout PATH REF`` (a soci-py addition): pushes a whole SOCI-enabled image made by
  ``soci convert --standalone`` (layout directory or OCI archive): every blob, the manifests children first,
  the SOCI indexes, then the root tagged as REF. A CI pipeline then needs no other tool.

Credentials, in this order and nothing else (the user's contract): ``--user USER[:PASSWORD]`` (split at the
first ``:``; ``USER`` alone prompts with ``getpass`` when stdin is a terminal and is an error otherwise),
then the Docker config with its credential helpers; without either the requests are anonymous. One
deliberate difference from upstream: identity tokens found in the Docker config are used (upstream's oras
client ignores them), since the keychain shared with the daemon understands them.

Messages: a refused login is ``Unauthenticated`` (exit 4) naming the registry host and where the
credentials came from; an unreachable registry is ``Unavailable`` (exit 5). No message, log record or
``--debug`` line contains a password, token, auth blob or ``Authorization`` value: the registry client
redacts its own records, and this module only ever names the credential source.

Will not: talk to containerd, build indexes, or push v2 indexes individually (push the converted image with
``--oci-layout``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soci_fs import index as soci_index
from soci_fs.errors import FormatError, InvalidArgument, NotFound, SociError, Unauthenticated
from soci_fs.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    ImageIndex,
    Layout,
    Manifest,
    Platform,
    PlatformMatcher,
    host_platform,
)
from soci_fs.oci import Descriptor as OciDescriptor
from soci_fs.registry import reference
from soci_fs.registry.client import Descriptor, RegistryClient
from soci_fs.registry.credentials import Credential, Credentials
from soci_fs.registry.push import DEFAULT_MAX_CONCURRENT_UPLOADS, Artifact, push_artifacts
from soci_fs.registry.reference import HttpConfig, Reference, RegistryConfig
from soci_fs.store import TYPE_INDEX, ArtifactEntry, Store
from soci_grpc.cli import cmd_base
from soci_grpc.keychain.chain import CredentialChain
from soci_grpc.keychain.docker_config import DockerConfigKeychain
from soci_grpc.keychain.helpers import HelperRunner

log = logging.getLogger(__name__)

EXISTING_INDEX_OPTIONS = ("warn", "skip", "allow")
GO_MAX_INT = (1 << 63) - 1
V2_WARNING = (
    "[WARN] Skippping SOCI index manifest v2. "
    "You should push the whole image with higher level tools like finch or nerdctl."
)
# The CLI fails fast when a registry is down (the daemon's [http] defaults retry for minutes).
CLI_REGISTRY_CONFIG = RegistryConfig(http=HttpConfig(max_retries=3, min_wait_msec=100, max_wait_msec=2000))


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """Add ``push`` to the ``soci`` command tree.

    ``parents`` carries the global flags repeated after the command name; when the caller does not pass it
    they are built here the same way, so ``soci push --root X ...`` works either way.
    """
    if parents is None:
        from soci_grpc.cli import soci as _soci  # the module is loaded: build_parser() is running

        common = argparse.ArgumentParser(add_help=False)
        _soci._add_global_flags(common, suppress=True)
        parents = [common]
    p = sub.add_parser(
        "push",
        parents=parents,
        help="push SOCI artifacts to a registry",
        description="Push the v1 SOCI indexes (with their zTOCs) built for IMAGE_REF's platform manifests "
        "from the local store to IMAGE_REF's registry. The image must already be in that registry (soci-py "
        "resolves IMAGE_REF there, not in containerd). With --oci-layout PATH, push a whole SOCI-enabled "
        "image made by 'soci convert --standalone' (directory or tar) and tag it IMAGE_REF. Credentials: "
        "--user, else the Docker config (with credential helpers), else anonymous.",
    )
    p.add_argument("image_ref", nargs="?", metavar="IMAGE_REF", help="image reference (registry/repo:tag)")
    p.add_argument("--plain-http", action="store_true", help="use plain http (not https) for the registry")
    p.add_argument(
        "--user",
        "-u",
        metavar="USER[:PASSWORD]",
        help="registry credentials; USER alone asks for the password when stdin is a terminal",
    )
    p.add_argument(
        "--existing-index",
        default="warn",
        metavar="warn|skip|allow",
        help="when the registry already has a SOCI index for the image: warn (push anyway, default), skip "
        "(do not push) or allow (push without checking)",
    )
    p.add_argument(
        "--max-concurrent-uploads",
        type=_uint,
        default=DEFAULT_MAX_CONCURRENT_UPLOADS,
        metavar="N",
        help=f"parallel blob uploads (default {DEFAULT_MAX_CONCURRENT_UPLOADS}; 0 means the default)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the pushed index digests")
    p.add_argument(
        "--oci-layout",
        metavar="PATH",
        help="push the whole SOCI-enabled image in this OCI layout (dir or tar) as IMAGE_REF",
    )
    cmd_base.add_platform_flags(p)
    # Declared by upstream but unused there too; accepted so scripts written for it keep working.
    for flag in ("--skip-verify", "--refresh", "--http-dump", "--http-trace"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-k", dest="skip_verify", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--hosts-dir", "--tlscacert", "--tlscert", "--tlskey", "--snapshotter"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _uint(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an unsigned integer") from exc
    if v < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an unsigned integer")
    return v


# ---------------------------------------------------------------------------------------------------------
# Output


class _Printer:
    """stdout lines; thread-safe (upload callbacks run on worker threads)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._lock = threading.Lock()

    def out(self, text: str, *, always: bool = False, end: str = "\n") -> None:
        if self.quiet and not always:
            return
        with self._lock:
            sys.stdout.write(text + end)
            sys.stdout.flush()

    def callbacks(self) -> dict[str, Callable[[Descriptor], None]]:
        return {
            "on_pushing": lambda d: self.out(f"pushing artifact with digest: {d.digest}"),
            "on_pushed": lambda d: self.out(f"successfully pushed artifact with digest: {d.digest}"),
            "on_skipped": lambda d: self.out(f"skipped artifact with digest: {d.digest}"),
        }


# ---------------------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class CredentialSource:
    """The ``Credential`` the client calls, and a description of where it gets its answers (no secrets)."""

    credential: Credential
    description: str


def split_user(value: str) -> tuple[str, str | None]:
    """``USER:PASSWORD`` -> (user, password), split at the first ``:``; ``USER`` -> (user, None).

    Raises:
        InvalidArgument: empty user name (the message never repeats the value: it may hold the password).
    """
    user, sep, password = value.partition(":")
    if not user:
        raise InvalidArgument("--user: the user name is empty (expected USER[:PASSWORD])")
    return user, (password if sep else None)


def credential_source(
    args: argparse.Namespace,
    host: str,
    *,
    prompt: Callable[[str], str] = getpass.getpass,
    stdin_isatty: Callable[[], bool] = lambda: sys.stdin.isatty(),
) -> CredentialSource:
    """``--user`` first, then the Docker config (with credential helpers); nothing else."""
    if args.user is not None:
        user, password = split_user(args.user)
        if password is None:
            if not stdin_isatty():
                raise InvalidArgument(
                    f"--user {user}: no password given and stdin is not a terminal to ask for one; "
                    "pass --user USER:PASSWORD (from an environment variable) or use docker login"
                )
            password = prompt(f"Password for {user} at {host}: ")
        creds = Credentials(username=user, password=password, source="--user")

        def static(_host: str, _ref: str) -> Credentials:
            return creds

        return CredentialSource(static, f"--user {user}")
    docker = DockerConfigKeychain(helpers=HelperRunner())
    return CredentialSource(CredentialChain(docker), f"the Docker config {docker.path} (or anonymous)")


def _describe_used(src: CredentialSource, host: str) -> str:
    cred = src.credential
    if isinstance(cred, CredentialChain):
        answer = cred.last_answer(host)
        if answer is None:
            return src.description
        if answer.credentials is None:
            return f"no credentials (anonymous; nothing for {host} in {src.description.split(' (or')[0]})"
        return f"credentials from {answer.credentials.source or 'the Docker config'}"
    return f"credentials from {src.description}"


# ---------------------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    if args.existing_index not in EXISTING_INDEX_OPTIONS:
        raise InvalidArgument(
            f"unexpected value for flag existing-index: {args.existing_index}, "
            f"expected types [{' '.join(EXISTING_INDEX_OPTIONS)}]"
        )
    if not args.image_ref:
        raise InvalidArgument("provide an image reference to push (soci push [flags] IMAGE_REF)")
    printer = _Printer(args.quiet)
    uploads = args.max_concurrent_uploads
    if uploads > GO_MAX_INT:
        printer.out(
            f"warning: overflow for setting --max-concurrent-uploads={uploads}; "
            f"defaulting to {DEFAULT_MAX_CONCURRENT_UPLOADS}",
            end="",
        )
        uploads = DEFAULT_MAX_CONCURRENT_UPLOADS
    if uploads == 0:
        uploads = DEFAULT_MAX_CONCURRENT_UPLOADS
    ref = reference.parse(args.image_ref, normalize=True)
    host = ref.registry_host
    creds = credential_source(args, host)
    with RegistryClient(
        creds.credential,
        config=CLI_REGISTRY_CONFIG,
        ref=str(ref),
        plain_http=args.plain_http,
        pool_maxsize=max(uploads, 4),
    ) as client:
        try:
            if args.oci_layout:
                _push_layout(client, ref, Path(args.oci_layout), args, printer, uploads)
            else:
                _push_indexes(client, ref, args, printer, uploads)
        except Unauthenticated as exc:
            raise Unauthenticated(
                f"registry {host} refused the request ({_describe_used(creds, host)}): {exc}"
            ) from exc
    return 0


# ---- store mode


@dataclass(frozen=True)
class _Target:
    platform: str
    manifest: Descriptor


def _registry_platform(
    client: RegistryClient, ref: Reference, desc: Descriptor, data: bytes | None = None
) -> Platform | None:
    """The platform of a manifest: the index entry's ``platform`` field, else read from its config.

    ``data`` is the manifest's bytes when the caller already has them.
    """
    if desc.platform:
        try:
            return Platform.from_json(dict(desc.platform), f"platform of {desc.digest}")
        except SociError:
            return None
    try:
        if data is None:
            data = client.get_manifest(ref, desc.digest).data
        m = Manifest.parse(data, f"manifest {desc.digest}")
        cfg = json.loads(client.get_blob(ref, m.config.digest, size=m.config.size, max_size=4 << 20))
        return Platform.from_json(
            {k: cfg[k] for k in ("architecture", "os", "variant") if k in cfg}, "config"
        )
    except (SociError, ValueError):
        return None


def _targets(client: RegistryClient, ref: Reference, args: argparse.Namespace) -> list[_Target]:
    """The platform manifests of IMAGE_REF in the registry, for the platforms asked for."""
    if not ref.object:
        ref = ref.with_object(tag="latest")
    top = client.get_manifest(ref)
    requested = cmd_base.platforms_from(args)
    if top.media_type not in INDEX_TYPES:
        desc = top.descriptor
        own = _registry_platform(client, ref, desc, top.data)
        if requested and not args.all_platforms:
            for p in requested:
                if own is None or not PlatformMatcher(p).match(own):
                    raise NotFound(f"image {ref}: no manifest for platform {p} (the image is {own})")
            return [_Target(str(p), desc) for p in requested]
        return [_Target(str(own) if own else str(host_platform()), desc)]
    entries: list[tuple[Descriptor, Platform | None]] = []
    for m in top.json().get("manifests") or []:
        if not isinstance(m, dict):
            continue
        d = Descriptor.from_json(m)
        if d.artifact_type.startswith("application/vnd.amazon.soci.index.") or d.media_type in INDEX_TYPES:
            continue
        entries.append((d, _registry_platform(client, ref, d)))
    if args.all_platforms:
        out, seen = [], set()
        for d, p in entries:
            if p is not None and str(p) not in seen:
                seen.add(str(p))
                out.append(_Target(str(p), d))
        return out
    wanted = requested or [host_platform()]
    out = []
    for want in wanted:
        matcher = PlatformMatcher(want)
        best: tuple[int, int, Descriptor] | None = None
        for pos, (d, p) in enumerate(entries):
            rank = None if p is None else matcher.rank(p)
            if rank is not None and (best is None or (rank, pos) < best[:2]):
                best = (rank, pos, d)
        if best is None:
            raise NotFound(f"image {ref}: no manifest for platform {want}")
        out.append(_Target(str(want), best[2]))
    return out


def _created_key(e: ArtifactEntry) -> str:
    return e.created_at or ""


def _push_indexes(
    client: RegistryClient, ref: Reference, args: argparse.Namespace, printer: _Printer, uploads: int
) -> None:
    store = cmd_base.open_store(args)
    try:
        targets = _targets(client, ref, args)
        chosen: list[tuple[_Target, ArtifactEntry]] = []
        seen_v2 = False
        entries = store.db.entries(TYPE_INDEX)
        for t in targets:
            found = [e for e in entries if e.image_digest == t.manifest.digest]
            v1 = [e for e in found if e.manifest_version == "v1"]
            seen_v2 = seen_v2 or len(v1) != len(found)
            if seen_v2:
                printer.out(V2_WARNING, always=True)
            if not v1:
                raise NotFound(f"could not find any soci index manifest v1 to push for platform {t.platform}")
            v1.sort(key=_created_key, reverse=True)
            chosen.append((t, v1[0]))
        for t, entry in chosen:
            _push_one_index(client, ref, store, t, entry, args, printer, uploads)
    finally:
        store.close()


def _push_one_index(
    client: RegistryClient,
    ref: Reference,
    store: Store,
    target: _Target,
    entry: ArtifactEntry,
    args: argparse.Namespace,
    printer: _Printer,
    uploads: int,
) -> None:
    data = store.content.read(entry.digest, entry.size)
    idx = soci_index.parse_index(data, f"SOCI index {entry.digest}")
    if idx.version != 1 or idx.subject is None:
        raise FormatError(f"SOCI index {entry.digest}: not a v1 index with a subject")
    if idx.subject.digest != target.manifest.digest:
        raise FormatError(
            f"SOCI index {entry.digest}: its subject is {idx.subject.digest}, "
            f"not the image manifest {target.manifest.digest}"
        )
    if args.existing_index != "allow":
        printer.out("checking if a soci index already exists in remote repository...")
        existing = client.referrers(ref, target.manifest.digest, soci_index.ARTIFACT_TYPE_V1)
        if existing:
            if len(existing) > 1:
                message = "multiple soci indices found in remote repository"
            else:
                message = f"soci index found in remote repository with digest: {existing[0].digest}"
            if args.existing_index == "skip":
                printer.out(
                    f"{message}: skipping pushing artifacts for image manifest: {target.manifest.digest}"
                )
                return
            printer.out(f"[WARN] {message}: pushing index anyway", always=True)
    if args.quiet:
        printer.out(entry.digest, always=True)
    else:
        printer.out(f"pushing soci index with digest: {entry.digest}")
    blobs: list[Artifact] = []
    config = idx.manifest.config
    blobs.append(Artifact(Descriptor(config.media_type, config.digest, config.size), soci_index.EMPTY_CONFIG))
    for layer in idx.manifest.layers or []:
        if not store.content.has(layer.digest):
            raise NotFound(
                f"blob {layer.digest} of SOCI index {entry.digest}: not in the local content store "
                f"{str(store.content.path)!r}"
            )
        blobs.append(
            Artifact(
                Descriptor(layer.media_type, layer.digest, layer.size), store.content.blob_path(layer.digest)
            )
        )
    manifest = Artifact(
        Descriptor(idx.manifest.media_type or soci_index.MT_OCI_MANIFEST, entry.digest, len(data)), data
    )
    push_artifacts(client, ref, blobs, [manifest], max_concurrent_uploads=uploads, **printer.callbacks())


# ---- layout mode


def _walk_layout(
    layout: Layout, root: OciDescriptor, root_index: ImageIndex | None
) -> tuple[list[OciDescriptor], list[OciDescriptor]]:
    """(blobs, manifests) reachable from ``root``; manifests ordered children before parents, root excluded.

    Blobs absent from the layout are skipped (partial multi-platform images keep foreign entries).
    ``root_index`` is the parsed root when it is an index (it may be ``index.json`` itself, with no blob).
    """
    blobs: dict[str, OciDescriptor] = {}
    manifests: list[OciDescriptor] = []
    done: set[str] = set()

    def visit(d: OciDescriptor, depth: int) -> None:
        if depth > 16:
            raise FormatError(f"OCI layout {layout.source!r}: manifests nested too deeply")
        if d.digest in done or d.digest in blobs or not layout.has_blob(d.digest):
            return
        if d.media_type in INDEX_TYPES:
            for child in ImageIndex.parse(layout.read_blob(d), f"index {d.digest}").manifests or []:
                visit(child, depth + 1)
        elif d.media_type in MANIFEST_TYPES:
            m = Manifest.parse(layout.read_blob(d), f"manifest {d.digest}")
            for child in (m.config, *(m.layers or [])):
                visit(child, depth + 1)
        else:
            blobs[d.digest] = d
            return
        if d.digest not in done:
            done.add(d.digest)
            manifests.append(d)

    if root_index is not None:
        done.add(root.digest)
        for child in root_index.manifests or []:
            visit(child, 1)
    else:
        done.add(root.digest)
        m = Manifest.parse(layout.read_blob(root), f"manifest {root.digest}")
        for child in (m.config, *(m.layers or [])):
            visit(child, 1)
    return list(blobs.values()), manifests


def _push_layout(
    client: RegistryClient,
    ref: Reference,
    path: Path,
    args: argparse.Namespace,
    printer: _Printer,
    uploads: int,
) -> None:
    if args.platform or args.all_platforms:
        raise InvalidArgument(
            "--platform/--all-platforms do not apply with --oci-layout: the whole image is pushed"
        )
    if not ref.tag and not ref.digest:
        ref = ref.with_object(tag="latest")
    with Layout.open(path) as layout:
        root = layout.resolve_root()
        root_desc = root.descriptor
        if root.index is not None and not layout.has_blob(root_desc.digest):
            root_data = root.index.marshal()  # index.json itself acts as the list
        else:
            root_data = layout.read_blob(root_desc)
        if ref.digest and ref.digest != root_desc.digest:
            raise InvalidArgument(f"{ref}: the layout's image is {root_desc.digest}, not {ref.digest}")
        blobs, manifests = _walk_layout(layout, root_desc, root.index)
        if args.quiet:
            printer.out(root_desc.digest, always=True)
        else:
            printer.out(f"pushing image with digest: {root_desc.digest}")
            if not any(
                m.artifact_type == soci_index.ARTIFACT_TYPE_V2
                for m in (root.index and root.index.manifests) or []
            ):
                printer.out(f"note: {path} holds no SOCI index v2 (make one with soci convert --standalone)")
        push_artifacts(
            client,
            ref,
            [Artifact(Descriptor(b.media_type, b.digest, b.size), layout.blob_path(b.digest)) for b in blobs],
            [Artifact(Descriptor(m.media_type, m.digest, m.size), layout.read_blob(m)) for m in manifests]
            + [Artifact(Descriptor(root_desc.media_type, root_desc.digest, len(root_data)), root_data)],
            max_concurrent_uploads=uploads,
            **printer.callbacks(),
        )
        if ref.tag:
            client.push_manifest(ref, ref.tag, root_data, root_desc.media_type)
            printer.out(f"tagged {ref.locator}:{ref.tag} as {root_desc.digest}")
