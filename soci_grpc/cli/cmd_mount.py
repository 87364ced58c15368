"""``soci mount``: lazily mount an image straight from its registry, in the foreground (a soci-py addition).

``soci mount [--user U[:P]] [--plain-http] [--layer DIGEST] [--index-digest D] [--platform P] [--config F]
REF MOUNTPOINT`` resolves REF in its registry, finds the SOCI index the way the snapshotter does (an explicit
``--index-digest``; else the v2 annotation on the image manifest; else the v1 referrers), and serves every
layer through the same data plane the daemon uses (``soci_fs.remote`` -> ``RemoteLayer`` -> block cache ->
one FUSE session). It is the operator's way to check an image and its credentials by hand.

Where things go:

* ``<root>/content``: manifests fetched by digest, SOCI indexes, zTOCs and the whole blobs of layers that
  have no zTOC (verified; reused by later mounts, so an image named by digest whose spans are all cached
  mounts with no network);
* ``<root>/cache``: the block cache (``[directory_cache] max_memory_bytes`` / ``max_disk_bytes`` /
  ``verify_every_read``); it survives the command;
* ``<root>/mnt/<pid>-<random>``: the FUSE session (mode 0700), one directory per layer named by its digest
  (``sha256-<hex>``); removed when the command ends;
* MOUNTPOINT: a read-only overlayfs whose lowerdirs are the layer directories, topmost first (no upperdir);
  with ``--layer DIGEST`` or a one-layer image a read-only bind mount of that layer's directory (overlayfs
  needs two lowerdirs when it has no upperdir).

Layers without a zTOC are fetched whole and indexed locally (``soci_fs.remote``), then served like the
others; the output says which layers are ``lazy`` and which are ``local``.

Credentials: ``--user`` first (as ``soci push``), else the daemon's credential chain built from the config
(the Docker config with its helpers; Kubernetes secrets when ``[kubeconfig_keychain] enable_keychain``),
looked up on every token fetch. The kernel cache timeouts are 3600 s (layers are immutable) unless ``[fuse]
long_timeouts = false``, then ``[fuse] attr_timeout`` / ``entry_timeout`` / ``negative_timeout``; tar headers
are verified before a file's first read unless ``disable_verification = true``; a layer whose zTOC descriptor
says ``com.amazon.soci.disable-xattrs`` shows no xattrs. Fetch timeouts and retries come from
``[blob]``/``[http]``; a read that cannot be served within ``[blob] fetching_timeout_sec`` fails with EIO and
the mount stays up. The background fetcher runs as in the daemon (``[background_fetch]``).

Output (stdout): one line per layer, then ``mounted REF at MOUNTPOINT (...)`` when the mount is ready (tests
wait on it). The command stays in the foreground until SIGINT/SIGTERM or until MOUNTPOINT is unmounted by
someone else; then it unmounts everything it made and prints ``fetched <bytes> bytes in <n> spans (<requests>
requests) from <host>`` and a line per layer. Errors follow the exit-code table of ``common.py``.

Will not: write to the image (everything is read-only), keep running without a terminal of its own
(use a service manager), or mount an image without a SOCI index (the daemon defers those to containerd).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from soci_fs.background import BackgroundConfig, BackgroundFetcher
from soci_fs.cache import BlockCache, CacheConfig
from soci_fs.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SociError,
    Unauthenticated,
)
from soci_fs.mount import MountOptions, Session, serve_layers
from soci_fs.registry import reference
from soci_fs.registry.client import RegistryClient
from soci_fs.registry.credentials import Credential, Credentials
from soci_fs.remote import ImagePlan, ImageSource, LayerPlan, OpenedLayer, open_layer
from soci_fs.spans import SpanConfig
from soci_fs.store import ContentStore
from soci_grpc import config as config_mod
from soci_grpc.cli.cmd_push import split_user
from soci_grpc.keychain.factory import BuiltChain, build_chain

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``mount`` to the ``soci`` command tree."""
    p = sub.add_parser(
        "mount",
        parents=parents,
        help="lazily mount an image from its registry (read-only, foreground)",
        description="Mount IMAGE_REF read-only at MOUNTPOINT, loading its layers lazily from the registry "
        "through their SOCI index (found as the snapshotter finds it). Stays in the foreground until "
        "interrupted or until MOUNTPOINT is unmounted, then prints what it fetched. Credentials: --user, "
        "else the credential chain of the config (Docker config; Kubernetes secrets when enabled).",
    )
    p.add_argument("image_ref", metavar="IMAGE_REF", help="image reference (registry/repo[:tag][@digest])")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    p.add_argument(
        "--user",
        "-u",
        metavar="USER[:PASSWORD]",
        help="registry credentials; USER alone asks for the password when stdin is a terminal",
    )
    p.add_argument("--plain-http", action="store_true", help="use plain http (not https) for the registry")
    p.add_argument("--layer", metavar="DIGEST", help="mount only this layer (a digest or a unique prefix)")
    p.add_argument("--index-digest", metavar="DIGEST", default="", help="use this SOCI index")
    p.add_argument("--platform", "-p", metavar="OS/ARCH[/VARIANT]", help="platform (default: this host's)")
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"snapshotter config.toml (default {config_mod.DEFAULT_CONFIG_PATH} when it exists)",
    )
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------------------
# set-up


