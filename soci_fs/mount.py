"""The one FUSE session of the process: mount, serve, add/remove layers, unmount.

The choice: pyfuse3 keeps one FUSE session per process (module-level state), so the daemon mounts **one**
file system and serves every lazily loaded layer as a subdirectory of its root (``<mountpoint>/<name>``);
overlayfs lowerdirs point at those directories. Adding or removing a layer is a dictionary update plus a
kernel invalidation, never a mount. A second concurrent :func:`serve_layers` raises ``FailedPrecondition``.

Owns:

* :class:`MountOptions` (also: the kernel cache timeouts, 3600 s by default since layers are immutable, and
  ``verify``, the session's default for tar header verification) and the mount options we pass:
  ``fsname=soci``, ``subtype=soci`` (mount source ``soci``, type ``fuse.soci``); ``ro`` (the kernel answers
  EROFS to writes before they reach us; overlay only needs read-only lowers); ``default_permissions`` (the
  kernel checks mode bits against the cached attributes, so no ``access`` round trips and, with
  ``allow_other``, no user can read a 0600 file of another; root bypasses as usual); ``allow_other`` (on by
  default: containers and the CRI run as other users; root needs no fuse.conf change).
* ``min_tasks`` 4 / ``max_tasks`` 64: pyfuse3 keeps ``min_tasks`` idle readers (with 1 it starts and ends
  a task for almost every request under load) and at most 64 concurrent request tasks (the kernel keeps
  up to ``max_background`` = 12 asynchronous readahead requests in flight per connection, plus
  synchronous requests from many processes; reads wait in worker threads, so a waiting task costs
  little). Raise it only together with the read limiter.
* After mounting (and after FUSE_INIT, which caps it) the mount's readahead is raised (``read_ahead_kb``,
  default 1024) so sequential reads arrive as 1 MiB requests (performance-anchors.md §5: about 2x).
* :func:`serve_layers` (``task_status`` style): init, serve, and on any exit (unmount from outside,
  :meth:`Session.close`, cancellation, error) unmount -- ``fuse_session_unmount``, then a check of
  ``/proc/self/mountinfo`` with ``fusermount3 -u -z`` / ``umount -l`` as fallbacks.
* :class:`Session` -- ``add_layer`` / ``remove_layer`` / ``close`` on the trio loop of the session.
* :class:`ThreadedSession` -- the session in a background thread with its own trio loop, with thread-safe
  ``add_layer`` / ``remove_layer`` / ``close`` (for the threaded gRPC daemon, tests and simple CLIs).

Will not: choose layer names, resolve or fetch layers, or mount overlayfs (the snapshotter does).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from soci_fs.errors import FailedPrecondition, NotFound
from soci_fs.inodes import OPAQUE_TRUSTED, InodeTree
from soci_fs.operations import LayerData, LayerOperations
from soci_fs.ztoc import Ztoc

__all__ = ["MountOptions", "Session", "ThreadedSession", "is_mounted", "serve_layers", "unmount"]

log = logging.getLogger(__name__)

_active_lock = threading.Lock()
_active = False


@dataclass(frozen=True)
class MountOptions:
    """How the session is mounted and how long the kernel may cache answers (seconds)."""

    fsname: str = "soci"
    allow_other: bool = True
    default_permissions: bool = True
    entry_timeout: float = 3600.0
    attr_timeout: float = 3600.0
    negative_timeout: float = 3600.0
    min_tasks: int = 4
    max_tasks: int = 64
    read_ahead_kb: int | None = 1024
    opaque_keys: tuple[bytes, ...] = (OPAQUE_TRUSTED,)
    debug: bool = False
    verify: bool = True  # check a file's tar header before its first read (config disable_verification)
    # ``observer(operation, seconds, errno)`` after every FUSE request (errno 0 on success): metrics
    observer: Callable[[str, float, int], None] | None = None

    def fuse_options(self) -> set[str]:
        opts = {f"fsname={self.fsname}", f"subtype={self.fsname}", "ro"}
        if self.default_permissions:
            opts.add("default_permissions")
        if self.allow_other:
            opts.add("allow_other")
        if self.debug:
            opts.add("debug")
        return opts


def _encode(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else os.fsencode(name)


class Session:
    """A mounted session. Use on the trio loop that runs :func:`serve_layers`."""

    def __init__(self, mountpoint: Path, ops: LayerOperations, options: MountOptions) -> None:
        self.mountpoint = mountpoint
        self.ops = ops
        self.options = options
        self._closing = False

    async def add_layer(
        self,
        name: str | bytes,
        layer: Ztoc | InodeTree,
        data: LayerData,
        *,
        digest: str = "",
        size: int | None = None,
        verify: bool | None = None,
        disable_xattrs: bool = False,
    ) -> Path:
        """Serve ``layer`` (its zTOC, or a tree built already) at ``<mountpoint>/<name>``.

        The tree is built in a worker thread. Returns the layer directory.

        Args:
            digest: the layer blob digest: names ``.soci-snapshotter/<digest>.json`` (default: ``data.digest``
                when it has one, else ``name``).
            size: the blob length the state file reports (default: what ``data`` knows).
            verify: check tar headers on first reads (default: ``MountOptions.verify``).
            disable_xattrs: the zTOC descriptor's ``com.amazon.soci.disable-xattrs``: the layer shows no
                xattrs (see ``soci_fs.operations`` for why this is not ENOSYS).

        Raises:
            InvalidArgument: ``name`` is not one path component.
            AlreadyExists: ``name`` is served already.
            FormatError: the zTOC does not describe a valid tree.
        """
        bname = _encode(name)
        if isinstance(layer, InodeTree):
            tree = layer
        else:
            tree = await trio.to_thread.run_sync(
                lambda: InodeTree.from_ztoc(layer, opaque_keys=self.options.opaque_keys)
            )
        self.ops.add_layer(
            bname,
            tree,
            data,
            digest=digest,
            size=size,
            verify=self.options.verify if verify is None else verify,
            xattrs=not disable_xattrs,
        )
        log.info("serving layer %r (%d inodes) at %s", bname, tree.max_id, self.mountpoint)
        await self._invalidate(bname)
        return self.mountpoint / os.fsdecode(bname)

    async def remove_layer(self, name: str | bytes) -> None:
        """Stop serving ``name``; the kernel forgets the directory entry, its inodes answer ENOENT.

        Raises:
            NotFound: ``name`` is not served.
        """
        bname = _encode(name)
        self.ops.remove_layer(bname)
        log.info("removed layer %r from %s", bname, self.mountpoint)
        await self._invalidate(bname)

    async def _invalidate(self, bname: bytes) -> None:
        # The notification may block until a related request is answered, so it leaves the loop.
        def notify() -> None:
            for fn, args in (
                (pyfuse3.invalidate_entry, (pyfuse3.ROOT_INODE, bname)),
                (pyfuse3.invalidate_inode, (pyfuse3.ROOT_INODE, True)),
            ):
                try:
                    fn(*args)
                except OSError as exc:
                    if exc.errno not in (2, 38):  # ENOENT: the kernel never saw it; ENOSYS: too old
                        log.warning("kernel invalidation of %r failed: %s", bname, exc)

        if not self._closing:
            await trio.to_thread.run_sync(notify)

    def close(self) -> None:
        """Ask the session to end; :func:`serve_layers` then unmounts and returns."""
        if not self._closing:
            self._closing = True
            pyfuse3.terminate()

    def statistics(self) -> dict[str, int]:
        return {"layers": len(self.ops.layers.by_name), "open_handles": len(self.ops._handles)}


# -------------------------------------------------------------------------------------- mount helpers


def _mountinfo_entry(mountpoint: Path) -> tuple[str, str] | None:
    """``(major:minor, fstype)`` of the mount at ``mountpoint`` from /proc/self/mountinfo (no FUSE I/O)."""
    want = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                mp = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                if mp == want:
                    sep = fields.index("-")
                    found = (fields[2], fields[sep + 1])  # the last mount on top wins
    except OSError:
        return None
    return found


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """True when something is mounted at ``mountpoint`` (read from /proc/self/mountinfo)."""
    return _mountinfo_entry(Path(mountpoint)) is not None


def unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Lazily unmount a FUSE mount that is still there: ``fusermount3 -u -z``, else ``umount -l``."""
    mp = Path(mountpoint)
    for cmd in (["fusermount3", "-u", "-z", str(mp)], ["umount", "-l", str(mp)]):
        if not is_mounted(mp):
            return
        if shutil.which(cmd[0]) is None:
            continue
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            log.warning("%s failed: %s", " ".join(cmd), res.stderr.strip())
    if is_mounted(mp):
        log.error("could not unmount %s", mp)


