"""The snapshotter core: containerd's snapshot operations over local overlay directories.

Owns ``<root>/snapshotter/``: ``metadata.db`` (:mod:`soci_grpc.metastore`) and ``snapshots/<id>/{fs,work}``.
Each operation is one metastore transaction; a new snapshot's directories are built in
``snapshots/new-XXXX`` and renamed to ``snapshots/<id>`` inside that transaction, so a crash leaves either
nothing or a temp dir that :meth:`Snapshotter.cleanup` removes. Remove only deletes metadata; directories
of removed snapshots go at the next Cleanup (as upstream's asynchronous removal).

Mounts are the ones containerd's overlayfs snapshotter returns (snapshotter.md §6): a ``bind`` mount for a
snapshot without parents (``rw``/``ro`` + ``rbind``) and for a view of exactly one parent; otherwise one
``overlay`` mount with ``workdir=``/``upperdir=`` (active only) and ``lowerdir=`` (nearest parent first).

Remote layers: :class:`LayerProvider` is the hook through which Prepare will hand a layer-unpack snapshot
(labels carry ``containerd.io/snapshot.ref``) to the lazy/local layer machinery. When the provider reports
the layer ready, the core commits the snapshot under the ref name and raises ``AlreadyExists`` (gRPC
ALREADY_EXISTS), which tells containerd not to download the layer. The daemon's provider is
:class:`soci_grpc.layers.RemoteLayers`; a provider that raises something unexpected is logged and the layer is
left to containerd (Prepare then returns the ordinary mounts). Cleanup tells the provider which snapshots are
gone (``release_layer``) before their directories are removed, so lazy layers are unmounted first.

Will not: pull or unpack layers, mount anything (containerd mounts what we return), or know about grpc.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from soci_fs.errors import AlreadyExists, InvalidArgument
from soci_grpc.metastore import Info, Kind, MetaStore, Snapshot, Usage

log = logging.getLogger(__name__)

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"


@dataclass(frozen=True)
class Mount:
    """One mount as containerd's ``containerd.types.Mount`` (``target`` stays empty)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True)
class LayerRequest:
    """What a :class:`LayerProvider` gets for a layer-unpack Prepare."""

    key: str
    ref: str  # the chainID the layer will be committed as
    snapshot_id: str
    mountpoint: Path  # snapshots/<id>/fs: where the layer's content must appear
    parent_dirs: tuple[Path, ...]  # parents' fs dirs, nearest first
    labels: Mapping[str, str]


@dataclass(frozen=True)
class LayerResult:
    """A provided layer: labels to add at commit; usage measured on ``fs`` only for unpacked layers."""

    labels: Mapping[str, str] = field(default_factory=dict)
    compute_usage: bool = False


class LayerProvider(Protocol):
    """The hook for remote (lazy) and snapshotter-unpacked layers.

    ``provide_layer`` returns a :class:`LayerResult` when the layer's content is in place at
    ``request.mountpoint`` (then Prepare commits it and answers ALREADY_EXISTS), or ``None`` to defer to
    containerd (Prepare returns the normal mounts and containerd unpacks and commits the layer).
    """

    def provide_layer(self, request: LayerRequest) -> LayerResult | None: ...

    def release_layer(self, snapshot_id: str) -> None: ...


