"""The local SOCI store: blobs under ``<root>/content``, the artifacts DB ``<root>/artifacts.sqlite``.

Owns:
* :class:`ContentStore`: an OCI-layout-shaped blob store (``content/blobs/sha256/<hex>``). Writes go to a
  temp file in the same directory, are fsynced, checked against the expected digest and renamed into place,
  so a reader never sees a partial blob. Reads verify digest and size.
* :class:`ArtifactsDB`: the CLI bookkeeping of cli-and-config.md "artifacts.db" (digest, size, location,
  oci_digest, image_digest, platform, type, media_type, artifact_type, created_at, span_size) in sqlite
  rather than upstream's bbolt file; every change runs in one transaction.
* :func:`rebuild_db`: drop entries whose blob is gone and rediscover v1 indexes (with a subject) and their
  zTOCs from the content store.

Will not: talk to containerd (its content store arrives with the daemon work) or garbage-collect blobs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from soci_fs import gojson
from soci_fs import index as soci_index
from soci_fs.errors import FailedPrecondition, FormatError, InvalidArgument, NotFound, SociError
from soci_fs.oci import (
    OCI_LAYOUT_FILE,
    Descriptor,
    Manifest,
    Platform,
    VerifyingReader,
    check_digest,
    verify_bytes,
)

DEFAULT_ROOT = "/var/lib/soci-snapshotter-grpc"
DB_NAME = "artifacts.sqlite"

TYPE_INDEX = "soci_index"
TYPE_LAYER = "soci_layer"
TYPE_PREFETCH = "soci_prefetch"
TYPES = (TYPE_INDEX, TYPE_LAYER, TYPE_PREFETCH)


class ContentStore:
    """Blobs by digest under ``<root>/content`` (OCI image layout blob paths)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def init(self) -> None:
        """Create the directory with an ``oci-layout`` marker and an empty ``index.json`` if absent."""
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.path / "oci-layout"
        if not marker.exists():
            self._write_atomic(marker, OCI_LAYOUT_FILE)
        idx = self.path / "index.json"
        if not idx.exists():
            self._write_atomic(idx, b'{"schemaVersion":2,"manifests":[]}')

    def blob_path(self, digest: str) -> Path:
        alg, hexd = check_digest(digest, "content store").split(":", 1)
        return self.path / "blobs" / alg / hexd

    def has(self, digest: str) -> bool:
        try:
            return self.blob_path(digest).is_file()
        except FormatError:
            return False

    def size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest}: not in the local content store {str(self.path)!r}") from exc

    def _write_atomic(self, dest: Path, data: bytes) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (refused if it does not hash to ``digest``, when given). Returns its digest."""
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != got:
            if digest.startswith("sha256:"):
                raise FormatError(f"blob {digest}: content hashes to {got}")
            verify_bytes(data, digest, None, f"blob {digest}")
            got = digest
        path = self.blob_path(got)
        if not path.exists():
            self._write_atomic(path, data)
        return got

    @contextlib.contextmanager
    def writer(self, digest: str, size: int) -> Iterator[Callable[[bytes], None]]:
        """A sink for a streamed blob; on a clean exit the hashed content must equal ``digest``/``size``.

        Yields a ``write(chunk)`` callable. The blob appears only after it was verified and fsynced.
        """
        dest = self.blob_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        h = hashlib.new(digest.split(":", 1)[0])
        n = 0
        try:
            with os.fdopen(fd, "wb") as f:

                def write(chunk: bytes) -> None:
                    nonlocal n
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)

                yield write
                f.flush()
                os.fsync(f.fileno())
            got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
            if got != digest or n != size:
                raise FormatError(
                    f"blob {digest}: written content hashes to {got} ({n} bytes, expected {size})"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_file(self, src: str | os.PathLike[str], digest: str, size: int) -> None:
        """Copy a file into the store as blob ``digest`` (verified while copying); no-op if present."""
        if self.has(digest):
            return
        with open(src, "rb") as f, self.writer(digest, size) as write:
            while chunk := f.read(1 << 20):
                write(chunk)

    def read(self, digest: str, size: int | None = None) -> bytes:
        """Verified bytes of a blob.

        Raises:
            NotFound: no such blob. FormatError: the file does not hash to its digest.
        """
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest}: not in the local content store {str(self.path)!r}") from exc
        return verify_bytes(data, digest, size, f"blob {digest} in the local content store")

    def open(self, desc: Descriptor) -> VerifyingReader:
        try:
            f = open(self.blob_path(desc.digest), "rb")  # noqa: SIM115 - owned by the reader
        except FileNotFoundError as exc:
            raise NotFound(f"blob {desc.digest}: not in the local content store {str(self.path)!r}") from exc
        return VerifyingReader(f, desc.digest, desc.size, f"blob {desc.digest} in the local content store")

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest}: not in the local content store {str(self.path)!r}") from exc
        if len(data) != length:
            raise FormatError(f"blob {digest}: short read at {offset} ({len(data)} of {length} bytes)")
        return data

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(digest).unlink()

    def walk(self) -> Iterator[tuple[str, Path]]:
        """``(digest, path)`` of every blob file."""
        base = self.path / "blobs"
        if not base.is_dir():
            return
        for algdir in sorted(base.iterdir()):
            if not algdir.is_dir():
                continue
            for f in sorted(algdir.iterdir()):
                if f.name.startswith(".tmp-") or not f.is_file():
                    continue
                d = f"{algdir.name}:{f.name}"
                try:
                    check_digest(d)
                except FormatError:
                    continue
                yield d, f


@dataclass(frozen=True)
class ArtifactEntry:
    """One artifacts-DB row."""

    digest: str
    size: int
    location: str  # as upstream: the layer digest (zTOC, prefetch) or the image manifest digest (index)
    type: str  # soci_index | soci_layer | soci_prefetch
    oci_digest: str = ""  # layer digest (zTOC, prefetch) or image manifest digest (index)
    image_digest: str = ""  # image manifest digest (index)
    platform: str = ""  # os/arch[/variant] (index)
    media_type: str = ""
    artifact_type: str = ""  # index: SOCI index artifact type (says v1 / v2)
    created_at: str = ""  # RFC 3339 UTC with nanoseconds, "" = unknown
    span_size: int = 0  # zTOC span size

    @property
    def manifest_version(self) -> str:
        return "v2" if self.artifact_type == soci_index.ARTIFACT_TYPE_V2 else "v1"

    def created(self) -> _dt.datetime | None:
        if not self.created_at:
            return None
        try:
            return _dt.datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))
        except ValueError:
            return None


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_COLUMNS = (
    "digest",
    "size",
    "location",
    "type",
    "oci_digest",
    "image_digest",
    "platform",
    "media_type",
    "artifact_type",
    "created_at",
    "span_size",
)
_INSERT = (
    f"INSERT OR REPLACE INTO artifacts ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    digest        TEXT PRIMARY KEY,
    size          INTEGER NOT NULL,
    location      TEXT NOT NULL,
    type          TEXT NOT NULL CHECK (type IN ('soci_index', 'soci_layer', 'soci_prefetch')),
    oci_digest    TEXT NOT NULL DEFAULT '',
    image_digest  TEXT NOT NULL DEFAULT '',
    platform      TEXT NOT NULL DEFAULT '',
    media_type    TEXT NOT NULL DEFAULT '',
    artifact_type TEXT NOT NULL DEFAULT '',
    created_at    TEXT NOT NULL DEFAULT '',
    span_size     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS artifacts_oci ON artifacts (oci_digest, type);
CREATE INDEX IF NOT EXISTS artifacts_image ON artifacts (image_digest, type);
"""


