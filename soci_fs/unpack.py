"""Apply one OCI layer (a tar stream, gzip/uncompressed/zstd) onto a directory the way containerd's overlay
applier does, and verify the layer's diff_id (spec snapshotter.md §4 "Local snapshot").

The daemon uses this when a layer has no zTOC and cannot be mounted lazily: the downloaded blob is applied
to ``snapshots/<id>/fs``, which becomes an overlayfs lower directory. Everything here blocks; the caller
runs :func:`apply_layer` in a worker thread. On any error the caller discards the destination directory,
so nothing is rolled back, but nothing is ever written outside it.

Owns:

* :func:`apply_layer` -- decompress, hash the uncompressed bytes (that digest is the diff_id), read the tar
  headers incrementally and create every entry: regular files, directories (merged with an existing
  directory; their owner, mode and times set after all entries, so children do not disturb them),
  symlinks, hard links (to an entry of this layer or a file already in the destination), character and
  block devices, fifos, ``SCHILY.xattr.*`` PAX records, set-id and sticky bits (chmod after chown);
  an entry replaces whatever the path held, except that a directory entry merges with a directory;
* the overlay whiteout conversion: ``d/.wh.x`` becomes a character device 0:0 ``d/x`` with no permission
  bits, owned by the whiteout entry's uid/gid, replacing what the destination held there -- but not a
  path this layer created itself: a whiteout hides lower layers only, and in an overlay lower directory
  this layer's own ``d/x`` hides them already (containerd fails on such a layer with EEXIST);
  ``d/.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on ``d`` (always the ``trusted.`` flavour); any
  other name with a ``.wh..wh.`` component (aufs meta data such as ``.wh..wh.plnk``) is skipped;
* implied parent directories (a path whose parent the tar does not list): they take mode, owner and times
  from the nearest lower directory in ``parent_dirs`` that has the directory (respecting whiteouts and
  opaque directories of nearer lowers), else mode 0755 owned by root;
* :func:`compression_for_media_type` -- the layer media types this module can apply.

How the tar is read. Python's :mod:`tarfile` in stream mode (``r|``) yields the entries and their data.
It is lax where Go's ``archive/tar`` (which containerd uses) is strict: an invalid header after the first
one silently ends its archive. So the same uncompressed bytes are also fed to the project's tar scanner
(:mod:`soci_fs.tarscan`, Go semantics, data skipped by arithmetic); it raises on any invalid or truncated
header, and at the end its entry list must match what ``tarfile`` yielded (kind, name, link name), so the
tree written here is the tree Go would read. The scanner refuses entry kinds the zTOC cannot describe
(global PAX headers, sparse files); such a layer fails here and the daemon defers it to containerd.

The digest covers every uncompressed byte: after ``tarfile`` stops at the end-of-archive marker, the rest
of the stream (the second zero block, record padding, anything else) is read and hashed too. Gzip layers
may hold several members; bytes after the last member that are not a gzip member are an error (as in Go).

Paths. Entry names are cleaned lexically (leading ``/`` and ``.`` components dropped, ``..`` applied); a
name that would climb above the destination is a :class:`~soci_fs.errors.FormatError`. Every parent
component must be a real directory in the destination: a parent that is a symlink is refused (a tree a
tar describes never needs one; containerd would resolve it inside the root instead), as is one that is
not a directory. Hard-link targets are checked the same way and must exist. Files are created with
``O_EXCL | O_NOFOLLOW`` after the old path was removed, so a write never follows a link.

Errors: layer faults (bad gzip, bad or truncated tar, unsafe names, missing hard-link targets, a digest
mismatch) raise :class:`~soci_fs.errors.FormatError`; a file system that cannot take an entry (no space,
no ``trusted.`` xattrs, not root) raises :class:`~soci_fs.errors.FailedPrecondition` naming the entry;
a zstd layer without the ``zstandard`` module raises :class:`~soci_fs.errors.FailedPrecondition` naming
the media type. An xattr the file system does not support (``ENOTSUP``; ``EPERM`` for a user xattr on a
symlink) is skipped with a DEBUG log.

Will not: fetch blobs, choose or rename snapshot directories, apply id-mapping, handle aufs hard-link
directories, or roll back a partly applied layer.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Literal

from soci_fs.errors import FailedPrecondition, FormatError, InvalidArgument, NotFound
from soci_fs.tarscan import TarScanner

log = logging.getLogger(__name__)

__all__ = ["MEDIA_TYPES", "OPAQUE_XATTR", "ApplyResult", "apply_layer", "compression_for_media_type"]

Compression = Literal["gzip", "tar", "zstd"]

#: The OCI media type of each compression this module reads.
MEDIA_TYPES: dict[Compression, str] = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
_BY_MEDIA_TYPE: dict[str, Compression] = {
    **{v: k for k, v in MEDIA_TYPES.items()},
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

OPAQUE_XATTR = "trusted.overlay.opaque"
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."

_CHUNK = 1 << 20  # compressed bytes read at a time, and the most uncompressed bytes made at a time
_MAX_TIME_NS = (1 << 63) - 1
_ENC = "utf-8"
_ESC = "surrogateescape"
_NOT_SUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply_layer` did.

    Attributes:
        diff_id: ``sha256:<hex>`` of the uncompressed layer (every byte, trailing blocks included).
        uncompressed_size: the number of uncompressed bytes.
        entries: the number of tar entries read (skipped ones included).
    """

    diff_id: str
    uncompressed_size: int
    entries: int