class Snapshotter:
    """containerd's snapshot operations over ``root`` (usually ``<daemon root>/snapshotter``)."""

    def __init__(self, root: str | os.PathLike[str], *, layer_provider: LayerProvider | None = None) -> None:
        self.root = Path(root).absolute()
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)
        self.ms = MetaStore(self.root / "metadata.db")
        self.layer_provider = layer_provider

    def close(self) -> None:
        self.ms.close()

    # -- paths and mounts ----------------------------------------------------------------------------

    def fs_dir(self, sid: str) -> Path:
        return self.snapshots_dir / sid / "fs"

    def work_dir(self, sid: str) -> Path:
        return self.snapshots_dir / sid / "work"

    def _mounts(self, s: Snapshot) -> list[Mount]:
        if not s.parent_ids:
            mode = "rw" if s.kind == Kind.ACTIVE else "ro"
            return [Mount("bind", str(self.fs_dir(s.id)), (mode, "rbind"))]
        if s.kind == Kind.VIEW and len(s.parent_ids) == 1:
            return [Mount("bind", str(self.fs_dir(s.parent_ids[0])), ("ro", "rbind"))]
        options: list[str] = []
        if s.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_dir(s.id)}", f"upperdir={self.fs_dir(s.id)}"]
        options.append("lowerdir=" + ":".join(str(self.fs_dir(p)) for p in s.parent_ids))
        return [Mount("overlay", "overlay", tuple(options))]

    # -- operations ----------------------------------------------------------------------------------

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        with self.ms.transaction(writable=True) as tx:
            s = tx.create(kind, key, parent, labels)
            tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
            try:
                (tmp / "fs").mkdir(0o755)
                if s.parent_ids:
                    st = self.fs_dir(s.parent_ids[0]).stat()
                    os.chown(tmp / "fs", st.st_uid, st.st_gid)
                if kind == Kind.ACTIVE:
                    (tmp / "work").mkdir(0o711)
                tmp.rename(self.snapshots_dir / s.id)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.debug("created %s snapshot", kind.name.lower(), extra={"key": key, "parent": parent, "id": s.id})
        return s

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """A new ACTIVE snapshot ``key`` on committed ``parent``; its mounts.

        Raises:
            AlreadyExists: ``key`` exists; or (layer provider) the layer is ready, committed as its ref.
            NotFound: no ``parent``.  InvalidArgument: ``parent`` not committed, bad labels.
        """
        labels = dict(labels or {})
        s = self._create(Kind.ACTIVE, key, parent, labels)
        ref = labels.get(LABEL_SNAPSHOT_REF, "")
        if ref and self.layer_provider is not None:
            self._provide_layer(key, ref, s, labels)
        return self._mounts(s)

    def _provide_layer(self, key: str, ref: str, s: Snapshot, labels: dict[str, str]) -> None:
        """Ask the provider for the layer; when it is in place commit it as ``ref`` and say ALREADY_EXISTS."""
        assert self.layer_provider is not None
        req = LayerRequest(
            key, ref, s.id, self.fs_dir(s.id), tuple(self.fs_dir(p) for p in s.parent_ids), dict(labels)
        )
        try:
            result = self.layer_provider.provide_layer(req)
        except Exception:
            log.exception("layer provider failed; leaving the layer to containerd", extra={"key": key})
            result = None
        if result is None:
            return
        try:
            self.commit(ref, key, {**labels, **result.labels}, compute_usage=result.compute_usage)
        except AlreadyExists:
            pass
        raise AlreadyExists(f'target snapshot "{ref}": already exists')

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """A new read-only VIEW snapshot ``key`` of committed ``parent``; its mounts."""
        return self._mounts(self._create(Kind.VIEW, key, parent, dict(labels or {})))

    def mounts(self, key: str) -> list[Mount]:
        """Mounts of active or view ``key`` (FailedPrecondition for a committed one)."""
        with self.ms.transaction() as tx:
            return self._mounts(tx.snapshot(key))

    def commit(
        self, name: str, key: str, labels: Mapping[str, str] | None = None, *, compute_usage: bool = True
    ) -> None:
        """Commit active ``key`` as ``name`` with ``labels``; usage of its ``fs`` is measured and stored."""
        with self.ms.transaction(writable=True) as tx:
            s = tx.snapshot(key)
            usage = disk_usage(self.fs_dir(s.id)) if compute_usage and s.kind == Kind.ACTIVE else Usage()
            sid = tx.commit(key, name, usage, labels)
        log.debug("committed snapshot", extra={"key": key, "snapshot_name": name, "id": sid})

    def remove(self, key: str) -> None:
        """Delete ``key`` from the metadata (FailedPrecondition if it has children); Cleanup removes its
        directory."""
        with self.ms.transaction(writable=True) as tx:
            sid, _ = tx.remove(key)
        log.debug("removed snapshot", extra={"key": key, "id": sid})

    def stat(self, key: str) -> Info:
        with self.ms.transaction() as tx:
            return tx.info(key)[1]

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change labels (paths ``labels`` or ``labels.<key>``; none = all labels); the updated Info."""
        with self.ms.transaction(writable=True) as tx:
            return tx.update(info, tuple(fieldpaths))

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching any of ``filters`` (containerd filter syntax; none = all), by name."""
        match = compile_filters(filters)
        with self.ms.transaction() as tx:
            return [i for i in tx.walk() if match(i)]

    def usage(self, key: str) -> Usage:
        """ACTIVE: measured now on its ``fs``; otherwise the value stored at Commit."""
        with self.ms.transaction() as tx:
            sid, info, stored = tx.info(key)
            if info.kind == Kind.ACTIVE:
                return disk_usage(self.fs_dir(sid))
            return stored

    def remote_snapshots(self, label: str) -> list[tuple[str, Path, dict[str, str]]]:
        """``(id, fs dir, labels)`` of each committed snapshot carrying ``label`` (to serve them again)."""
        out = []
        with self.ms.transaction() as tx:
            for info in tx.walk():
                if info.kind == Kind.COMMITTED and label in info.labels:
                    sid = tx.info(info.name)[0]
                    out.append((sid, self.fs_dir(sid), dict(info.labels)))
        return out

    def cleanup(self) -> list[str]:
        """Remove every directory under ``snapshots/`` that belongs to no snapshot; returns their names."""
        with self.ms.transaction() as tx:
            ids = tx.ids()
            stale = sorted(d.name for d in self.snapshots_dir.iterdir() if d.name not in ids)
        for name in stale:
            if self.layer_provider is not None:
                try:
                    self.layer_provider.release_layer(name)
                except Exception:
                    log.exception("layer provider failed to release snapshot %s", name)
            fs = self.fs_dir(name)
            if os.path.ismount(fs):
                log.warning("snapshot directory %s is still a mountpoint; detaching it", fs)
                subprocess.run(["umount", "-l", str(fs)], capture_output=True, check=False)
            shutil.rmtree(self.snapshots_dir / name, ignore_errors=True)
        if stale:
            log.debug("cleaned up snapshot directories", extra={"dirs": ",".join(stale)})
        return stale