class ArtifactsDB:
    """sqlite artifacts DB; one transaction per public method."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            # One connection shared by the build threads; every use holds ``self._lock``.
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FailedPrecondition(f"artifacts DB {str(self.path)!r}: cannot open: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ArtifactsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls back and propagates."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise FailedPrecondition(f"artifacts DB {str(self.path)!r}: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise FailedPrecondition(
                        f"artifacts DB {str(self.path)!r}: commit failed: {exc}"
                    ) from exc

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise FailedPrecondition(f"artifacts DB {str(self.path)!r}: {exc}") from exc

    @staticmethod
    def _row(r: tuple) -> ArtifactEntry:
        return ArtifactEntry(**dict(zip(_COLUMNS, r, strict=True)))

    def put(self, *entries: ArtifactEntry) -> None:
        """Insert or replace entries (all or none)."""
        for e in entries:
            if e.type not in TYPES:
                raise InvalidArgument(f"artifact {e.digest}: unknown type {e.type!r}")
        with self.transaction() as db:
            db.executemany(
                _INSERT,
                [tuple(getattr(e, c) for c in _COLUMNS) for e in entries],
            )

    def get(self, digest: str) -> ArtifactEntry | None:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM artifacts WHERE digest = ?", (digest,))
        return self._row(rows[0]) if rows else None

    def entries(self, type_: str | None = None) -> list[ArtifactEntry]:
        """Entries in digest (key) order, optionally of one type."""
        q = f"SELECT {', '.join(_COLUMNS)} FROM artifacts"
        args: tuple = ()
        if type_ is not None:
            q += " WHERE type = ?"
            args = (type_,)
        return [self._row(r) for r in self._query(q + " ORDER BY digest", args)]

    def find_ztoc(self, layer_digest: str, span_size: int) -> ArtifactEntry | None:
        rows = self._query(
            f"SELECT {', '.join(_COLUMNS)} FROM artifacts "
            "WHERE type = ? AND oci_digest = ? AND span_size = ? "
            "ORDER BY created_at DESC LIMIT 1",
            (TYPE_LAYER, layer_digest, span_size),
        )
        return self._row(rows[0]) if rows else None

    def remove(self, *digests: str) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM artifacts WHERE digest = ?", [(d,) for d in digests])


class Store:
    """``<root>``: the content store plus the artifacts DB."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.content = ContentStore(self.root / "content")
        self._db: ArtifactsDB | None = None
        self._db_lock = threading.Lock()

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, create: bool = True) -> Store:
        """Open the store; ``create`` makes ``root`` (single level, mode 0700; the parent must exist)."""
        s = cls(root)
        if create:
            try:
                s.root.mkdir(mode=0o700, exist_ok=True)
            except FileNotFoundError as exc:
                raise NotFound(f"root {str(s.root)!r}: parent directory does not exist") from exc
            except OSError as exc:
                raise FailedPrecondition(f"root {str(s.root)!r}: cannot create: {exc.strerror}") from exc
            s.content.init()
        elif not s.root.is_dir():
            raise NotFound(f"root {str(s.root)!r}: no such directory")
        return s

    @property
    def db(self) -> ArtifactsDB:
        with self._db_lock:
            if self._db is None:
                self._db = ArtifactsDB(self.root / DB_NAME)
            return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup_ztoc(self, layer_digest: str, span_size: int) -> bytes | None:
        """A zTOC recorded for (layer, span size) whose blob is present, else ``None`` (formats.md §2.1)."""
        e = self.db.find_ztoc(layer_digest, span_size)
        if e is None or not self.content.has(e.digest):
            return None
        try:
            return self.content.read(e.digest, e.size)
        except SociError:
            return None

    def record_index(
        self,
        built: soci_index.BuiltIndex,
        *,
        image_digest: str,
        platform: str,
        span_size: int,
    ) -> None:
        """Record an index and its zTOCs in one transaction (blobs must already be in the content store)."""
        now = now_rfc3339()
        entries = [
            ArtifactEntry(
                digest=built.descriptor.digest,
                size=built.descriptor.size,
                location=image_digest,
                type=TYPE_INDEX,
                oci_digest=image_digest,
                image_digest=image_digest,
                platform=platform,
                media_type=built.descriptor.media_type,
                artifact_type=built.manifest.config.media_type,
                created_at=now,
            )
        ]
        for o in built.ztocs:
            assert o.ztoc is not None
            entries.append(
                ArtifactEntry(
                    digest=o.ztoc.digest,
                    size=o.ztoc.size,
                    location=o.layer.digest,
                    type=TYPE_LAYER,
                    oci_digest=o.layer.digest,
                    media_type=o.ztoc.media_type,
                    created_at=now,
                    span_size=span_size,
                )
            )
        self.db.put(*entries)