def compression_for_media_type(media_type: str) -> Compression:
    """The ``compression`` argument of :func:`apply_layer` for a layer media type (OCI or Docker).

    Raises:
        InvalidArgument: not a layer media type this module can apply.
    """
    try:
        return _BY_MEDIA_TYPE[media_type]
    except KeyError:
        raise InvalidArgument(f"layer media type {media_type!r} is not supported for unpacking") from None


def apply_layer(
    blob_path_or_fileobj: str | os.PathLike[str] | IO[bytes],
    dest_dir: str | os.PathLike[str],
    *,
    compression: Compression,
    expected_diff_id: str | None,
    parent_dirs: Sequence[str | os.PathLike[str]] = (),
) -> ApplyResult:
    """Apply a layer blob onto ``dest_dir`` with overlay whiteout conversion and check its diff_id.

    Args:
        blob_path_or_fileobj: the layer blob, a path or a binary file object that is read to its end (and
            not closed).
        dest_dir: an existing directory (normally empty) that receives the layer; it becomes an overlay
            lower directory. Its own metadata is left alone (an entry naming the root is ignored, as
            containerd does).
        compression: ``"gzip"`` (any number of members), ``"tar"`` or ``"zstd"`` (needs the
            ``zstandard`` module).
        expected_diff_id: ``sha256:<hex>`` from the image config's ``rootfs.diff_ids``, or None to skip
            the check. It is compared after the whole stream was read.
        parent_dirs: the lower layers' directories, nearest first. Context only: they are never written;
            an implied parent directory copies mode, owner and times from the nearest of them that has it.

    Returns:
        The diff_id, the uncompressed size and the entry count.

    Raises:
        InvalidArgument: unknown ``compression`` or a malformed ``expected_diff_id``.
        NotFound: ``dest_dir`` is not a directory, or the blob path does not exist.
        FormatError: corrupt compression or tar data, an unsafe entry name (naming the entry), a missing
            hard-link target, or a diff_id mismatch (naming the expected and the actual digest).
        FailedPrecondition: zstd without the ``zstandard`` module (naming the media type), or the file
            system refused an entry (naming it).
    """
    if compression not in MEDIA_TYPES:
        raise InvalidArgument(f"layer compression {compression!r}: expected one of gzip, tar, zstd")
    if expected_diff_id is not None:
        algo, _, hexpart = expected_diff_id.partition(":")
        if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
            raise InvalidArgument(f"expected diff_id {expected_diff_id!r} is not a sha256 digest")
    dest = os.fspath(dest_dir)
    if not os.path.isdir(dest):
        raise NotFound(f"layer destination {dest!r} is not a directory")

    if isinstance(blob_path_or_fileobj, str | os.PathLike):
        try:
            f = open(blob_path_or_fileobj, "rb")  # noqa: SIM115 -- closed in the finally below
        except FileNotFoundError as exc:
            raise NotFound(f"layer blob {os.fspath(blob_path_or_fileobj)!r}") from exc
        owned = True
    else:
        f = blob_path_or_fileobj
        owned = False
    try:
        stream = _UncompressedStream(_chunk_source(f, compression))
        applier = _Applier(dest, [os.fspath(p) for p in parent_dirs])
        entries = applier.run(stream)
    finally:
        if owned:
            f.close()

    diff_id = "sha256:" + stream.sha256.hexdigest()
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise FormatError(f"layer diff_id mismatch: expected {expected_diff_id}, got {diff_id}")
    log.debug(
        "applied layer %s to %s: %d entries (%d skipped), %d implied directories, %d uncompressed bytes (%s)",
        diff_id,
        dest,
        entries,
        applier.skipped,
        applier.implied,
        stream.size,
        compression,
    )
    return ApplyResult(diff_id, stream.size, entries)