def load_config(path: str | None) -> config_mod.Config:
    """``--config`` (must exist), else the default path when present, else the defaults."""
    if path:
        if not os.path.exists(path):
            raise NotFound(f"config file {path!r}: no such file")
        return config_mod.load(path)
    if os.path.exists(config_mod.DEFAULT_CONFIG_PATH):
        return config_mod.load(config_mod.DEFAULT_CONFIG_PATH)
    return config_mod.Config()


@dataclass
class _Creds:
    credential: Credential
    description: str
    chain: BuiltChain | None = None

    def used(self, host: str) -> str:
        if self.chain is None:
            return self.description
        answer = self.chain.chain.last_answer(host)
        if answer is None or answer.credentials is None:
            return f"no credentials for {host} in the credential chain (anonymous)"
        return f"credentials from {answer.credentials.source or answer.source}"

    def stop(self) -> None:
        if self.chain is not None:
            self.chain.stop()


def credentials(args: argparse.Namespace, cfg: config_mod.Config, host: str) -> _Creds:
    """``--user`` first, then the credential chain of the config."""
    if args.user is not None:
        user, password = split_user(args.user)
        if password is None:
            if not sys.stdin.isatty():
                raise InvalidArgument(
                    f"--user {user}: no password given and stdin is not a terminal to ask for one; "
                    "pass --user USER:PASSWORD or use the Docker config"
                )
            password = getpass.getpass(f"Password for {user} at {host}: ")
        creds = Credentials(username=user, password=password, source="--user")

        def static(_host: str, _ref: str) -> Credentials:
            return creds

        return _Creds(static, f"credentials from --user {user}")
    built = build_chain(cfg)
    return _Creds(built.chain, "the credential chain", built)


def mount_options(cfg: config_mod.Config) -> MountOptions:
    """The FUSE session's options from the config: the ``[fuse]`` timeouts (3600 s each unless ``[fuse]
    long_timeouts = false``) and tar header verification (off with ``disable_verification = true``)."""
    fuse = cfg.fuse
    attr, entry, negative = fuse.timeouts()
    if fuse.long_timeouts:
        ignored = [
            f"{k} = {v}"
            for k, v in (
                ("attr_timeout", fuse.attr_timeout),
                ("entry_timeout", fuse.entry_timeout),
                ("negative_timeout", fuse.negative_timeout),
            )
            if v != 1
        ]
        if ignored:
            log.warning(
                "[fuse] %s not used: [fuse] long_timeouts is true (%g s); set it to false to use them",
                ", ".join(ignored),
                fuse.LONG_TIMEOUT,
            )
    return MountOptions(
        attr_timeout=attr,
        entry_timeout=entry,
        negative_timeout=negative,
        verify=not cfg.disable_verification,
    )


def _pick_layer(plan: ImagePlan, wanted: str) -> LayerPlan:
    w = wanted if ":" in wanted else "sha256:" + wanted
    hits = [x for x in plan.layers if x.descriptor.digest.startswith(w)]
    if len(hits) != 1:
        what = "is not a layer of" if not hits else "names several layers of"
        raise NotFound(f"--layer {wanted} {what} image {plan.ref} (manifest {plan.manifest.digest})")
    return hits[0]


# ---------------------------------------------------------------------------------------------------------
# mountinfo


def _mount_id(path: Path) -> str | None:
    """The id of the topmost mount at ``path`` (``/proc/self/mountinfo``), or None."""
    want = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            mp = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if mp == want:
                found = fields[0]
    return found


def _mount_alive(mount_id: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split(" ", 1)[0] == mount_id for line in f)


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise FailedPrecondition(f"{' '.join(cmd[:3])} ... failed: {res.stderr.strip() or res.returncode}")