@dataclass(frozen=True)
class RebuildReport:
    removed: tuple[str, ...]
    added: tuple[str, ...]


def _platform_from_store(store: Store, subject: Descriptor) -> str:
    if not store.content.has(subject.digest):
        return ""
    try:
        m = Manifest.parse(store.content.read(subject.digest), f"manifest {subject.digest}")
        cfg = gojson.loads(store.content.read(m.config.digest))
        return str(Platform.from_json(cfg, f"config {m.config.digest}"))
    except SociError:
        return ""


def rebuild_db(store: Store) -> RebuildReport:
    """Drop entries whose blob is gone; add v1 indexes with a subject found in the content store (and their
    zTOCs). The platform comes from the subject manifest's config when both are in the store, else it is
    left empty. v2 indexes and prefetch artifacts are not rediscovered (as upstream)."""
    db = store.db
    removed = [e.digest for e in db.entries() if not store.content.has(e.digest)]
    if removed:
        db.remove(*removed)
    added: list[ArtifactEntry] = []
    known = {e.digest for e in db.entries()}
    for digest, path in store.content.walk():
        if digest in known:
            continue
        try:
            st = path.stat()
            if st.st_size < 10:
                continue
            data = path.read_bytes()
            idx = soci_index.parse_index(data, f"blob {digest}")
        except (SociError, OSError):
            continue
        if idx.version != 1 or idx.subject is None:
            continue
        now = now_rfc3339()
        added.append(
            ArtifactEntry(
                digest=digest,
                size=len(data),
                location=idx.subject.digest,
                type=TYPE_INDEX,
                oci_digest=idx.subject.digest,
                image_digest=idx.subject.digest,
                platform=_platform_from_store(store, idx.subject),
                media_type=idx.manifest.media_type or soci_index.MT_OCI_MANIFEST,
                artifact_type=soci_index.ARTIFACT_TYPE_V1,
                created_at=now,
            )
        )
        known.add(digest)
        for z in idx.ztocs:
            if z.descriptor.digest in known or not store.content.has(z.descriptor.digest):
                continue
            added.append(
                ArtifactEntry(
                    digest=z.descriptor.digest,
                    size=z.descriptor.size,
                    location=z.layer_digest,
                    type=TYPE_LAYER,
                    oci_digest=z.layer_digest,
                    media_type=z.descriptor.media_type,
                    created_at=now,
                    span_size=z.span_size or 0,
                )
            )
            known.add(z.descriptor.digest)
    if added:
        db.put(*added)
    return RebuildReport(tuple(removed), tuple(e.digest for e in added))