# ------------------------------------------------------------------------------------------ streams


def _chunk_source(f: IO[bytes], compression: str) -> Callable[[], bytes]:
    """A function returning the next chunk of uncompressed bytes, ``b""`` at the end."""
    if compression == "tar":
        return lambda: f.read(_CHUNK)
    if compression == "gzip":
        return _GzipSource(f).read
    try:
        import zstandard
    except ImportError:
        raise FailedPrecondition(
            f"cannot apply a layer of media type {MEDIA_TYPES['zstd']}: the zstandard module is not installed"
        ) from None
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)

    def read() -> bytes:
        try:
            return reader.read(_CHUNK)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd: corrupt layer data: {exc}") from exc

    return read


class _GzipSource:
    """Gzip members one after another (as Go's multistream reader), with bounded output per call.

    After a member ends, the next bytes must start another member; the end of the input ends the stream.
    At least one member is required.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._d = zlib.decompressobj(wbits=31)
        self._pending = b""
        self._in_member = False
        self._members = 0
        self._consumed = 0  # compressed bytes handed to zlib, for messages
        self._member_start = 0  # where the current member starts, for messages
        self._done = False

    def read(self) -> bytes:
        while not self._done:
            if self._d.eof:
                self._members += 1
                self._in_member = False
                self._pending = self._d.unused_data
                self._consumed -= len(self._pending)
                self._d = zlib.decompressobj(wbits=31)
            if not self._pending:
                self._pending = self._raw.read(_CHUNK)
                if not self._pending:
                    if self._in_member:
                        raise FormatError(
                            f"gzip: truncated: the layer ends inside member {self._members + 1} "
                            f"after {self._consumed} compressed bytes"
                        )
                    if not self._members:
                        raise FormatError("gzip: the layer blob is empty")
                    self._done = True
                    break
            if not self._in_member:
                self._member_start = self._consumed
            self._in_member = True
            data = self._pending
            try:
                out = self._d.decompress(data, _CHUNK)
            except zlib.error as exc:
                if self._members and self._member_start == self._consumed:
                    raise FormatError(
                        f"gzip: the bytes after member {self._members} (compressed offset "
                        f"{self._consumed}) do not start another gzip member: {exc}"
                    ) from exc
                raise FormatError(
                    f"gzip: corrupt data in member {self._members + 1} near compressed offset "
                    f"{self._consumed}: {exc}"
                ) from exc
            self._pending = self._d.unconsumed_tail
            self._consumed += len(data) - len(self._pending)
            if out:
                return out
        return b""


class _UncompressedStream:
    """The uncompressed layer as a file object for :mod:`tarfile`; every byte handed out, and every byte
    drained after ``tarfile`` stopped, is hashed, counted and fed to the Go-semantics tar scanner once,
    in order."""

    def __init__(self, source: Callable[[], bytes]) -> None:
        self._source = source
        self._buf = b""
        self._pos = 0
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.scanner = TarScanner()

    def _fill(self) -> bool:
        chunk = self._source()
        if not chunk:
            return False
        self.sha256.update(chunk)
        self.size += len(chunk)
        self.scanner.feed(chunk)
        self._buf = chunk
        self._pos = 0
        return True

    def read(self, size: int = -1) -> bytes:
        if self._pos >= len(self._buf) and not self._fill():
            return b""
        end = len(self._buf) if size < 0 else min(len(self._buf), self._pos + size)
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    def drain(self) -> None:
        """Read the stream to its end (bytes after the end-of-archive marker count for the digest)."""
        self._buf = b""
        self._pos = 0
        while self._fill():
            pass


# --------------------------------------------------------------------------------------------- tar


def _kind(ti: tarfile.TarInfo) -> str:
    if ti.isreg():
        return "reg"
    if ti.isdir():
        return "dir"
    if ti.issym():
        return "symlink"
    if ti.islnk():
        return "hardlink"
    if ti.ischr():
        return "char"
    if ti.isblk():
        return "block"
    if ti.isfifo():
        return "fifo"
    return f"typeflag {ti.type!r}"


def _lexical(name: str) -> str:
    """The name without empty and ``.`` components (for comparing the two readers' views)."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _clean(name: str) -> tuple[str, ...]:
    """Path components of an entry name inside the root; :class:`FormatError` when it would escape."""
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise FormatError(f"layer entry {name!r}: the name climbs out of the layer root")
            parts.pop()
        else:
            parts.append(comp)
    return tuple(parts)


def _pax_time_ns(text: str | None) -> int | None:
    """A PAX decimal time (``-1.5``, ``1600000000.123456789``) in nanoseconds; None when absent or bad."""
    if not text:
        return None
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    if not (whole.isascii() and whole.isdigit()) or (frac and not (frac.isascii() and frac.isdigit())):
        return None
    ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def _bound(ns: int) -> int:
    """containerd's time bounds: a time before the epoch or past the 64-bit limit becomes the epoch."""
    return ns if 0 <= ns <= _MAX_TIME_NS else 0


def _times(ti: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns: atime is the later of the PAX atime and the mtime, both bounded."""
    mtime = _pax_time_ns(ti.pax_headers.get("mtime"))
    if mtime is None:
        mtime = int(ti.mtime) * 1_000_000_000
    atime = _pax_time_ns(ti.pax_headers.get("atime"))
    atime = mtime if atime is None else max(atime, mtime)
    return _bound(atime), _bound(mtime)


@dataclass
class _DirMeta:
    """Owner, mode and times a directory gets once every entry is written."""

    uid: int
    gid: int
    mode: int
    times: tuple[int, int] | None  # (atime, mtime) in ns; None leaves them


class _Applier:
    """One application of one layer onto ``root``."""

    def __init__(self, root: str, lowers: list[str]) -> None:
        self.root = root
        self.lowers = lowers
        self.dirs: dict[tuple[str, ...], _DirMeta] = {}  # directories to finish, in first-seen order
        self.real_dirs: set[tuple[str, ...]] = {()}  # paths known to be directories (not symlinks) here
        self.seen: list[tuple[str, str, str]] = []  # (kind, name, linkname) per entry, as tarfile read it
        self.unpacked: set[tuple[str, ...]] = set()  # paths this layer created (whiteouts spare them)
        self.skipped = 0  # entries ignored on purpose (aufs meta data, redundant whiteouts)
        self.implied = 0  # parent directories created without an entry

    def path(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.root, *parts)

    # -------------------------------------------------------------------------------------- driving

    def run(self, stream: _UncompressedStream) -> int:
        """Apply every entry, drain the stream and cross-check with the scanner; the entry count."""
        opened_error: tarfile.ReadError | None = None
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", encoding=_ENC, errors=_ESC)  # noqa: SIM115
        except tarfile.ReadError as exc:
            # An empty stream is an empty archive for Go; anything else the scanner explains below.
            tf, opened_error = None, exc
        try:
            if tf is not None:
                while (ti := tf.next()) is not None:
                    tf.members.clear()  # stream mode: nothing needs the earlier members
                    self.seen.append((_kind(ti), _lexical(ti.name), ti.linkname))
                    self.entry(tf, ti)
        except tarfile.TarError as exc:
            stream.drain()
            stream.scanner.finish()  # its message is the better one when it has one
            raise FormatError(f"tar: {exc} (after {len(self.seen)} entries)") from exc
        except (EOFError, zlib.error) as exc:
            raise FormatError(f"tar: {exc} (after {len(self.seen)} entries)") from exc
        finally:
            if tf is not None:
                tf.close()
        stream.drain()
        result = stream.scanner.finish()
        if opened_error is not None and result.entries:
            raise FormatError(f"tar: {opened_error}") from opened_error
        self.crosscheck([(e.type, _lexical(e.name), e.linkname) for e in result.entries])
        self.finish_dirs()
        return len(self.seen)

    def crosscheck(self, reference: list[tuple[str, str, str]]) -> None:
        """The entries tarfile yielded must be the entries Go's reader sees."""
        for i, (got, want) in enumerate(zip(self.seen, reference, strict=False)):
            if got != want:
                raise FormatError(
                    f"tar: entry {i} reads as {got[0]} {got[1]!r} (link {got[2]!r}) here but as "
                    f"{want[0]} {want[1]!r} (link {want[2]!r}) with Go's tar semantics"
                )
        if len(self.seen) != len(reference):
            raise FormatError(
                f"tar: {len(self.seen)} entries were applied but the archive holds {len(reference)} "
                "with Go's tar semantics"
            )

    # -------------------------------------------------------------------------------------- entries

    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        name = ti.name
        parts = _clean(name)
        if not parts:
            return  # the root (``./``): containerd leaves the root's metadata alone
        if any(p.startswith(WHITEOUT_META_PREFIX) for p in parts[:-1]) or (
            parts[-1].startswith(WHITEOUT_META_PREFIX) and parts[-1] != WHITEOUT_OPAQUE
        ):
            self.skipped += 1
            log.debug("layer entry %r ignored: aufs meta data", name)
            return
        try:
            parent = self.ensure_parent(parts, name)
            base = parts[-1]
            if base == WHITEOUT_OPAQUE:
                self.set_xattr(self.path(parent), OPAQUE_XATTR, b"y", name, optional=False)
                return
            if base.startswith(WHITEOUT_PREFIX):
                self.whiteout(parent, base, ti)
                return
            self.create(tf, ti, parts)
            self.unpacked.add(parts)
        except OSError as exc:
            raise FailedPrecondition(
                f"layer entry {name!r}: cannot write it below {self.root!r}: {exc.strerror or exc}"
            ) from exc

    def whiteout(self, parent: tuple[str, ...], base: str, ti: tarfile.TarInfo) -> None:
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", "..") or "/" in target:
            raise FormatError(f"layer entry {ti.name!r}: invalid whiteout name")
        parts = (*parent, target)
        path = self.path(parts)
        if parts in self.unpacked and os.path.lexists(path):
            # OCI: a whiteout hides only lower layers' files; in an overlay lower directory the entry of
            # this layer hides them already.
            self.skipped += 1
            log.debug("whiteout %r ignored: this layer has the path itself", ti.name)
            return
        self.remove_existing(parts)
        os.mknod(path, stat.S_IFCHR, 0)
        os.chown(path, ti.uid, ti.gid, follow_symlinks=False)

    def create(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        path = self.path(parts)
        mode = ti.mode & 0o7777
        xattrs = {
            k[len(XATTR_PREFIX) :]: v.encode(_ENC, _ESC)
            for k, v in ti.pax_headers.items()
            if k.startswith(XATTR_PREFIX)
        }
        if ti.isdir():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                if st is not None:
                    self.remove(parts, st)
                os.mkdir(path, 0o700)
            self.real_dirs.add(parts)
            self.dirs[parts] = _DirMeta(ti.uid, ti.gid, mode, _times(ti))
            self.set_xattrs(path, xattrs, ti.name, symlink=False)
            return

        self.remove_existing(parts)
        if ti.isreg():
            src = tf.extractfile(ti)
            assert src is not None  # a regular member always has a data stream
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "wb", closefd=True) as out:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fchown(fd, ti.uid, ti.gid)
                self.set_xattrs(fd, xattrs, ti.name, symlink=False)
                os.fchmod(fd, mode)
                atime, mtime = _times(ti)
                os.utime(fd, ns=(atime, mtime))
            return
        symlink = False
        if ti.issym():
            os.symlink(ti.linkname, path)
            symlink = True
        elif ti.islnk():
            target = self.hardlink_target(ti)
            os.link(target, path, follow_symlinks=False)
            symlink = stat.S_ISLNK(os.lstat(path).st_mode)
        elif ti.ischr() or ti.isblk() or ti.isfifo():
            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK if ti.isblk() else stat.S_IFIFO
            dev = os.makedev(ti.devmajor, ti.devminor) if kind != stat.S_IFIFO else 0
            os.mknod(path, kind | 0o600, dev)
        else:
            raise FormatError(f"layer entry {ti.name!r}: unsupported tar entry type {ti.type!r}")
        os.chown(path, ti.uid, ti.gid, follow_symlinks=False)
        self.set_xattrs(path, xattrs, ti.name, symlink=symlink)
        if not symlink:
            os.chmod(path, mode)  # we just made this path and it is not a symlink
        atime, mtime = _times(ti)
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    def hardlink_target(self, ti: tarfile.TarInfo) -> str:
        """The path of an existing non-directory inside the root named by a hard link entry."""
        try:
            parts = _clean(ti.linkname)
        except FormatError:
            raise FormatError(
                f"layer entry {ti.name!r}: hard link target {ti.linkname!r} is outside the layer root"
            ) from None
        if not parts:
            raise FormatError(f"layer entry {ti.name!r}: hard link to the layer root")
        for i in range(1, len(parts)):
            prefix = parts[:i]
            if prefix in self.real_dirs:
                continue
            try:
                st = os.lstat(self.path(prefix))
            except FileNotFoundError:
                raise FormatError(
                    f"layer entry {ti.name!r}: hard link target {ti.linkname!r} does not exist"
                ) from None
            if not stat.S_ISDIR(st.st_mode):
                what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise FormatError(
                    f"layer entry {ti.name!r}: hard link target {ti.linkname!r} passes through "
                    f"{'/'.join(prefix)!r}, which is {what}"
                )
            self.real_dirs.add(prefix)
        path = self.path(parts)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise FormatError(
                f"layer entry {ti.name!r}: hard link target {ti.linkname!r} does not exist"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise FormatError(f"layer entry {ti.name!r}: hard link target {ti.linkname!r} is a directory")
        return path

    # ---------------------------------------------------------------------------------- directories

    def ensure_parent(self, parts: tuple[str, ...], name: str) -> tuple[str, ...]:
        """Make sure every parent of ``parts`` is a real directory, creating implied ones."""
        parent = parts[:-1]
        if parent in self.real_dirs:
            return parent
        for i in range(1, len(parent) + 1):
            prefix = parent[:i]
            if prefix in self.real_dirs:
                continue
            path = self.path(prefix)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                self.implied_dir(prefix)
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise FormatError(
                        f"layer entry {name!r}: parent {'/'.join(prefix)!r} is a symlink; "
                        "writing through it is refused"
                    )
                if not stat.S_ISDIR(st.st_mode):
                    raise FormatError(f"layer entry {name!r}: parent {'/'.join(prefix)!r} is not a directory")
            self.real_dirs.add(prefix)
        return parent

    def implied_dir(self, parts: tuple[str, ...]) -> None:
        """Create a directory the tar does not list, shaped like the nearest lower one."""
        os.mkdir(self.path(parts), 0o700)
        self.unpacked.add(parts)
        st = self.lower_dir(parts)
        if st is None:
            self.dirs[parts] = _DirMeta(0, 0, 0o755, None)
        else:
            meta = _DirMeta(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), (st.st_atime_ns, st.st_mtime_ns))
            self.dirs[parts] = meta
        self.implied += 1

    def lower_dir(self, parts: tuple[str, ...]) -> os.stat_result | None:
        """The stat of ``parts`` in the nearest lower that has it as a directory, as overlayfs would show
        it: a whiteout or a non-directory on the way hides it, and so does an opaque directory above it
        in a nearer lower."""
        for lower in self.lowers:
            cur = lower
            opaque = False
            st: os.stat_result | None = None
            for comp in parts:
                cur = os.path.join(cur, comp)
                try:
                    st = os.lstat(cur)
                except OSError:
                    st = None
                    break
                if not stat.S_ISDIR(st.st_mode):
                    return None  # a file, symlink or whiteout hides the path in every deeper lower
                try:
                    opaque = opaque or os.getxattr(cur, OPAQUE_XATTR, follow_symlinks=False) == b"y"
                except OSError:
                    pass
            if st is not None:
                return st
            if opaque:
                return None
        return None

    def finish_dirs(self) -> None:
        """Owner, mode and times of the directories, children first; directories removed later in the
        stream were dropped from the list already."""
        for parts, meta in reversed(self.dirs.items()):
            path = self.path(parts)
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    continue
                os.chown(path, meta.uid, meta.gid, follow_symlinks=False)
                os.chmod(path, meta.mode)
                if meta.times is not None:
                    os.utime(path, ns=meta.times, follow_symlinks=False)
            except OSError as exc:
                raise FailedPrecondition(
                    f"layer directory {'/'.join(parts)!r}: cannot set its owner, mode or times below "
                    f"{self.root!r}: {exc.strerror or exc}"
                ) from exc

    # ------------------------------------------------------------------------------------- removing

    def remove_existing(self, parts: tuple[str, ...]) -> None:
        try:
            st = os.lstat(self.path(parts))
        except FileNotFoundError:
            return
        self.remove(parts, st)

    def remove(self, parts: tuple[str, ...], st: os.stat_result) -> None:
        """Remove a path an entry replaces (a directory with everything below it)."""
        path = self.path(parts)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return
        shutil.rmtree(path)
        n = len(parts)
        for key in [k for k in self.dirs if k[:n] == parts]:
            del self.dirs[key]
        self.real_dirs = {k for k in self.real_dirs if k[:n] != parts}

    # --------------------------------------------------------------------------------------- xattrs

    def set_xattrs(self, target: str | int, xattrs: dict[str, bytes], name: str, *, symlink: bool) -> None:
        for key, value in xattrs.items():
            self.set_xattr(target, key, value, name, optional=True, symlink=symlink)

    def set_xattr(
        self, target: str | int, key: str, value: bytes, name: str, *, optional: bool, symlink: bool = False
    ) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as exc:
            skip = exc.errno in _NOT_SUPPORTED or (symlink and exc.errno == errno.EPERM)
            if optional and skip:
                log.debug("layer entry %r: xattr %r not set: %s", name, key, exc.strerror)
                return
            raise FailedPrecondition(
                f"layer entry {name!r}: cannot set xattr {key!r} below {self.root!r}: {exc.strerror or exc}"
            ) from exc