def _mount_top(dirs: list[Path], mountpoint: Path) -> str:
    """Overlay of ``dirs`` (topmost first) or a read-only bind of the only one at ``mountpoint``."""
    if len(dirs) == 1:
        _run(["mount", "--bind", "-o", "ro", str(dirs[0]), str(mountpoint)])
    else:
        lower = ":".join(str(d) for d in dirs)
        _run(["mount", "-t", "overlay", "soci-overlay", "-o", f"ro,lowerdir={lower}", str(mountpoint)])
    mid = _mount_id(mountpoint)
    if mid is None:
        raise FailedPrecondition(f"{mountpoint}: mounted, but not in /proc/self/mountinfo")
    return mid


def _unmount_top(mountpoint: Path, mount_id: str) -> None:
    if not _mount_alive(mount_id):
        return
    res = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True, check=False)
    if res.returncode != 0 and _mount_alive(mount_id):
        log.warning("umount %s failed (%s); detaching it lazily", mountpoint, res.stderr.strip())
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


# ---------------------------------------------------------------------------------------------------------
# the foreground session


@dataclass
class _Run:
    args: argparse.Namespace
    plan: ImagePlan
    layers: list[LayerPlan]  # base first
    source: ImageSource
    cache: BlockCache
    span_config: SpanConfig
    background: BackgroundConfig
    mountpoint: Path
    fuse_dir: Path
    mount_options: MountOptions = field(default_factory=MountOptions)
    opened: list[OpenedLayer] = field(default_factory=list)
    mount_id: str | None = None
    ended_by: str = ""
    out: Callable[[str], None] = print


async def _serve(ctx: _Run) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            session: Session = await nursery.start(serve_layers, ctx.fuse_dir, ctx.mount_options)
            work = trio.CancelScope()

            async def on_signal() -> None:
                async for signum in signals:
                    ctx.ended_by = f"signal {signal.Signals(signum).name}"
                    work.cancel()
                    return

            nursery.start_soon(on_signal)
            fetcher = BackgroundFetcher(ctx.background)
            await nursery.start(fetcher.serve)
            try:
                with work:
                    await _mount_and_wait(ctx, session, fetcher)
            finally:
                with trio.CancelScope(shield=True):
                    if ctx.mount_id is not None:
                        await trio.to_thread.run_sync(_unmount_top, ctx.mountpoint, ctx.mount_id)
                    for layer in ctx.opened:
                        fetcher.unregister(layer.data)
                        layer.close()
                session.close()
                nursery.cancel_scope.cancel()


async def _mount_and_wait(ctx: _Run, session: Session, fetcher: BackgroundFetcher) -> None:
    fetch_limiter = trio.CapacityLimiter(ctx.span_config.fetch_threads)
    inflate_limiter = trio.CapacityLimiter(ctx.span_config.inflate_threads or os.cpu_count() or 1)
    n = len(ctx.layers)
    dirs: list[Path] = []
    for i, plan in enumerate(ctx.layers, 1):
        layer = await open_layer(
            ctx.source,
            plan,
            ctx.cache,
            span_config=ctx.span_config,
            fetch_limiter=fetch_limiter,
            inflate_limiter=inflate_limiter,
        )
        ctx.opened.append(layer)
        name = plan.descriptor.digest.replace(":", "-", 1)
        dirs.append(await session.add_layer(name, layer.take_ztoc(), layer.data, **layer.serve_options()))
        spans = layer.data.span_count
        if layer.lazy:
            assert plan.ztoc_descriptor is not None
            cached = layer.data.statistics()["states"]["uncompressed"]
            fetcher.register(layer.data)
            ctx.out(
                f"layer {i}/{n} {plan.descriptor.digest} lazy: zTOC {plan.ztoc_descriptor.digest}, "
                f"{spans} spans, {cached} cached"
            )
        else:
            how = f"fetched the whole blob ({layer.downloaded} bytes)" if layer.downloaded else "blob stored"
            ctx.out(
                f"layer {i}/{n} {plan.descriptor.digest} local: no zTOC in the index; {how}, "
                f"indexed here ({spans} spans)"
            )
    ctx.mount_id = await trio.to_thread.run_sync(_mount_top, dirs[::-1], ctx.mountpoint)
    lazy = sum(1 for x in ctx.opened if x.lazy)
    kind = "overlay of" if len(dirs) > 1 else "bind mount of"
    ctx.out(f"soci index {ctx.plan.index_digest} (v{ctx.plan.index_version}, found by {ctx.plan.how})")
    ctx.out(
        f"mounted {ctx.plan.ref} (manifest {ctx.plan.manifest.digest}) at {ctx.mountpoint} "
        f"({kind} {len(dirs)} layer{'s' if len(dirs) != 1 else ''}: {lazy} lazy, {len(dirs) - lazy} local)"
    )
    sys.stdout.flush()
    while _mount_alive(ctx.mount_id):
        await trio.sleep(POLL_SECONDS)
    ctx.ended_by = f"{ctx.mountpoint} was unmounted"
    ctx.mount_id = None