def _set_read_ahead(mountpoint: Path, kb: int) -> None:
    entry = _mountinfo_entry(mountpoint)
    if entry is None:
        return
    path = Path("/sys/class/bdi") / entry[0] / "read_ahead_kb"
    try:
        path.write_text(f"{kb}\n")
    except OSError as exc:
        log.debug("cannot set %s to %d: %s", path, kb, exc)


async def serve_layers(
    mountpoint: str | os.PathLike[str],
    options: MountOptions | None = None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount the session at ``mountpoint`` and serve it until it is closed, unmounted or cancelled.

    ``task_status.started(session)`` hands the :class:`Session` to the caller once the mount exists.
    Whatever ends the session, the mountpoint is unmounted before this returns (or raises).

    Raises:
        FailedPrecondition: another session is active in this process.
        RuntimeError: pyfuse3 could not mount (e.g. no /dev/fuse).
    """
    global _active
    options = options or MountOptions()
    mp = Path(os.path.abspath(mountpoint))
    with _active_lock:
        if _active:
            raise FailedPrecondition("a FUSE session is active in this process already (pyfuse3 allows one)")
        _active = True
    try:
        ops = LayerOperations(
            entry_timeout=options.entry_timeout,
            attr_timeout=options.attr_timeout,
            negative_timeout=options.negative_timeout,
        )
        ops.observer = options.observer
        pyfuse3.init(ops, str(mp), options.fuse_options())
        log.info("mounted the FUSE session at %s", mp)
        session = Session(mp, ops, options)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pyfuse3.main, options.min_tasks, options.max_tasks)
                # One round trip from a worker thread: the kernel holds requests until FUSE_INIT is
                # answered, so after it the mount is usable and INIT's readahead cap is in place.
                await trio.to_thread.run_sync(os.statvfs, mp)
                if options.read_ahead_kb:
                    await trio.to_thread.run_sync(_set_read_ahead, mp, options.read_ahead_kb)
                task_status.started(session)
        finally:
            session._closing = True
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                log.exception("pyfuse3.close failed for %s", mp)
            if is_mounted(mp) and (entry := _mountinfo_entry(mp)) and entry[1].startswith("fuse"):
                unmount(mp)
            log.info("unmounted the FUSE session at %s", mp)
    finally:
        with _active_lock:
            _active = False


class ThreadedSession:
    """:func:`serve_layers` in a background thread with its own trio loop.

    Every method is thread-safe and blocks until the loop has done the work. Use as a context manager::

        with ThreadedSession(mnt) as s:
            path = s.add_layer("layer-1", ztoc, data)
    """

    def __init__(self, mountpoint: str | os.PathLike[str], options: MountOptions | None = None) -> None:
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.options = options or MountOptions()
        self._session: Session | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._nursery: trio.Nursery | None = None

    def start(self, timeout: float = 30.0) -> ThreadedSession:
        """Mount and start serving; returns once the mount exists.

        Raises:
            RuntimeError / FailedPrecondition: the mount failed (the original error is chained).
        """
        self._thread = threading.Thread(target=self._run, name="soci-fuse", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"FUSE session at {self.mountpoint} did not start within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"FUSE session at {self.mountpoint} failed to start") from self._error
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("FUSE session at %s ended with an error", self.mountpoint)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await serve_layers(self.mountpoint, self.options, task_status=task_status)
                finally:  # the session ended: so do the services started beside it
                    nursery.cancel_scope.cancel()

            self._session = await nursery.start(serve)
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._session is None or self._token is None:
            raise FailedPrecondition("the FUSE session is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def call(self, afn: Callable[..., Any], *args: Any) -> Any:
        """Run ``await afn(*args)`` on the session's trio loop and return its result (thread-safe).

        For objects that must live on that loop, e.g. opening a ``RemoteLayer`` before adding it.
        """
        return self._call(afn, *args)

    def start_service(self, serve: Callable[..., Any]) -> Any:
        """Start ``serve(task_status=...)`` (trio's ``nursery.start`` protocol) beside the session, on its
        loop; it is cancelled when the session ends. Returns the value ``serve`` passed to ``started``."""
        nursery = self._nursery
        if nursery is None:
            raise FailedPrecondition("the FUSE session is not running")
        return self._call(nursery.start, serve)

    def add_layer(self, name: str | bytes, layer: Ztoc | InodeTree, data: LayerData, **kw: Any) -> Path:
        """Thread-safe :meth:`Session.add_layer` (same keyword arguments)."""
        return self._call(functools.partial(self._session.add_layer, **kw), name, layer, data)  # type: ignore[union-attr]

    def remove_layer(self, name: str | bytes) -> None:
        """Thread-safe :meth:`Session.remove_layer`."""
        self._call(self._session.remove_layer, name)  # type: ignore[union-attr]

    def close(self, timeout: float = 30.0) -> None:
        """End the session and wait until it is unmounted (idempotent)."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive() and self._session is not None and self._token is not None:
            try:
                trio.from_thread.run_sync(self._session.close, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        thread.join(timeout)
        if thread.is_alive():
            log.error("FUSE session thread at %s did not end within %s s", self.mountpoint, timeout)
        elif is_mounted(self.mountpoint) and (e := _mountinfo_entry(self.mountpoint)) and "fuse" in e[1]:
            unmount(self.mountpoint)
        self._thread = None

    def __enter__(self) -> ThreadedSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def session(self) -> Session:
        if self._session is None:
            raise NotFound("the FUSE session is not running")
        return self._session