def disk_usage(path: Path) -> Usage:
    """Allocated bytes (``st_blocks * 512``) and distinct inodes under ``path``, ``path`` included."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def add(st: os.stat_result) -> None:
        nonlocal size
        k = (st.st_dev, st.st_ino)
        if k not in seen:
            seen.add(k)
            size += st.st_blocks * 512

    def walk(d: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                add(e.stat(follow_symlinks=False))
                if e.is_dir(follow_symlinks=False):
                    walk(e.path)

    with contextlib.suppress(FileNotFoundError):
        add(os.lstat(path))
        walk(str(path))
    return Usage(size, len(seen))


# --------------------------------------------------------------------------------------------------------
# containerd filter strings over snapshot Info
#
# A filter string is selectors joined by ","; all must match. Several strings: any may match.
# selector = fieldpath [op value]; op is == != ~= (regexp search); no op = the field is present.
# fieldpath = field ("." field)*, a field bare ([A-Za-z0-9_]+) or quoted; values bare (up to "," ) or
# quoted ("..." with backslash escapes, or /.../ and |...| taken literally, handy for regexps).
# Fields: name, parent, kind (active/view/committed), labels.<key> (the rest of the path joined by ".").

_TOKEN = re.compile(
    r'\s*(?:(?P<op>==|!=|~=)|(?P<sep>[,.])|"(?P<dq>(?:[^"\\]|\\.)*)"|/(?P<sl>[^/]*)/|'
    r"\|(?P<bar>[^|]*)\||(?P<bare>[^\s,.=!~\"]+))"
)
_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


def _field(info: Info, path: tuple[str, ...]) -> tuple[str, bool]:
    head, rest = path[0], path[1:]
    # name and parent are always "present" (containerd's snapshot adaptor): ``parent==""`` selects the
    # snapshots without a parent, which containerd's metadata layer relies on to find a remote layer at the
    # bottom of an image after an ALREADY_EXISTS
    if head == "name" and not rest:
        return info.name, True
    if head == "parent" and not rest:
        return info.parent, True
    if head == "kind" and not rest:
        return _KIND_NAMES.get(info.kind, ""), True
    if head == "labels" and rest:
        key = ".".join(rest)
        return info.labels.get(key, ""), key in info.labels
    return "", False


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), text)


def _parse_filter(text: str) -> Callable[[Info], bool]:
    selectors: list[Callable[[Info], bool]] = []
    pos = 0
    n = len(text)

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(f"filter {text!r}: {why} at position {pos}")

    def token() -> re.Match[str] | None:
        nonlocal pos
        if pos >= n or not text[pos:].strip():
            pos = n
            return None
        m = _TOKEN.match(text, pos)
        if m is None:
            raise bad("unexpected input")
        pos = m.end()
        return m

    def word(m: re.Match[str] | None) -> str:
        if m is None or m.group("op") or m.group("sep"):
            raise bad("expected a field or value")
        if m.group("dq") is not None:
            return _unescape(m.group("dq"))
        return next(g for g in (m.group("sl"), m.group("bar"), m.group("bare")) if g is not None)

    while True:
        path = [word(token())]
        m = token()
        while m is not None and m.group("sep") == ".":
            path.append(word(token()))
            m = token()
        fp = tuple(path)
        if m is None or m.group("sep") == ",":
            selectors.append(lambda i, fp=fp: _field(i, fp)[1])
        elif m.group("op"):
            op = m.group("op")
            # a value runs up to the next "," (dots allowed)
            start = pos
            vm = token()
            if vm is not None and vm.group("bare") is not None:
                end = text.find(",", start)
                end = n if end < 0 else end
                value = text[start:end].strip()
                pos = end
            else:
                value = word(vm)
            if op == "==":
                selectors.append(lambda i, fp=fp, v=value: _field(i, fp) == (v, True))
            elif op == "!=":
                selectors.append(lambda i, fp=fp, v=value: _field(i, fp)[0] != v)
            else:
                try:
                    rx = re.compile(value)
                except re.error as exc:
                    raise bad(f"bad regular expression {value!r}: {exc}") from None
                selectors.append(lambda i, fp=fp, rx=rx: rx.search(_field(i, fp)[0]) is not None)
            m = token()
        else:
            raise bad("expected an operator or ','")
        if m is None:
            break
        if m.group("sep") != ",":
            raise bad("expected ','")
    return lambda info: all(s(info) for s in selectors)


def compile_filters(filters: Sequence[str]) -> Callable[[Info], bool]:
    """One predicate for containerd filter strings (any of them; none or only empty ones = everything).

    Raises:
        InvalidArgument: a filter that does not parse.
    """
    preds = [_parse_filter(f) for f in filters if f.strip()]
    if not preds:
        return lambda info: True
    return lambda info: any(p(info) for p in preds)


def iter_batches(items: Sequence[Info], size: int = 100) -> Iterator[Sequence[Info]]:
    """``items`` in batches of at most ``size`` (List streams them so)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