def _report(ctx: _Run, host: str) -> list[str]:
    lazy = [x for x in ctx.opened if x.lazy]
    stats = [x.data.statistics() for x in lazy]
    total = sum(s["bytes_fetched"] for s in stats)
    spans = sum(s["spans_fetched"] for s in stats)
    requests = sum(s["requests"] for s in stats)
    lines = [f"fetched {total} bytes in {spans} spans ({requests} requests) from {host}"]
    for x, s in zip(lazy, stats, strict=True):
        lines.append(
            f"layer {x.digest} lazy: fetched {s['bytes_fetched']} bytes in {s['spans_fetched']} spans "
            f"({s['requests']} requests), {s['fetched_percent']:.1f}% of the blob fetched or cached, "
            f"{s['cache_hits']} cache hits"
        )
    for x in ctx.opened:
        if not x.lazy:
            lines.append(f"layer {x.digest} local: downloaded {x.downloaded} bytes")
    return lines


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if len(inner) != 1:
            break
        exc = inner[0]
    return exc


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    ref = reference.parse(args.image_ref, normalize=True)
    mountpoint = Path(os.path.abspath(args.mountpoint))
    if not mountpoint.exists():
        raise NotFound(f"mountpoint {str(mountpoint)!r}: no such directory")
    if not mountpoint.is_dir():
        raise InvalidArgument(f"mountpoint {str(mountpoint)!r} is not a directory")
    root = Path(args.root)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FailedPrecondition(f"root {str(root)!r}: cannot create: {exc.strerror}") from exc
    host = ref.registry_host
    creds = credentials(args, cfg, host)
    try:
        with RegistryClient(
            creds.credential, ref=str(ref), config=cfg.registry_config(), plain_http=args.plain_http
        ) as client:
            try:
                return _run_mount(args, cfg, ref, root, mountpoint, client, host)
            except Unauthenticated as exc:
                raise Unauthenticated(
                    f"registry {host} refused the request ({creds.used(host)}): {exc}"
                ) from exc
    finally:
        creds.stop()


def _run_mount(
    args: argparse.Namespace,
    cfg: config_mod.Config,
    ref: reference.Reference,
    root: Path,
    mountpoint: Path,
    client: RegistryClient,
    host: str,
) -> int:
    source = ImageSource(client, ref, ContentStore(root / "content"))
    plan = source.plan(
        platform=args.platform, index_digest=args.index_digest, v2=cfg.pull_modes.soci_v2.enable
    )
    if plan.how == "v1 referrers" and not cfg.pull_modes.soci_v1.enable:
        print(
            f"note: the SOCI index was found through the referrers (v1); the daemon uses it only with "
            f"[pull_modes.soci_v1] enable = true (config {cfg.source or 'defaults'})"
        )
    layers = [_pick_layer(plan, args.layer)] if args.layer else list(plan.layers)
    if not layers:
        raise FailedPrecondition(f"image {ref} has no layers to mount")
    cache = BlockCache(root, CacheConfig.from_section(cfg.directory_cache))
    fuse_parent = root / "mnt"
    fuse_parent.mkdir(mode=0o700, exist_ok=True)
    fuse_dir = fuse_parent / f"{os.getpid()}-{secrets.token_hex(4)}"
    fuse_dir.mkdir(mode=0o700)
    ctx = _Run(
        args=args,
        plan=plan,
        layers=layers,
        source=source,
        cache=cache,
        span_config=SpanConfig.from_blob_section(cfg.blob),
        background=BackgroundConfig.from_section(cfg.background_fetch),
        mountpoint=mountpoint,
        fuse_dir=fuse_dir,
        mount_options=mount_options(cfg),
        out=lambda line: print(line, flush=True),
    )
    try:
        trio.run(_serve, ctx)
    except BaseException as exc:
        inner = _unwrap(exc)
        if inner is not exc and isinstance(inner, SociError | OSError | KeyboardInterrupt):
            raise inner from None
        raise
    finally:
        with contextlib.suppress(OSError):
            fuse_dir.rmdir()
    print(f"unmounted {mountpoint} ({ctx.ended_by or 'done'})")
    for line in _report(ctx, host):
        print(line)
    return 0
